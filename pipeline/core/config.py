"""Typed, frozen views of params.yaml.

Every knob lives in params.yaml, one section per stage plus `base`. `load_params` turns the
file into frozen dataclasses and refuses unknown keys, wrong types and out-of-range values
with the key's full path (e.g. `train.lr`) and the allowed range in the message (the parsing
machinery and the field helpers are pipeline.core.typed).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml.error import YAMLError

from pipeline.core.errors import PipelineError
from pipeline.core.names import check_name, check_round_key, printable
from pipeline.core.typed import (
    AUTO,
    budgets,
    choice,
    num,
    num_or_auto,
    pair,
    parse,
    prob,
    read_yaml,
)

# --------------------------------------------------------------------------------------------
# Sections


@dataclass(frozen=True)
class BaseConfig:
    seed: int = num(0, 0)
    # "auto" until ingest resolves it: the stages read these through `with_image_shape`
    image_size: int = num_or_auto(AUTO, 4, 1024)  # px; every image becomes this x this
    channels: int = num_or_auto(AUTO, 1, 3)  # 1 = grayscale, 3 = RGB
    resize: str = choice("pad", "stretch")  # pad: keep aspect ratio, letterbox with black


@dataclass(frozen=True)
class DemoConfig:
    flip_fraction: float = prob(0.15)  # share of labeled images given a wrong label
    test_fraction: float = num(0.2, 0.05, 0.5)
    labeled_fraction: float = num(0.1, 0.05, 0.9)  # of what is left after the test split
    pools: int = num(2, 1, 10)  # the rest is split into this many unlabeled pools
    image_px: int = num(8, 8, 256)  # side of the written PNGs; the 8x8 scans are upscaled
    # The demo's training budgets: demo-data writes them into train.min_steps,
    # clean.min_steps and clean.embedding_steps, so the quick start's rounds train in a few
    # minutes on two cores while the committed general defaults stay as they are for data a
    # user brings.
    train_min_steps: int = num(200, 0, 10_000_000)
    clean_min_steps: tuple[int, ...] = budgets((60,), 0, 10_000_000)
    clean_embedding_steps: int = num(0, 0, 10_000_000)


@dataclass(frozen=True)
class IngestConfig:
    max_image_pixels: int = num(20_000_000, 1)  # decompression-bomb limit (width * height)
    min_images_per_class: int = num(2, 1)
    test_fraction: float = num(0.2, 0.05, 0.5)  # only used when data/test/ does not exist
    shard_mib: float = num(64.0, 0.001, 4096.0)  # size of each packed image shard file
    # Near copies across splits (images.signature): within this share of the median distance
    # to the nearest other image, and at most near_copy_max_distance (cosine). The search is
    # exact and quadratic in the number of images: switch it off above a few hundred thousand.
    near_copies: bool = True
    near_copy_ratio: float = num(0.2, 0.0, 1.0)
    near_copy_max_distance: float = num(0.1, 0.0, 1.0)


@dataclass(frozen=True)
class RotateConfig:
    p: float = prob(0.5)
    limit: float = num(12.0, 0.0, 180.0)  # degrees, both directions


@dataclass(frozen=True)
class CropConfig:
    p: float = prob(0.5)
    scale: tuple[float, float] = pair((0.8, 1.0), 0.05, 1.0)  # share of the area kept
    ratio: tuple[float, float] = pair((0.9, 1.1), 0.2, 5.0)  # aspect ratio range


@dataclass(frozen=True)
class ShearConfig:
    p: float = prob(0.3)
    limit: float = num(8.0, 0.0, 45.0)  # degrees, both directions


@dataclass(frozen=True)
class QualityConfig:
    """CleanVision's thresholds (its defaults suit photographs; see pipeline/data/quality.py)."""

    dark: float = prob(0.32)
    light: float = prob(0.05)
    blurry: float = prob(0.29)
    low_information: float = prob(0.15)  # CleanVision's 0.3 flags nearly every 8-px digit
    odd_aspect_ratio: float = prob(0.35)
    odd_size_iqr: float = num(3.0, 0.0, 100.0)  # sizes beyond this many IQRs are odd


@dataclass(frozen=True)
class HsvConfig:
    p: float = prob(0.0)  # needs base.channels: 3
    hue: float = num(10.0, 0.0, 180.0)
    saturation: float = num(20.0, 0.0, 255.0)
    value: float = num(20.0, 0.0, 255.0)


@dataclass(frozen=True)
class BrightnessContrastConfig:
    p: float = prob(0.3)
    brightness: float = num(0.2, 0.0, 1.0)
    contrast: float = num(0.2, 0.0, 1.0)


@dataclass(frozen=True)
class FlipConfig:
    p: float = prob(0.0)


