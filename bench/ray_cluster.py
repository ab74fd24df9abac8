"""The clean stage's K-fold and pool prediction on Ray (cluster.engine: ray) beside the local
ways to run them, side by side in one run.

    OMP_NUM_THREADS=1 python bench/ray_cluster.py [--kfold-images 2000] [--predict-images 30000]
                                                  [--repeats 2] [--out bench/results/ray_cluster.json]

Generated 28x28 PNGs, ingested once. Each variant runs in its own child process, in turn
(local, torchrun, ray, local, ...) so a load that drifts weighs on all:
  local     one process
  torchrun  2 processes under torchrun on this machine (clean.nproc / pseudolabel.nproc: 2)
  ray       cluster.engine: ray, 2 workers of 1 CPU on a local Ray instance the child starts
            (ray.init, timed apart: the start a stage pays once)
  kfold     pipeline.training.kfold.kfold_pred_probs, the committed clean recipe at one budget
            (5 folds, 12 epochs, at least 150 steps each) over --kfold-images labeled images
  predict   a 3-member ensemble (train.top_k) of the committed model predicts --predict-images
            packed images with members and embeddings, as the pseudolabel stage calls it
Figures: the child's wall time and the call's own, medians of --repeats; speed-ups are local
over each; the outputs are compared with local's (largest difference). Every process runs the
threads OMP_NUM_THREADS gives it: set it to 1, so all use the same threads per worker.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ingest import generate  # noqa: E402
from bench.run import measured  # noqa: E402
from bench.scale import KFOLD_CALL, write_ensemble  # noqa: E402

VARIANTS = {
    "local": {},
    "torchrun": {"nproc": 2},
    "ray": {"cluster": {"engine": "ray", "workers": 2, "cpus_per_worker": 1.0}},
}

START = """
import json, sys, time, numpy as np
from pathlib import Path
from pipeline.core.config import load_params
ingest, variant, n, out = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
nproc = variant.get("nproc", 1)
settings = {f"cluster.{k}": v for k, v in variant.get("cluster", {}).items()}
params = load_params("params.yaml", settings)
ray_start = 0.0
if params.cluster.engine == "ray":
    from pipeline.training.ray_predict import connect
    start = time.perf_counter()
    connect(params.cluster)
    ray_start = time.perf_counter() - start
"""

KFOLD = (
    START
    + """
params = load_params("params.yaml", {**settings, "clean.nproc": nproc, "clean.min_steps": 150})
"""
    + KFOLD_CALL
    + """json.dump({"call_seconds": seconds, "ray_start_seconds": ray_start}, open(out + ".json", "w"))
"""
)

PREDICT = (
    START
    + """
from pipeline.training.ensemble import load_ensemble, predict_packed
ensemble = load_ensemble("model")
start = time.perf_counter()
probs, members, embeddings = predict_packed(ensemble, Path(ingest) / "images", np.arange(n),
    nproc=nproc, beside=Path(out), members=True, embeddings=True, cluster=params.cluster)
seconds = time.perf_counter() - start
np.savez(out + ".npz", probs=probs, members=members, embeddings=embeddings)
json.dump({"call_seconds": seconds, "ray_start_seconds": ray_start}, open(out + ".json", "w"))
"""
)


def compare(tmp: Path, name: str, script: str, n: int, repeats: int) -> dict:
    """One work item (kfold or predict) under every variant, in turn, `repeats` times."""
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(repeats):
        for variant, settings in VARIANTS.items():
            result = str(tmp / f"{name}-{variant}")
            cmd = [sys.executable, "-c", script, "ingest", json.dumps(settings), str(n), result]
            run = measured(cmd, tmp)
            run.pop("peak_rss_mib")  # the child's alone, not its workers'
            run.pop("cpu_seconds")  # Ray's workers are not this child's children
            runs[variant].append(run | json.loads(Path(result + ".json").read_text()))
    local = np.load(tmp / f"{name}-local.npz")

    def median(variant: str, key: str) -> float:
        return float(np.median([r[key] for r in runs[variant]]))

    row = {
        "images": n,
        "threads_per_process": os.environ.get("OMP_NUM_THREADS", "default"),
        "seconds": {v: median(v, "seconds") for v in VARIANTS},
        "call_seconds": {v: median(v, "call_seconds") for v in VARIANTS},
        "ray_start_seconds": median("ray", "ray_start_seconds"),
        "max_difference_from_local": {},
        "runs": runs,
    }
    for variant in ("torchrun", "ray"):
        other = np.load(tmp / f"{name}-{variant}.npz")
        difference = max(float(np.abs(local[k] - other[k]).max()) for k in local.files)
        row["max_difference_from_local"][variant] = difference
        for key in ("seconds", "call_seconds"):
            row[f"speedup_{key}_{variant}"] = row[key]["local"] / row[key][variant]
    sec = row["seconds"]
    print(
        f"{name:<8} {n:>6,} images: 1 process {sec['local']:6.1f} s | torchrun 2 "
        f"{sec['torchrun']:6.1f} s ({row['speedup_seconds_torchrun']:.2f}x) | Ray 2 workers "
        f"{sec['ray']:6.1f} s ({row['speedup_seconds_ray']:.2f}x; Ray's start "
        f"{row['ray_start_seconds']:.1f} s) | max difference "
        f"{max(row['max_difference_from_local'].values()):.3g}",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    skip = "0: skip (and keep what --out holds for it)"
    parser.add_argument("--kfold-images", type=int, default=2000, help=skip)
    parser.add_argument("--predict-images", type=int, default=30_000, help=skip)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/ray_cluster.json")
    args = parser.parse_args()
    os.environ["TQDM_DISABLE"] = "1"
    result = json.loads(args.out.read_text()) if args.out.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        params["base"].update(image_size=28, channels=1)
        (tmp / "params.yaml").write_text(yaml.safe_dump(params))
        generate(tmp / "data", max(args.kfold_images, args.predict_images))
        python = sys.executable
        measured([python, "-m", "pipeline", "ingest", "--data-dir", "data", "--out", "ingest"], tmp)
        write_ensemble(tmp / "model", params, params["train"]["top_k"])
        for name, script, n in (
            ("kfold", KFOLD, args.kfold_images),
            ("predict", PREDICT, args.predict_images),
        ):
            if n > 0:
                result[name] = compare(tmp, name, script, n, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
