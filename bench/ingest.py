"""Ingest throughput and peak memory on generated 28x28 PNGs (10k and 100k by default).

Each size is ingested in a fresh child process, so its peak RSS is its own. The figure that
matters is peak RSS minus the process's RSS before ingest started, compared with the size of
the packed array: ingest streams decoded images into a memory-mapped file instead of holding
them as PIL objects, so the overhead must stay bounded as N grows.

    python bench/ingest.py [--sizes 10000 100000] [--out bench/results/ingest.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def generate(data: Path, n: int, seed: int = 0) -> None:
    """n distinct 28x28 grayscale PNGs in 10 class folders (digits upscaled, plus noise)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    base = np.stack(
        [
            np.asarray(Image.fromarray((d * 16).clip(0, 255).astype(np.uint8)).resize((28, 28)))
            for d in digits.images
        ]
    )
    for c in range(10):
        (data / "labeled" / str(c)).mkdir(parents=True, exist_ok=True)
    picks = rng.integers(0, len(base), n)
    for i, k in enumerate(picks):
        noisy = np.clip(base[k].astype(np.int16) + rng.integers(-20, 21, (28, 28)), 0, 255).astype(
            np.uint8
        )
        Image.fromarray(noisy).save(
            data / "labeled" / str(digits.target[k]) / f"img_{i:06d}.png", compress_level=1
        )


def child(data: Path, out: Path) -> None:
    """Run ingest here and print seconds, baseline and peak RSS as JSON."""
    sys.path.insert(0, str(ROOT))
    import os

    os.environ["TQDM_DISABLE"] = "1"
    from pipeline import ingest
    from pipeline.config import load_params

    params = load_params(ROOT / "params.yaml", {"base.image_size": 28})
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    metrics = ingest.run(data, out, params)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n = metrics["train_images"] + metrics["test_images"]
    print(json.dumps({"images": n, "seconds": seconds, "baseline_kib": baseline, "peak_kib": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ingest.json")
    parser.add_argument("--keep", type=Path, help="move the largest generated data folder here")
    parser.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    rows = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "data"
            t0 = time.perf_counter()
            generate(data, n)
            gen = time.perf_counter() - t0
            result = subprocess.run(
                [sys.executable, __file__, "--child", str(data), str(Path(tmp) / "out")],
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(result.stdout.strip().splitlines()[-1])
            if args.keep and n == max(args.sizes):
                shutil.move(data, args.keep)
        array_mib = r["images"] * 28 * 28 / 2**20
        overhead = (r["peak_kib"] - r["baseline_kib"]) / 1024
        rows.append(
            {
                "images": r["images"],
                "images_per_s": r["images"] / r["seconds"],
                "seconds": r["seconds"],
                "peak_rss_mib": r["peak_kib"] / 1024,
                "rss_growth_mib": overhead,
                "packed_array_mib": array_mib,
                "growth_over_array": overhead / array_mib,
                "generate_seconds": gen,
            }
        )
        print(
            f"{r['images']:>7} images: {rows[-1]['images_per_s']:8.0f} img/s, peak RSS {rows[-1]['peak_rss_mib']:.0f} MiB "
            f"(+{overhead:.0f} MiB during ingest; packed array {array_mib:.0f} MiB)",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