@dataclass(frozen=True)
class NoiseConfig:
    p: float = prob(0.1)
    std: tuple[float, float] = pair((0.02, 0.06), 0.0, 1.0)  # share of the pixel range


@dataclass(frozen=True)
class BlurConfig:
    p: float = prob(0.0)
    limit: int = num(3, 3, 31)  # largest kernel size, odd


@dataclass(frozen=True)
class AugmentConfig:
    rotate: RotateConfig = field(default_factory=RotateConfig)
    crop: CropConfig = field(default_factory=CropConfig)
    shear: ShearConfig = field(default_factory=ShearConfig)
    hsv: HsvConfig = field(default_factory=HsvConfig)
    brightness_contrast: BrightnessContrastConfig = field(default_factory=BrightnessContrastConfig)
    hflip: FlipConfig = field(default_factory=FlipConfig)
    vflip: FlipConfig = field(default_factory=FlipConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    blur: BlurConfig = field(default_factory=BlurConfig)
    # class name -> transform names never applied to it (a flip turns a 6 into a 9)
    exclude: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # where training augments: albumentations per sample on CPU workers, or `gpu`: the same
    # policy as batched tensor operations on the training device; auto = gpu on CUDA
    backend: str = choice("auto", "albumentations", "gpu")
    offline_copies: int = num(0, 0, 20)  # augmented copies per training image stored on disk
    preview_rows: int = num(8, 1, 64)
    preview_copies: int = num(6, 1, 16)

    def __post_init__(self) -> None:
        names = transform_names()
        for class_name, excluded in self.exclude.items():
            for name in excluded:
                if name not in names:
                    raise PipelineError(
                        f"augment.exclude.{class_name}: unknown transform {name!r}; "
                        f"allowed: {', '.join(names)}"
                    )


def transform_names() -> tuple[str, ...]:
    """The transform sections of `augment`, in the order they are applied."""
    return (
        "crop",
        "rotate",
        "shear",
        "hflip",
        "vflip",
        "hsv",
        "brightness_contrast",
        "noise",
        "blur",
    )


BACKBONE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")


@dataclass(frozen=True)
class ModelConfig:
    # resnet: the small residual CNN the next keys shape; any other value names a timm model
    # (pipeline/training/backbones.py), e.g. efficientnet_lite0, resnet18, convnext_atto
    backbone: str = "resnet"
    # timm backbones: none (random init) | imagenet (timm's weights, through the Hugging Face
    # cache) | the path of a file holding a state dict in timm's key names
    weights: str = "none"
    # pretrained backbones: train a linear head on frozen features (true), or fine-tune the
    # whole network with the body at body_lr * the learning rate (false)
    frozen: bool = False
    body_lr: float = num(0.1, 0.0, 1.0)
    width: int = num(16, 4, 512)  # channels of the first stage; doubled at every next stage
    blocks: tuple[int, ...] = num((1, 1, 1), 0, 16)  # residual blocks per stage
    kernel_size: int = num(3, 1, 7)
    norm: str = choice("batch", "group", "none")
    dropout: float = num(0.2, 0.0, 0.9)
    activation: str = choice("relu", "leaky_relu")

    def __post_init__(self) -> None:
        if not BACKBONE_NAME.fullmatch(self.backbone):
            raise PipelineError(
                f"train.model.backbone: {printable(self.backbone)} is not a model name: resnet, "
                f"or a timm model such as efficientnet_lite0"
            )
        if not self.weights or "\x00" in self.weights:
            raise PipelineError("train.model.weights: none, imagenet or the path of a file")
        if self.backbone == "resnet" and self.weights != "none":
            raise PipelineError(
                f"train.model.weights: {printable(self.weights)} needs a timm backbone; the "
                f"resnet backbone trains from scratch (weights: none)"
            )
        if self.frozen and not self.pretrained:
            raise PipelineError(
                "train.model.frozen: a frozen backbone needs pretrained weights "
                "(train.model.weights: imagenet or a file)"
            )

    @property
    def pretrained(self) -> bool:
        """A timm backbone with weights to start from."""
        return self.backbone != "resnet" and self.weights != "none"


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: str = choice("adamw", "adam", "sgd")
    lr: float = num(3e-3, 0.0, 10.0, open_lo=True)
    betas: tuple[float, float] = num((0.9, 0.999), 0.0, 0.9999)
    momentum: float = num(0.9, 0.0, 0.9999)  # SGD only
    weight_decay: float = num(5e-4, 0.0, 1.0)  # L2
    l1: float = num(0.0, 0.0, 1.0)  # L1 penalty on weights, added to the loss
    # Against the wrong labels cleaning misses: soft targets, and mixup (Zhang et al. 2018),
    # which blends pairs of images and their labels; both keep a model from memorizing a label.
    label_smoothing: float = num(0.0, 0.0, 0.5)
    mixup: float = num(0.4, 0.0, 10.0)  # Beta(a, a) mixing weights; 0 = off
    batch_size: int = num(64, 1, 65536)
    epochs: int = num(20, 1, 10000)
    # At least this many optimizer steps in all: a small set is passed over several times per
    # epoch, so a few hundred images are trained as long as a few thousand.
    min_steps: int = num(3000, 0, 10_000_000)
    schedule: str = choice("cosine", "constant", "step", "exponential")
    step_every: int = num(5, 1)  # epochs between decays ("step")
    gamma: float = num(0.5, 0.0, 1.0, open_lo=True)  # decay factor ("step", "exponential")
    monitor: str = choice("val_loss", "val_acc")  # what early stopping and top-k rank by
    patience: int = num(6, 1)  # epochs without improvement before stopping
    top_k: int = num(3, 1, 100)  # checkpoints averaged into the round's prediction
    num_workers: int = num(0, 0, 64)  # DataLoader workers (CPU: 0 is fastest on small images)
    compile: bool = False  # torch.compile the model for training
    nproc: int = num(1, 1, 64)  # processes under torchrun (one per GPU; gloo on CPU)
    # timm backbones: each round also trains the CNN train.model shapes (resnet) on the same
    # rows, its input averaged down to 32 px, and keeps whichever scores higher on validation
    # | none: the backbone alone. Not under train.model, which the clean stage reads.
    fallback: str = choice("resnet", "none")

    def __post_init__(self) -> None:
        if self.model.frozen and self.nproc > 1:
            raise PipelineError(
                "train.nproc: a frozen backbone's round trains in one process (its linear "
                "head, and the CNN beside it); set train.nproc: 1, or train.model.frozen: false "
                "to fine-tune"
            )


@dataclass(frozen=True)
class CleanConfig:
    folds: int = num(5, 2, 20)
    # K-fold models share train.model but have their own short recipe, so tuning the final
    # model's optimizer (train.lr, ...) does not rerun cleaning.
    epochs: int = num(12, 1, 1000)
    # At least this many optimizer steps per fold. With several budgets the K-fold runs once
    # per budget and keeps the one whose out-of-fold predictions agree best with the given
    # labels: too long a run memorizes the wrong labels it should find, too short a one is
    # underfit, and which happens depends on the data.
    min_steps: tuple[int, ...] = budgets((150, 600), 0, 10_000_000)
    lr: float = num(3e-3, 0.0, 10.0, open_lo=True)
    weight_decay: float = num(5e-4, 0.0, 1.0)  # AdamW, cosine schedule
    batch_size: int = num(64, 1, 65536)
    mixup: float = num(0.4, 0.0, 10.0)  # as train.mixup: folds memorize fewer wrong labels
    # The validation split: human-labeled rows carved before cleaning, the same in every round.
    val_fraction: float = num(0.2, 0.0, 0.5)  # of each class's labeled rows
    val_min_per_class: int = num(5, 0, 100000)  # at least this many (at most half the class)
    filter_by: str = choice(
        "prune_by_noise_rate",
        "prune_by_class",
        "both",
        "confident_learning",
        "predicted_neq_given",
        "low_normalized_margin",
        "low_self_confidence",
    )
    policy: str = choice("relabel", "drop", "flag", "relabel_keep")
    relabel_threshold: float = prob(0.9)  # out-of-sample confidence needed to relabel
    # The embedding model: one model trained on the rows cleaning keeps (after the K-fold),
    # whose embeddings are the one space for near-duplicate and outlier checks. Its optimizer
    # steps at least; 0 = none (the K-fold's own embeddings serve).
    embedding_steps: int = num(400, 0, 10_000_000)
    # Above this estimated noise rate the K-fold models are presumed too weak to judge labels:
    # nothing is dropped or relabeled (clean.policy acts as flag) and a warning says why.
    max_noise_rate: float = prob(0.4)
    # near duplicates: cosine distance under this share of the median nearest-neighbour distance
    near_duplicate_ratio: float = num(0.1, 0.0, 1.0)
    outlier_quantile: float = num(0.01, 0.0, 0.5)  # lowest outlier scores flagged
    quality: QualityConfig = field(default_factory=QualityConfig)
    gallery_size: int = num(200, 1, 100000)
    nproc: int = num(1, 1, 64)  # processes under torchrun the K-fold's folds are spread over


@dataclass(frozen=True)
class EvaluateConfig:
    calibration_bins: int = num(10, 2, 100)
    slice_bins: int = num(4, 2, 20)
    gallery_size: int = num(200, 1, 100000)
    nproc: int = num(1, 1, 64)  # processes under torchrun predicting the test images


@dataclass(frozen=True)
class PseudolabelConfig:
    # curriculum: a growing top share of each class's predictions; fixed: tau for every class;
    # flexmatch: tau scaled by how well each class is learned
    policy: str = choice("curriculum", "fixed", "flexmatch")
    threshold: float = prob(0.95)  # fixed tau; flexmatch's upper bound
    min_confidence: float = prob(0.9)  # curriculum: calibrated confidence never admitted below
    share_start: float = prob(0.5)  # curriculum: share of each class admitted for round r001
    share_step: float = prob(0.2)  # curriculum: added per round (one round per pool)
    share_max: float = prob(0.9)  # curriculum: share never exceeded
    per_class_cap: int = num(0, 0)  # most in the set per class (every pool so far); 0 = no cap
    balance: bool = False  # cap classes to the labeled class distribution
    agreement: bool = False  # every ensemble member must predict the same class
    gallery_size: int = num(60, 1, 10000)
    queue_size: int = num(50, 0, 100000)  # to_label.csv: pool images most worth a human label
    nproc: int = num(1, 1, 64)  # processes under torchrun predicting the pool images


@dataclass(frozen=True)
class RoundConfig:
    pool: str = ""  # folder under data/unlabeled/ this round adds
    previous: str = "r000"  # the round whose model labels the pools; r000 trains on humans only


@dataclass(frozen=True)
class ClusterConfig:
    """Where the clean stage's K-fold, training and prediction run: this machine, or a Ray
    cluster (docs/scaling.md)."""

    engine: str = choice("local", "ray")  # ray: pip install -e '.[ray]'
    address: str = AUTO  # ray: the cluster's address; auto: RAY_ADDRESS, else a local instance
    workers: int = num(2, 1, 100_000)  # ray: prediction workers, K-fold tasks, DDP workers
    cpus_per_worker: float = num(1.0, 0.0, 1024.0, open_lo=True)
    gpus_per_worker: float = num(0.0, 0.0, 64.0)

    def __post_init__(self) -> None:
        if not self.address or any(c.isspace() or not c.isprintable() for c in self.address):
            raise PipelineError(
                f"cluster.address: {printable(self.address)} is not an address (auto, "
                f"ray://host:10001 or host:6379)"
            )


@dataclass(frozen=True)
class Params:
    base: BaseConfig = field(default_factory=BaseConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    pseudolabel: PseudolabelConfig = field(default_factory=PseudolabelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    rounds: dict[str, RoundConfig] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, entry in self.rounds.items():
            check_round_key(name, "rounds")
            check_name(entry.pool, f"rounds.{name}.pool", "rename the folder under data/unlabeled/")
            known = entry.previous == "r000" or entry.previous in self.rounds
            if name == "r000" or not known or entry.previous >= name:
                raise PipelineError(
                    f"rounds.{name}: r000 is the round trained on human labels only; each pool "
                    f"round follows r000 or an earlier round (previous: {entry.previous!r}); "
                    f"`python -m pipeline add-pool` writes these entries"
                )
        if self.augment.hsv.p > 0 and self.base.channels not in (AUTO, 3):
            raise PipelineError(
                f"augment.hsv.p: HSV shifts need colour images, and base.channels is "
                f"{self.base.channels} (set by you, or by `auto` for grayscale images); set "
                f"augment.hsv.p: 0, or base.channels: 3 to train grayscale images in RGB"
            )


def with_image_shape(params: Params, shape: tuple[int, ...]) -> Params:
    """`params` with base.image_size and base.channels those of the images ingest packed
    (N, size, size, channels): what an `auto` became. An explicit value that disagrees means
    ingest ran with other params; this says so rather than train on the wrong shape."""
    packed = {"image_size": int(shape[1]), "channels": int(shape[3])}
    as_packed = {"image_size": f"at {shape[1]} px", "channels": f"with {shape[3]} channels"}
    for key, value in packed.items():
        given = getattr(params.base, key)
        if given not in (AUTO, value):
            raise PipelineError(
                f"base.{key} is {given}, but ingest packed the images {as_packed[key]}: "
                f"rerun ingest (`dvc repro`)"
            )
    return dataclasses.replace(params, base=dataclasses.replace(params.base, **packed))


# --------------------------------------------------------------------------------------------
# Loading


def load_params(
    path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None
) -> Params:
    """Read and validate params.yaml; `overrides` maps dotted keys to values (tests, lr-find)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"params file not found: {path} (run from the project root)")
    try:
        raw = read_yaml(path)
    except (YAMLError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    raw = {} if raw is None else raw
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    return parse(Params, raw, path.name)


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = raw
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise PipelineError(f"cannot override {dotted}: {key} is not a mapping")
    node[last] = value
