"""Training and inference throughput: the pipeline's loop vs a bare PyTorch loop, side by side.

Same model (train.model from params.yaml), batch size, albumentations policy and data
(generated 28x28 images). The stage's `fit` adds seeding, diagnostics (gradient norms,
update ratios, activation statistics) and its DataLoader; the bare loop has none of that.
Runs alternate (stage, bare, stage, bare, ...) and the best of each is kept, so background
load hits both alike. A third line runs the stage with the `gpu` augmentation backend (the
same policy as batched tensor operations) on whatever device there is, against the same bare
loop. Prints a table and writes JSON. On CUDA it runs there too.

    python bench/train.py [--images 10000] [--epochs 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
from pipeline.core.config import load_params  # noqa: E402
from pipeline.core.device import to_input  # noqa: E402
from pipeline.data import transforms  # noqa: E402
from pipeline.training import ensemble, feed, loop  # noqa: E402
from pipeline.training.gpu_augment import BatchAugment  # noqa: E402
from pipeline.training.model import build_model  # noqa: E402


def stage_precision(device):
    """The stage's dtype on this device (bf16 autocast on CUDA, fp32 on the CPU); with its
    memory format (channels-last model and inputs, on every device) the bare loops compare
    like with like."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def bare_epoch(model, optimizer, images, labels, policy, batch_size, device) -> None:
    model.train()
    order = torch.randperm(len(labels))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size].numpy()
        batch = np.stack([policy(image=images[i])["image"] for i in idx])
        x = to_input(torch.from_numpy(batch), device)
        y = torch.from_numpy(labels[idx]).to(device)
        with stage_precision(device):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


@torch.inference_mode()
def bare_inference(model, images, batch_size, device) -> None:
    model.eval()
    for start in range(0, len(images), batch_size):
        x = to_input(torch.from_numpy(images[start : start + batch_size]), device)
        with stage_precision(device):
            model(x).float().softmax(1)


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train.json")
    args = parser.parse_args()

    # epochs are fixed here: min_steps would stretch a small run
    params = load_params(
        ROOT / "params.yaml", {"base.image_size": 28, "base.channels": 1, "train.min_steps": 0}
    )
    device = device_mod.pick_device()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, args.images).astype(np.int64)
    samples = feed.Samples(images, labels)
    classes = [str(i) for i in range(10)]
    policies = transforms.build_policies(params.augment, params.base, classes)
    cfg = params.train

    batch_augment = BatchAugment(params.augment, params.base, classes)

    def stage_run(augmentation):
        torch.manual_seed(0)
        model = build_model(cfg.model, 1, 10)
        loop.fit(
            model,
            samples,
            None,
            cfg,
            seed=0,
            device=device,
            augmentation=augmentation,
            epochs=args.epochs,
        )

    def bare_run():
        torch.manual_seed(0)
        model = build_model(cfg.model, 1, 10).to(device, memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
        for _ in range(args.epochs):
            bare_epoch(model, optimizer, images, labels, policies[-1], cfg.batch_size, device)

    model = build_model(cfg.model, 1, 10).to(device)

    def stage_infer():
        ensemble.predict_proba([model], images, device, batch_size=1024)

    def bare_infer():
        bare_inference(model, images, 1024, device)

    best = {
        "stage_train": 0.0,
        "bare_train": 0.0,
        "stage_gpu_backend_train": 0.0,
        "stage_infer": 0.0,
        "bare_infer": 0.0,
    }
    work = {
        "stage_train": lambda: stage_run(policies),
        "bare_train": bare_run,
        "stage_gpu_backend_train": lambda: stage_run(batch_augment),
        "stage_infer": stage_infer,
        "bare_infer": bare_infer,
    }
    for _ in range(args.repeats):
        for name, fn in work.items():
            n = args.images * (args.epochs if "train" in name else 1)
            best[name] = max(best[name], n / timed(fn))
    result = {
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "images": args.images,
        "batch_size": cfg.batch_size,
        **{f"{k}_images_per_s": v for k, v in best.items()},
        "train_ratio": best["stage_train"] / best["bare_train"],
        "gpu_backend_train_ratio": best["stage_gpu_backend_train"] / best["bare_train"],
        "inference_ratio": best["stage_infer"] / best["bare_infer"],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(
        f"device {device}, {torch.get_num_threads()} threads, {args.images} images of 28x28, batch {cfg.batch_size}"
    )
    print(
        f"train:     stage {best['stage_train']:8.0f} img/s | bare loop {best['bare_train']:8.0f} img/s | ratio {result['train_ratio']:.3f}"
    )
    print(
        f"train, gpu backend (batched, on {device}): {best['stage_gpu_backend_train']:8.0f} img/s | ratio to the bare loop {result['gpu_backend_train_ratio']:.3f}"
    )
    print(
        f"inference: stage {best['stage_infer']:8.0f} img/s | bare loop {best['bare_infer']:8.0f} img/s | ratio {result['inference_ratio']:.3f}"
    )
    print(f"peak RSS {result['peak_rss_mib']:.0f} MiB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
