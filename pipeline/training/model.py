"""The residual CNN every stage shares unless `train.model.backbone` names a timm model; its
capacity comes from `train.model`."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.config import ModelConfig, TrainConfig


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    return nn.Identity()


def _activation(kind: str) -> nn.Module:
    # Not in-place: diagnostics hooks read each activation's input (the pre-activation).
    return nn.LeakyReLU(0.01) if kind == "leaky_relu" else nn.ReLU()


class ResidualBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, cfg: ModelConfig):
        super().__init__()
        pad = cfg.kernel_size // 2
        bias = cfg.norm == "none"
        self.conv1 = nn.Conv2d(c_in, c_out, cfg.kernel_size, stride, pad, bias=bias)
        self.norm1 = _norm(cfg.norm, c_out)
        self.act1 = _activation(cfg.activation)
        self.conv2 = nn.Conv2d(c_out, c_out, cfg.kernel_size, 1, pad, bias=bias)
        self.norm2 = _norm(cfg.norm, c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=bias), _norm(cfg.norm, c_out)
            )
        self.act2 = _activation(cfg.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.act2(y + self.shortcut(x))


# The side, in px, of the CNN trained beside a timm backbone (train.fallback): what
# base.image_size auto gives the CNN for photos.
FALLBACK_PX = 32


class ResNet(nn.Module):
    """stem -> stages of residual blocks (stage i: width * 2**i channels) -> pool -> linear.

    With `input_px`, larger inputs are first averaged down to input_px x input_px (the CNN
    trained beside a timm backbone sees that backbone's packed images).
    """

    def __init__(self, cfg: ModelConfig, in_channels: int, num_classes: int, input_px: int = 0):
        super().__init__()
        self.input_px = input_px
        pad = cfg.kernel_size // 2
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, cfg.width, cfg.kernel_size, 1, pad, bias=cfg.norm == "none"),
            _norm(cfg.norm, cfg.width),
            _activation(cfg.activation),
        )
        blocks: list[nn.Module] = []
        c_in = cfg.width
        for stage, n_blocks in enumerate(cfg.blocks):
            c_out = cfg.width * 2**stage
            for i in range(n_blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(ResidualBlock(c_in, c_out, stride, cfg))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(c_in, num_classes)
        self.embedding_dim = c_in

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, embedding_dim): used for duplicates and outliers."""
        if self.input_px:
            x = average_down(x, self.input_px)
        return self.pool(self.blocks(self.stem(x))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.embed(x)))


def build_model(
    cfg: ModelConfig,
    in_channels: int,
    num_classes: int,
    *,
    pretrained: bool = False,
    input_px: int = 0,
) -> nn.Module:
    """train.model's network: the CNN above (averaging its input down to `input_px` when set),
    or a timm backbone (pipeline/training/backbones.py) with its starting weights when
    `pretrained` (a model about to load a checkpoint skips them).

    Every model has embed(x) -> (N, embedding_dim), head (a Linear) and embedding_dim.
    """
    if cfg.backbone == "resnet":
        return ResNet(cfg, in_channels, num_classes, input_px)
    from pipeline.training.backbones import TimmNet

    return TimmNet(cfg, in_channels, num_classes, load=pretrained)


def average_down(x: torch.Tensor, px: int) -> torch.Tensor:
    """(N, C, H, W) larger than px averaged down to (N, C, px, px) (area averaging); smaller
    inputs unchanged. The one rule for the CNN beside a backbone, in training and prediction."""
    if x.shape[-1] <= px:
        return x
    return F.interpolate(x, size=(px, px), mode="area")


def downsample(images: np.ndarray, px: int, *, batch: int = 256) -> np.ndarray:
    """Images (N, H, W, C) uint8 averaged down to px x px, as ResNet.embed averages its input
    (rounded back to uint8): the CNN beside a backbone trains and augments at its own size."""
    if images.shape[1] <= px:
        return np.ascontiguousarray(images)
    out = np.empty((len(images), px, px, images.shape[3]), np.uint8)
    for start in range(0, len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch]))
        x = average_down(x.permute(0, 3, 1, 2).float(), px)
        out[start : start + batch] = x.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    return out


def fallback_cnn(cfg: TrainConfig) -> ModelConfig | None:
    """The CNN trained beside cfg.model's timm backbone (train.fallback), or None."""
    if cfg.model.backbone == "resnet" or cfg.fallback == "none":
        return None
    return dataclasses.replace(cfg.model, backbone="resnet", weights="none", frozen=False)
