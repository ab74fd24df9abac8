"""Pool prediction on Ray (cluster.engine: ray) beside one local process, in one run.

    OMP_NUM_THREADS=1 python bench/ray_predict.py [--images 30000] [--repeats 2]
                                                  [--out bench/results/ray_predict.json]

On --images generated 28x28 PNGs, ingested once, a 3-member ensemble (train.top_k) of the
committed model predicts every packed image with members and embeddings, as the pseudolabel
stage calls it (ensemble.predict_packed), each run in its own child process, alternating:
  local  one process
  ray    cluster.engine: ray with 2 workers of 1 CPU, on a local Ray instance the child starts
         (ray.init; its start is timed apart: the overhead a stage pays once)
Figures: the child's wall time and the prediction call's own, medians of --repeats; the
speed-up is local over Ray; the outputs are compared (largest difference). Every process runs
the threads OMP_NUM_THREADS gives it: set it to 1, so both sides use the same threads per worker.
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
from bench.scale import write_ensemble  # noqa: E402

PREDICT = """
import json, sys, time, numpy as np
from pathlib import Path
from pipeline.core.config import ClusterConfig
from pipeline.training.ensemble import load_ensemble, predict_packed
ingest, variant, n, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
ensemble = load_ensemble("model")
cluster, ray_start = None, 0.0
if variant == "ray":
    from pipeline.training.ray_predict import connect
    cluster = ClusterConfig(engine="ray", workers=2, cpus_per_worker=1.0)
    start = time.perf_counter()
    connect(cluster)
    ray_start = time.perf_counter() - start
start = time.perf_counter()
probs, members, embeddings = predict_packed(ensemble, Path(ingest) / "images", np.arange(n),
    members=True, embeddings=True, cluster=cluster)
seconds = time.perf_counter() - start
np.savez(out + ".npz", probs=probs, members=members, embeddings=embeddings)
json.dump({"call_seconds": seconds, "ray_start_seconds": ray_start}, open(out + ".json", "w"))
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=30_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/ray_predict.json")
    args = parser.parse_args()
    os.environ["TQDM_DISABLE"] = "1"
    runs: dict[str, list[dict]] = {"local": [], "ray": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        params["base"].update(image_size=28, channels=1)
        (tmp / "params.yaml").write_text(yaml.safe_dump(params))
        generate(tmp / "data", args.images)
        python = sys.executable
        measured([python, "-m", "pipeline", "ingest", "--data-dir", "data", "--out", "ingest"], tmp)
        write_ensemble(tmp / "model", params, params["train"]["top_k"])
        for _ in range(args.repeats):
            for variant in runs:
                result = str(tmp / variant)
                cmd = [python, "-c", PREDICT, "ingest", variant, str(args.images), result]
                run = measured(cmd, tmp)
                run.pop("peak_rss_mib")  # the child's alone, not its Ray workers'
                run.pop("cpu_seconds")  # Ray's workers are not this child's children
                runs[variant].append(run | json.loads(Path(result + ".json").read_text()))
        local, ray = (np.load(tmp / f"{variant}.npz") for variant in runs)
        difference = max(float(np.abs(local[k] - ray[k]).max()) for k in local.files)

    def median(variant: str, key: str) -> float:
        return float(np.median([r[key] for r in runs[variant]]))

    result = {
        "images": args.images,
        "threads_per_process": os.environ.get("OMP_NUM_THREADS", "default"),
        "seconds": {v: median(v, "seconds") for v in runs},
        "call_seconds": {v: median(v, "call_seconds") for v in runs},
        "ray_start_seconds": median("ray", "ray_start_seconds"),
        "max_difference": difference,
        "runs": runs,
    }
    result["speedup_seconds"] = result["seconds"]["local"] / result["seconds"]["ray"]
    result["speedup_call_seconds"] = result["call_seconds"]["local"] / result["call_seconds"]["ray"]
    sec, call = result["seconds"], result["call_seconds"]
    print(
        f"pool prediction, {args.images:,} images: 1 local process {sec['local']:.1f} s (call "
        f"{call['local']:.1f} s) | Ray, 2 workers {sec['ray']:.1f} s (call {call['ray']:.1f} s, "
        f"Ray's start {result['ray_start_seconds']:.1f} s) | speed-up "
        f"{result['speedup_seconds']:.2f}x (call {result['speedup_call_seconds']:.2f}x) | max "
        f"difference {difference:.3g}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
