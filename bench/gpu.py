"""GPU throughput: the train stage with each augmentation backend, and inference, against a
model-only loop on GPU-resident tensors. One command, well under 8 minutes on one GPU.

    python bench/gpu.py [--images 100000] [--batch-size 512] [--epochs 2]

Data: generated 28x28 grayscale images (digits upscaled plus noise), 10 classes, packed as
the ingest stage packs them. Model: `train.model` from params.yaml. For each line:

- model-only: forward, backward and step on batches sliced from one float tensor already on
  the GPU: no augmentation, no data movement; the ceiling for the others;
- stage, gpu backend: `loop.fit` with `augment.backend: gpu` (whole set on the GPU, the
  policy as batched tensor operations), bf16 autocast, channels-last;
- stage, gpu backend + torch.compile (`train.compile: true`);
- stage, albumentations backend: `loop.fit` with per-sample albumentations in DataLoader
  workers (`--workers`, default: the CPU count, at most 16);
- inference: `predict_proba` (the evaluate and pseudolabel path) vs `model(x)` on resident
  tensors under inference_mode.

Each stage line runs one warm-up epoch, then `--epochs` timed epochs. Prints a table with each
line's ratio to model-only (target for the gpu backend: >= 0.8) and writes JSON.
`--device cpu --images 2000` is a dry run of the script itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pipeline.core import device as device_mod  # noqa: E402
from pipeline.core.config import AugmentConfig, load_params  # noqa: E402
from pipeline.core.typed import parse  # noqa: E402
from pipeline.data import transforms  # noqa: E402
from pipeline.training import ensemble, feed, loop  # noqa: E402
from pipeline.training.gpu_augment import BatchAugment  # noqa: E402
from pipeline.training.model import build_model  # noqa: E402

CLASSES = [str(i) for i in range(10)]


def generate(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    base = np.stack(
        [
            np.asarray(Image.fromarray((d * 16).clip(0, 255).astype(np.uint8)).resize((28, 28)))
            for d in digits.images
        ]
    )
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(base), n)
    noise = rng.integers(-20, 21, (n, 28, 28), dtype=np.int16)
    images = np.clip(base[picks].astype(np.int16) + noise, 0, 255).astype(np.uint8)[..., None]
    return images, digits.target[picks].astype(np.int64)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def model_only_train(cfg, images, labels, device, epochs: int) -> float:
    """Images/s of forward+backward+step on resident tensors (after one warm-up epoch)."""
    torch.manual_seed(0)
    model = build_model(cfg.model, 1, 10).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    x_all = device_mod.to_input(torch.from_numpy(images), device)
    y_all = torch.from_numpy(labels).to(device)
    amp = device.type == "cuda"

    def epoch():
        model.train()
        order = torch.randperm(len(y_all), device=device)
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    epoch()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(epochs):
        epoch()
    synchronize(device)
    return len(labels) * epochs / (time.perf_counter() - start)


def same_as_cpu(params, images: np.ndarray, device: torch.device) -> float:
    """Largest pixel difference (of 1) between the gpu backend's images on `device` and on the
    CPU, for the same per-sample draws of every transform (blur up to 5 px; HSV on a colour
    version of the images). On a GPU the policy decides what runs and nothing is read back; on
    the CPU a transform no sample drew is skipped."""
    every = {name: {"p": 0.5} for name in ("crop", "rotate", "shear", "hflip", "vflip")}
    every |= {name: {"p": 0.5} for name in ("hsv", "brightness_contrast", "noise")}
    every["blur"] = {"p": 0.5, "limit": 5}
    aug = parse(AugmentConfig, every, "augment")
    grey = images[:512]
    colour = np.concatenate([grey, grey // 2, 255 - grey], axis=-1)
    worst = 0.0
    for batch in (grey, colour):
        base = dataclasses.replace(params.base, channels=batch.shape[-1])
        augment = BatchAugment(aug, base, CLASSES)
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div(255)
        draws = augment.sample(
            torch.zeros(len(x), dtype=torch.long), torch.Generator().manual_seed(0), x.device
        )
        draws.on["noise"] = torch.zeros_like(draws.on["noise"])  # each device has its own RNG
        moved = dataclasses.replace(
            draws,
            **{
                f.name: getattr(draws, f.name).to(device)
                for f in dataclasses.fields(draws)
                if f.name != "on"
            },
            on={name: mask.to(device) for name, mask in draws.on.items()},
        )
        on_cpu = augment.apply(x, draws, torch.Generator().manual_seed(1))
        on_device = augment.apply(x.to(device), moved, torch.Generator(device).manual_seed(1))
        worst = max(worst, float((on_device.cpu() - on_cpu).abs().max()))
    return worst


def stage_train(cfg, samples, device, epochs: int, augmentation) -> float:
    """Images/s of loop.fit, timed over `epochs` after a warm-up epoch."""
    torch.manual_seed(0)
    model = build_model(cfg.model, 1, 10)
    times = []

    def on_epoch(_record):
        synchronize(device)
        times.append(time.perf_counter())

    loop.fit(
        model,
        samples,
        None,
        cfg,
        seed=0,
        device=device,
        augmentation=augmentation,
        epochs=epochs + 1,
        on_epoch=on_epoch,
    )
    return len(samples) * epochs / (times[-1] - times[0])


@torch.inference_mode()
def model_only_inference(model, images, device, batch_size: int) -> float:
    x_all = device_mod.to_input(torch.from_numpy(images), device)
    model.eval()

    def run():
        for start in range(0, len(x_all), batch_size):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                model(x_all[start : start + batch_size]).float().softmax(1)

    run()
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return len(images) / (time.perf_counter() - start)


def stage_inference(model, images, device, batch_size: int) -> float:
    ensemble.predict_proba([model], images, device, batch_size)
    synchronize(device)
    start = time.perf_counter()
    ensemble.predict_proba([model], images, device, batch_size)
    synchronize(device)
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu.json")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; use --device cpu for a dry run of the script")
    device = torch.device(args.device)
    started = time.perf_counter()

    # epochs are fixed here: min_steps would stretch a small run
    params = load_params(
        ROOT / "params.yaml", {"base.image_size": 28, "base.channels": 1, "train.min_steps": 0}
    )
    cfg = dataclasses.replace(params.train, batch_size=args.batch_size, num_workers=0)
    images, labels = generate(args.images)
    samples = feed.Samples(images, labels)
    batch_augment = BatchAugment(params.augment, params.base, CLASSES)
    policies = transforms.build_policies(params.augment, params.base, CLASSES)

    difference = same_as_cpu(params, images, device)
    print(
        f"  gpu backend on {device.type} vs CPU, same draws: max pixel difference {difference:.2g}"
    )
    rows = {
        "model-only loop (resident tensors)": model_only_train(
            cfg, images, labels, device, args.epochs
        )
    }
    print(f"  model-only: {rows['model-only loop (resident tensors)']:,.0f} img/s", flush=True)
    rows["stage, gpu backend"] = stage_train(cfg, samples, device, args.epochs, batch_augment)
    print(f"  gpu backend: {rows['stage, gpu backend']:,.0f} img/s", flush=True)
    if not args.skip_compile:
        compiled = dataclasses.replace(cfg, compile=True)
        rows["stage, gpu backend + torch.compile"] = stage_train(
            compiled, samples, device, args.epochs, batch_augment
        )
    workers = dataclasses.replace(cfg, num_workers=args.workers)
    rows[f"stage, albumentations backend ({args.workers} workers)"] = stage_train(
        workers, samples, device, 1, policies
    )

    model = build_model(cfg.model, 1, 10).to(device)
    infer = {
        "model-only inference (resident tensors)": model_only_inference(
            model, images, device, 4096
        ),
        "stage inference (predict_proba)": stage_inference(model, images, device, 4096),
    }
    ceiling = rows["model-only loop (resident tensors)"]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(
        f"\n{name}, {args.images:,} images of 28x28, batch {args.batch_size}, torch {torch.__version__}"
    )
    print(f"{'train':<52} {'images/s':>12} {'vs model-only':>14}")
    for key, value in rows.items():
        print(f"{key:<52} {value:>12,.0f} {value / ceiling:>14.2f}")
    print(f"{'inference':<52} {'images/s':>12} {'vs model-only':>14}")
    base = infer["model-only inference (resident tensors)"]
    for key, value in infer.items():
        print(f"{key:<52} {value:>12,.0f} {value / base:>14.2f}")
    elapsed = time.perf_counter() - started
    print(f"\nwhole benchmark: {elapsed:.0f} s")
    result = {
        "device": name,
        "torch": torch.__version__,
        "images": args.images,
        "batch_size": args.batch_size,
        "train_images_per_s": rows,
        "train_ratio_to_model_only": {k: v / ceiling for k, v in rows.items()},
        "inference_images_per_s": infer,
        "inference_ratio": infer["stage inference (predict_proba)"] / base,
        "augment_max_difference_vs_cpu": difference,
        "seconds": elapsed,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
