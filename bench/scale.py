"""How time and memory grow with the number of images: ingest and inference over sharded sets.

    python bench/scale.py [--sizes 10000 100000 300000] [--out bench/results/scale.json]

For each N: generate N 28x28 PNGs (digits upscaled plus noise), then, each in its own child
process so its peak RSS is its own (os.wait4):
  ingest     `python -m pipeline ingest` into sharded .npy files (ingest.shard_mib)
  inference  the ensemble prediction path (ensemble.predict_proba) over every packed image,
             read shard by shard through PackedImages, as evaluate and pseudolabel read them
  epoch      one training epoch (loop.fit, albumentations backend) over min(N, 100k) images
             (the training set is held in memory as uint8: its figures are per image trained)
Then fits time and peak RSS linearly in N (least squares) and prints per-N figures, the
slopes (seconds and MiB per 100k images) and each stage's extrapolation to 1M, 10M, 100M.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ingest import generate  # noqa: E402
from bench.run import measured  # noqa: E402

INFERENCE = """
import sys, torch
from pipeline.config import load_params
from pipeline.io import read_array
from pipeline.model import build_model
from pipeline.ensemble import predict_proba
params = load_params(sys.argv[2], {"train.min_steps": 0, "clean.min_steps": 0})
images = read_array(sys.argv[1])
torch.manual_seed(0)
model = build_model(params.train.model, 1, 10)
probs = predict_proba([model], images, torch.device("cpu"), batch_size=2048)
assert probs.shape == (len(images), 10)
"""

EPOCH = """
import sys, numpy as np, torch
from pipeline.augment import build_policies
from pipeline.config import load_params
from pipeline.io import read_array
from pipeline.model import build_model
from pipeline.feed import Samples
from pipeline.loop import fit
params = load_params(sys.argv[2], {"train.min_steps": 0, "clean.min_steps": 0})
packed = read_array(sys.argv[1])
n = min(len(packed), 100_000)
images = packed[np.arange(n)]
labels = np.random.default_rng(0).integers(0, 10, n)
model = build_model(params.train.model, 1, 10)
policies = build_policies(params.augment, params.base, [str(i) for i in range(10)])
fit(model, Samples(images, labels), None, params.train, seed=0, device=torch.device("cpu"),
    augmentation=policies, epochs=1)
"""


def fit_line(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least-squares slope and intercept."""
    slope, intercept = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)
    return float(slope), float(intercept)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 300_000])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale.json")
    args = parser.parse_args()
    os.environ["TQDM_DISABLE"] = "1"
    rows = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            params = yaml.safe_load((ROOT / "params.yaml").read_text())
            params["base"]["image_size"] = 28
            (tmp / "params.yaml").write_text(yaml.safe_dump(params))
            generate(tmp / "data", n)
            python = sys.executable
            row = {"images": n}
            row["ingest"] = measured(
                [python, "-m", "pipeline", "ingest", "--data-dir", "data", "--out", "ingest"], tmp
            )
            packed = str(tmp / "ingest" / "images")
            row["shards"] = len(
                json.loads((tmp / "ingest/images/index.json").read_text())["shards"]
            )
            row["inference"] = measured([python, "-c", INFERENCE, packed, "params.yaml"], tmp)
            row["epoch"] = measured([python, "-c", EPOCH, packed, "params.yaml"], tmp)
            row["epoch"]["images"] = min(n, 100_000)
            shutil.rmtree(tmp / "data")
        rows.append(row)
        print(
            f"{n:>9,} images ({row['shards']} shards): "
            + " | ".join(
                f"{stage} {row[stage]['seconds']:6.0f} s, {row[stage]['peak_rss_mib']:5.0f} MiB"
                for stage in ("ingest", "inference", "epoch")
            ),
            flush=True,
        )

    fits = {}
    for stage in ("ingest", "inference", "epoch"):
        n_used = [r[stage].get("images", r["images"]) for r in rows]
        time_slope, time_0 = fit_line(n_used, [r[stage]["seconds"] for r in rows])
        rss_slope, rss_0 = fit_line(n_used, [r[stage]["peak_rss_mib"] for r in rows])
        fits[stage] = {
            "seconds_per_100k": time_slope * 1e5,
            "seconds_fixed": time_0,
            "rss_mib_per_100k": rss_slope * 1e5,
            "rss_mib_fixed": rss_0,
            "extrapolated": {
                f"{m:,}": {
                    "seconds": time_0 + time_slope * m,
                    "peak_rss_mib": rss_0 + rss_slope * m,
                }
                for m in (1_000_000, 10_000_000, 100_000_000)
            },
        }
    print("\nfitted growth (least squares over the sizes above)")
    for stage, f in fits.items():
        print(
            f"  {stage:<9} time {f['seconds_per_100k']:7.1f} s per 100k images (+{f['seconds_fixed']:.0f} s fixed); "
            f"peak RSS {f['rss_mib_per_100k']:+6.1f} MiB per 100k images (base {f['rss_mib_fixed']:.0f} MiB)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "fits": fits}, indent=2) + "\n")


if __name__ == "__main__":
    main()
