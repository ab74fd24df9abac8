"""The device and the model input: shared by training, prediction and every stage that runs
a model, so a change to the input scaling reruns exactly those stages."""

from __future__ import annotations

import os

import torch


def pick_device() -> torch.device:
    """cuda:LOCAL_RANK under torchrun on GPUs, cuda alone, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def to_input(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [-1, 1] on `device`, channels-last in memory
    (as loop.fit keeps the model: the faster layout for these convolutions on CPUs and GPUs)."""
    x = batch.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    return x.contiguous(memory_format=torch.channels_last)  # a no-op after this permute
