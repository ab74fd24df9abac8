"""What a pretrained backbone costs per image on this machine, beside the from-scratch CNN.

    python bench/backbone_cost.py [--images 256] [--backbone tf_efficientnet_lite0] [--size 224]

Times, side by side in one run (ratios, not absolute figures, are what to compare on a shared
machine):
  features    the frozen body's forward pass over --images random images at --size px, batches
              of 64 (what clean, train, evaluate and pseudolabel spend per image with
              train.model.frozen); the CNN's pass at 32 px for scale
  fine-tune   one optimizer step of the whole network on a batch of 32 (forward + backward), per
              image: what train.model.frozen: false spends per image and pass

Random weights: the cost does not depend on their values. Needs timm (`.[pretrained]`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

from pipeline.core.config import ModelConfig  # noqa: E402
from pipeline.core.device import to_input  # noqa: E402
from pipeline.training.frozen import features  # noqa: E402
from pipeline.training.model import build_model  # noqa: E402


def per_image(seconds: float, n: int) -> float:
    return 1000 * seconds / n


def time_features(cfg: ModelConfig, size: int, n: int) -> float:
    model = build_model(cfg, 3, 10)
    images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    features(model, images[:64], torch.device("cpu"))  # warm up
    started = time.perf_counter()
    features(model, images, torch.device("cpu"))
    return per_image(time.perf_counter() - started, n)


def time_step(cfg: ModelConfig, size: int, steps: int = 3, batch: int = 32) -> float:
    model = build_model(cfg, 3, 10).train().to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    x = to_input(torch.from_numpy(images), torch.device("cpu"))
    y = torch.zeros(batch, dtype=torch.long)
    started = None
    for step in range(steps + 1):  # the first step warms up
        if step == 1:
            started = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return per_image(time.perf_counter() - started, steps * batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    pretrained = ModelConfig(backbone=args.backbone)
    cnn = ModelConfig()
    rows = [
        (
            f"{args.backbone} features at {args.size} px",
            time_features(pretrained, args.size, args.images),
        ),
        ("resnet (the CNN) features at 32 px", time_features(cnn, 32, args.images)),
        (f"{args.backbone} fine-tune step at {args.size} px", time_step(pretrained, args.size)),
        ("resnet (the CNN) training step at 32 px", time_step(cnn, 32)),
    ]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    for name, ms in rows:
        print(f"{name:55s} {ms:8.2f} ms per image")
    print(f"fine-tune / features at {args.size} px: {rows[2][1] / rows[0][1]:.1f}x")
    print(f"{args.backbone} / CNN features: {rows[0][1] / rows[1][1]:.0f}x")


if __name__ == "__main__":
    main()
