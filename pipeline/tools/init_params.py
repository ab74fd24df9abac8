"""init's choice of params from the images it inspected, and their writing into params.yaml.

choose_params: base.image_size from the images' sizes, base.channels and augment.hsv.p from
their colour, clean.quality.low_information from their size.

choose_backbone: a pretrained timm model for photos, the small CNN for the rest. The rule:
images whose median short side is at least PHOTO_SIDE px and that are in colour are photos; for
them init proposes DEFAULT_BACKBONE with ImageNet weights as a frozen feature extractor with a
linear head (a forward pass per image and stage, no backward: what 2 CPU cores afford at
224 px), at the input size its weights were trained at. The proposal stands only if timm is
installed and the weights are in the Hugging Face cache (a proposal never waits on the
network); otherwise init keeps the CNN and says why. `--backbone` and `--weights`
choose explicitly; weights asked for that cannot be had are an error, before anything is copied.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.config import ModelConfig
from pipeline.core.errors import PipelineError
from pipeline.core.io import edit_yaml
from pipeline.data.image_stats import fitting_shape
from pipeline.tools.pools import write_rounds

TINY_SIDE = 24  # px: below, CleanVision's low-information threshold would flag nearly every image
PHOTO_SIDE = 64  # px, median short side from which colour images count as photos
DEFAULT_BACKBONE = "tf_efficientnet_lite0"  # 4.7M parameters, 224 px, ~0.4 GFLOPs per image


def choose_backbone(
    chosen: dict, short_side: float, backbone: str | None, weights: str | None
) -> dict:
    """train.model.backbone, weights and frozen (and base.image_size for a timm backbone),
    with the reason for each, to add to init's chosen params."""
    from pipeline.training.backbones import cached_imagenet_file, check_weights, input_size

    photos = chosen["base.channels"] == 3 and short_side >= PHOTO_SIDE
    asked = backbone is not None or weights is not None
    if not asked and not photos:
        return _cnn(f"images under {PHOTO_SIDE} px or grayscale: the small CNN fits them")
    backbone = backbone or ("resnet" if weights == "none" else DEFAULT_BACKBONE)
    if backbone == "resnet":
        if weights not in (None, "none"):
            raise PipelineError("--weights: the resnet backbone trains from scratch (none)")
        return _cnn("--backbone resnet")
    weights = weights or "imagenet"
    if not asked:  # a proposal never waits on the network: the weights are in the cache or not
        try:
            cached = cached_imagenet_file(backbone)
        except PipelineError as exc:  # timm is not installed
            return _cnn(f"photos, but {exc}")
        if cached is None:
            return _cnn(
                f"photos, but {backbone}'s ImageNet weights are not in the Hugging Face cache: "
                f"--weights imagenet downloads them, --weights FILE reads a state dict"
            )
    cfg = ModelConfig(backbone=backbone, weights=weights, frozen=weights != "none")
    check_weights(cfg)
    why = (
        "--backbone/--weights"
        if asked
        else (
            f"photos (colour, median short side >= {PHOTO_SIDE} px) and the weights are in the "
            f"cache: ImageNet features (docs/backbones.md)"
        )
    )
    return {
        "train.model.backbone": backbone,
        "train.model.weights": weights,
        "train.model.frozen": cfg.frozen,
        "train.fallback": "resnet",
        "base.image_size": input_size(backbone),
        "why": {
            "train.model.backbone": why,
            "train.model.weights": "imagenet: timm's, from the Hugging Face cache"
            if weights == "imagenet"
            else weights,
            "train.model.frozen": "a linear head on frozen features: one forward pass per "
            "image and stage, what a CPU affords; on a GPU set it to false to fine-tune"
            if cfg.frozen
            else "random weights: the whole network trains",
            "train.fallback": "each round also trains the small CNN at 32 px and keeps it "
            "where it scores higher on validation; none: the backbone alone",
            "base.image_size": f"the input size {backbone} was pretrained at",
        },
    }


def _cnn(why: str) -> dict:
    return {
        "train.model.backbone": "resnet",
        "train.model.weights": "none",
        "train.model.frozen": False,
        "why": {"train.model.backbone": why},
    }


def choose_params(stats: dict) -> dict:
    """base.image_size, base.channels, augment.hsv.p, clean.quality.low_information and the
    reason for each."""
    shape = fitting_shape(stats)
    colour = shape["channels"] == 3
    tiny = stats["short_side"]["median"] < TINY_SIDE
    return {
        "base.image_size": shape["image_size"],
        "base.channels": shape["channels"],
        "augment.hsv.p": 0.5 if colour else 0.0,
        "clean.quality.low_information": 0.15 if tiny else 0.3,
        "why": {
            "clean.quality.low_information": (
                f"images under {TINY_SIDE} px hold little information by nature"
                if tiny
                else "CleanVision's own threshold, which suits images of this size"
            ),
            "base.image_size": shape["why"]["image_size"],
            "base.channels": shape["why"]["channels"],
            "augment.hsv.p": "HSV shifts for colour images" if colour else "grayscale: no HSV",
        },
    }


def apply_params(params_path: Path, chosen: dict, pools: list[str]) -> None:
    def update(doc) -> None:
        for dotted, value in chosen.items():
            if dotted == "why":
                continue
            *parents, last = dotted.split(".")
            node = doc
            for key in parents:
                node = node[key]
            node[last] = value

    edit_yaml(params_path, update)
    write_rounds(params_path, pools)
