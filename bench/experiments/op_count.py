"""Operator calls a training step makes: the train stage with the `gpu` backend against the
model-only loop of bench/gpu.py. On a GPU at small image sizes each call is a kernel launch and
launches set the speed, so the ratio of these counts predicts bench/gpu.py's ratio there.

    python bench/experiments/op_count.py [--batch-size 256]

Counts every `aten::` call torch.profiler records on the CPU (nested calls included), for one
step of each, after a warm-up call. On the CPU, `apply` skips the transforms no sample drew; the
path a GPU takes (`by_policy`) is counted on its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from gpu import CLASSES, generate  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from pipeline.core.config import load_params  # noqa: E402
from pipeline.training import feed, loop  # noqa: E402
from pipeline.training.gpu_augment import BatchAugment  # noqa: E402
from pipeline.training.model import build_model  # noqa: E402


def aten_calls(fn) -> int:
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(event.name.startswith("aten::") for event in prof.events())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    params = load_params(
        ROOT / "params.yaml", {"base.image_size": 28, "base.channels": 1, "train.min_steps": 0}
    )
    cfg = dataclasses.replace(params.train, batch_size=args.batch_size, num_workers=0)
    steps = 10
    images, labels = generate(args.batch_size * steps)
    device = torch.device("cpu")
    augment = BatchAugment(params.augment, params.base, CLASSES)
    x, y = torch.from_numpy(images[: args.batch_size]), torch.from_numpy(labels[: args.batch_size])
    generator = torch.Generator().manual_seed(0)
    draws = augment.sample(y, generator, device)
    floats = x.permute(0, 3, 1, 2).float() / 255
    model = build_model(cfg.model, 1, len(CLASSES))
    optimizer = loop.make_optimizer(model, cfg)
    batches = feed.make_feed(
        feed.Samples(images, labels), augment, cfg, device, feed.current_shard()
    )

    def model_only():
        loss = F.cross_entropy(model(floats), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    counts = {
        "augmentation, whole batch (CPU path)": aten_calls(lambda: augment(x, y, generator)),
        "  of which drawing the parameters": aten_calls(
            lambda: augment.sample(y, generator, device)
        ),
        "applying them as on a GPU": aten_calls(
            lambda: augment.apply(floats, draws, generator, by_policy=True)
        ),
        "stage step (gpu backend, CPU path)": aten_calls(
            lambda: loop.train_one_epoch(model, batches.epoch(0), optimizer, cfg, device)
        )
        / steps,
        "model-only step": aten_calls(model_only),
    }
    for name, count in counts.items():
        print(f"{name:<34} {count:>8,.0f}")
    ratio = counts["model-only step"] / counts["stage step (gpu backend, CPU path)"]
    print(f"model-only / stage: {ratio:.2f}")


if __name__ == "__main__":
    main()
