"""Pretrained backbones: any timm model as the network every stage trains and predicts with.

`train.model.backbone` names a timm model (`resnet` is the project's own small CNN,
pipeline/training/model.py). `train.model.weights` says where its starting weights come from:
`none` (random), `imagenet` (timm's weights through the Hugging Face cache; with
HF_HUB_OFFLINE=1 from the cache only), or a file holding a state dict in timm's key names
(torch.save or .safetensors). Weights that cannot be had are one PipelineError naming the key,
raised when the model is built, before any work: `check_weights` runs at the start of the clean
and train stages.

`TimmNet` keeps the interface the CNN has (`embed`, `head`, `embedding_dim`): the pipeline's
input (pixels in [-1, 1], pipeline/core/device.py) is normalized inside the network with the
backbone's pretrained mean and std, and grayscale images are repeated to the three channels
the pretrained first layer expects.

timm is an extra (`pip install -e '.[pretrained]'`); it is imported only when a timm backbone is
chosen.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from torch import nn

from pipeline.core.config import ModelConfig
from pipeline.core.errors import PipelineError
from pipeline.core.names import printable

INSTALL = "pip install -e '.[pretrained]'"


def timm_module():
    try:
        import timm
    except ImportError as exc:
        raise PipelineError(
            f"train.model.backbone: timm backbones need timm ({exc}): {INSTALL}"
        ) from None
    return timm


@functools.cache
def pretrained_config(backbone: str) -> dict:
    """timm's pretrained config of `backbone`: input_size, mean, std, interpolation, ...

    Raises PipelineError for a name timm does not know.
    """
    timm = timm_module()
    if not timm.is_model(backbone):
        close = timm.list_models(f"*{backbone.split('_')[0]}*")[:8]
        hint = f"; similar names: {', '.join(close)}" if close else ""
        raise PipelineError(
            f"train.model.backbone: timm has no model {printable(backbone)!r}{hint} "
            f'(`python -c "import timm; print(timm.list_models())"` lists them)'
        )
    body = timm.create_model(backbone, pretrained=False, num_classes=0)
    return dict(body.pretrained_cfg)


def input_size(backbone: str) -> int:
    """The side, in px, the backbone's pretrained weights were trained at (224 for most)."""
    return int(pretrained_config(backbone).get("input_size", (3, 224, 224))[-1])


class TimmNet(nn.Module):
    """A timm body without its classifier -> dropout -> linear head."""

    def __init__(self, cfg: ModelConfig, in_channels: int, num_classes: int, *, load: bool):
        super().__init__()
        timm = timm_module()
        pretrained_config(cfg.backbone)  # a clear error for an unknown name
        self.body = timm.create_model(cfg.backbone, pretrained=False, num_classes=0)
        if load and cfg.weights != "none":
            load_weights(self.body, cfg)
        pc = self.body.pretrained_cfg
        mean = torch.tensor(pc.get("mean", (0.5, 0.5, 0.5)), dtype=torch.float32)
        std = torch.tensor(pc.get("std", (0.5, 0.5, 0.5)), dtype=torch.float32)
        # input x in [-1, 1] is pixel / 255 = (x + 1) / 2; normalized: (pixel - mean) / std
        self.register_buffer("scale", (0.5 / std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", ((0.5 - mean) / std).view(1, -1, 1, 1), persistent=False)
        self.in_channels = in_channels
        self.dropout = nn.Dropout(cfg.dropout)
        self.embedding_dim = int(self.body.num_features)
        self.head = nn.Linear(self.embedding_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (N, embedding_dim) of the body."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.body(x * self.scale + self.shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.embed(x)))


def load_weights(body: nn.Module, cfg: ModelConfig) -> None:
    """cfg.weights into `body` (a timm model without classifier), or one clear PipelineError."""
    if cfg.weights == "imagenet":
        state = _imagenet_state(cfg.backbone)
        what = f"timm's ImageNet weights for {cfg.backbone}"
    else:
        state = read_state_dict(Path(cfg.weights))
        what = printable(cfg.weights)
    mine = body.state_dict()
    state = {k: v for k, v in state.items() if k in mine or not _is_classifier(body, k)}
    missing = sorted(set(mine) - set(state))
    unexpected = sorted(set(state) - set(mine))
    wrong = sorted(
        k for k in set(mine) & set(state) if tuple(mine[k].shape) != tuple(state[k].shape)
    )
    if missing or unexpected or wrong:
        first = (
            f"{len(missing)} tensors missing (first {missing[0]})"
            if missing
            else f"{len(unexpected)} unexpected tensors (first {unexpected[0]})"
            if unexpected
            else f"{wrong[0]} has shape {tuple(state[wrong[0]].shape)}, "
            f"{cfg.backbone} needs {tuple(mine[wrong[0]].shape)}"
        )
        raise PipelineError(
            f"train.model.weights: {what} does not fit timm's {cfg.backbone}: {first}; "
            f"use a state dict saved from timm.create_model({cfg.backbone!r})"
        )
    body.load_state_dict(state, strict=True)


def _is_classifier(body: nn.Module, key: str) -> bool:
    name = body.pretrained_cfg.get("classifier", "classifier")
    names = name if isinstance(name, list | tuple) else [name]
    return any(key == n or key.startswith(f"{n}.") for n in names)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a torch.save file (weights only: no pickled code) or .safetensors."""
    if not path.is_file():
        raise PipelineError(
            f"train.model.weights: no file {printable(str(path))} (none, imagenet, or the path "
            f"of a state dict file, relative to the project)"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PipelineError(
            f"train.model.weights: {printable(str(path))} is not a state dict file "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PipelineError(
            f"train.model.weights: {printable(str(path))} does not hold a state dict "
            f"(a mapping of tensor names to tensors)"
        )
    return state


def cached_imagenet_file(backbone: str) -> Path | None:
    """The file of timm's ImageNet weights for `backbone` in the Hugging Face cache, if there."""
    repo = pretrained_config(backbone).get("hf_hub_id")
    if not repo:
        return None
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):  # the files timm reads
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return Path(found)
    return None


def _imagenet_state(backbone: str) -> dict[str, torch.Tensor]:
    """timm's pretrained weights: from the Hugging Face cache without touching the network, else
    through the hub (unless HF_HUB_OFFLINE), else one clear error."""
    cached = cached_imagenet_file(backbone)
    if cached is not None:
        return read_state_dict(cached)
    timm = timm_module()
    try:
        if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
            raise FileNotFoundError("offline")
        model = timm.create_model(backbone, pretrained=True, num_classes=0)
    except Exception as exc:  # offline with an empty cache, a hub error, a model without weights
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        where = (
            "they are not in the Hugging Face cache and HF_HUB_OFFLINE is set"
            if offline
            else ("they are not in the Hugging Face cache and the hub could not be reached")
        )
        raise PipelineError(
            f"train.model.weights: imagenet weights for {backbone} cannot be had: {where} "
            f"({type(exc).__name__}); download them once where the hub is reachable "
            f"(python -c \"import timm; timm.create_model('{backbone}', pretrained=True)\"), "
            f"or set train.model.weights to a state dict file"
        ) from None
    return model.state_dict()


def check_weights(cfg: ModelConfig) -> None:
    """Fail now, with one line, if cfg's backbone or weights cannot be had."""
    if cfg.backbone == "resnet":
        return
    TimmNet(cfg, 3, 2, load=True)
