"""How time and memory grow with the number of images: ingest and inference over sharded sets;
and what a second process gains on the clean stage's K-fold and on pool prediction.

    python bench/scale.py [--sizes 10000 100000 300000] [--kfold-images 2000]
                          [--predict-images 30000] [--repeats 2] [--out bench/results/scale.json]

For each N: generate N 28x28 PNGs (digits upscaled plus noise), then, each in its own child
process so its peak RSS is its own (os.wait4):
  ingest     `python -m pipeline ingest` into sharded .npy files (ingest.shard_mib)
  inference  the ensemble prediction path (ensemble.predict_proba) over every packed image,
             read shard by shard through PackedImages, as evaluate and pseudolabel read them
  epoch      one training epoch (loop.fit, albumentations backend) over min(N, 100k) images
             (the training set is held in memory as uint8: its figures are per image trained)
Then fits time and peak RSS linearly in N (least squares) and prints per-N figures, the
slopes (seconds and MiB per 100k images) and each stage's extrapolation to 1M, 10M, 100M.
(`--sizes` with no value skips this part.)

Then, on one more generated set, each at 1 and then 2 processes under torchrun (CPU), side by
side in this run, every process with the threads OMP_NUM_THREADS gives it (set it: unset, one
process takes every core and two take half each):
  kfold    pipeline.training.kfold.kfold_pred_probs with the committed clean recipe at one budget (5 folds, 12
           epochs, at least 150 steps each) over --kfold-images images: clean.nproc 1, then 2
  predict  ensemble.predict_packed with members and embeddings, as the pseudolabel stage calls
           it, by a 3-member ensemble (train.top_k) over --predict-images packed images:
           pseudolabel.nproc 1, then 2
Each figure is the child process's wall time (torchrun's start included) and the call's own,
and the CPU seconds of the child and its processes (the work done, whatever the load),
the median of --repeats runs taken alternately (1, 2, 1, 2, ...) so a drifting load weighs on
both; the speed-up is 1-process time over 2-process time; the outputs are compared (largest
difference: 0 when every process has the same threads).
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
from pipeline.core.config import load_params
from pipeline.core.io import read_array
from pipeline.training.model import build_model
from pipeline.training.ensemble import predict_proba
params = load_params(sys.argv[2], {"train.min_steps": 0, "clean.min_steps": 0})
images = read_array(sys.argv[1])
torch.manual_seed(0)
model = build_model(params.train.model, 1, 10)
probs = predict_proba([model], images, torch.device("cpu"), batch_size=2048)
assert probs.shape == (len(images), 10)
"""

EPOCH = """
import sys, numpy as np, torch
from pipeline.stages.augment import build_policies
from pipeline.core.config import load_params
from pipeline.core.io import read_array
from pipeline.training.model import build_model
from pipeline.training.feed import Samples
from pipeline.training.loop import fit
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


# The K-fold over n labeled images of `ingest` with `params`, timed (`seconds`), its outputs in
# out.npz; shared with bench/ray_cluster.py.
KFOLD_CALL = """
from pipeline.core.io import read_array, read_json, read_table
from pipeline.training.kfold import kfold_pred_probs
classes = read_json(ingest + "/classes.json")
manifest = read_table(ingest + "/manifest.csv")
rows = manifest[manifest["split"] == "train"].sample(n, random_state=0)  # every class
labels = rows["label"].map(classes.index).to_numpy()
images = read_array(ingest + "/images")[rows["row"].astype(int).to_numpy()]
start = time.perf_counter()
probs, embeddings, _ = kfold_pred_probs(images, labels, len(classes), params, classes)
seconds = time.perf_counter() - start
np.savez(out + ".npz", probs=probs, embeddings=embeddings)
"""

KFOLD = (
    """
import json, sys, time, numpy as np
from pipeline.core.config import load_params
ingest, nproc, n, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
params = load_params("params.yaml", {"clean.nproc": nproc, "clean.min_steps": 150})
"""
    + KFOLD_CALL
    + """json.dump({"call_seconds": seconds}, open(out + ".json", "w"))
"""
)

PREDICT = """
import json, sys, time, numpy as np
from pathlib import Path
from pipeline.training.ensemble import load_ensemble, predict_packed
ingest, nproc, n, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
ensemble = load_ensemble("model")
start = time.perf_counter()
probs, members, embeddings = predict_packed(ensemble, Path(ingest) / "images", np.arange(n),
    nproc=nproc, beside=Path(out), members=True, embeddings=True)
seconds = time.perf_counter() - start
np.savez(out + ".npz", probs=probs, members=members, embeddings=embeddings)
json.dump({"call_seconds": seconds}, open(out + ".json", "w"))
"""


def write_ensemble(folder: Path, params: dict, members: int) -> None:
    """A `members`-checkpoint ensemble of untrained models: prediction costs the same."""
    import torch

    from pipeline.core.config import load_params
    from pipeline.core.typed import to_dict
    from pipeline.training.ensemble import save_checkpoint
    from pipeline.training.model import build_model

    cfg = load_params(folder.parent / "params.yaml").train.model
    folder.mkdir()
    files = []
    for k in range(members):
        torch.manual_seed(k)
        files.append({"file": f"epoch_{k:03d}.pt"})
        save_checkpoint(folder / files[-1]["file"], build_model(cfg, 1, 10), {"epoch": k})
    info = {"members": files, "classes": [str(c) for c in range(10)], "model": to_dict(cfg)}
    info.update(channels=1, image_size=params["base"]["image_size"], temperature=1.0)
    (folder / "ensemble.json").write_text(json.dumps(info))


def spread_rows(kfold_images: int, predict_images: int, repeats: int) -> dict:
    """The K-fold and pool prediction at 1 and 2 processes, alternating (1, 2, 1, 2, ...) so a
    load that drifts weighs on both; figures are medians over the repeats."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        params["base"].update(image_size=28, channels=1)
        (tmp / "params.yaml").write_text(yaml.safe_dump(params))
        generate(tmp / "data", max(kfold_images, predict_images))
        python = sys.executable
        measured([python, "-m", "pipeline", "ingest", "--data-dir", "data", "--out", "ingest"], tmp)
        write_ensemble(tmp / "model", params, params["train"]["top_k"])
        for name, script, n in (
            ("kfold", KFOLD, kfold_images),
            ("predict", PREDICT, predict_images),
        ):
            if n <= 0:
                continue
            runs: dict[int, list[dict]] = {1: [], 2: []}
            for _ in range(repeats):
                for nproc in (1, 2):
                    result = str(tmp / f"{name}{nproc}")
                    cmd = [python, "-c", script, "ingest", str(nproc), str(n), result]
                    run = measured(cmd, tmp)
                    del run["peak_rss_mib"]  # this child's alone, not its torchrun processes'
                    runs[nproc].append(run | json.loads(Path(result + ".json").read_text()))
            one, two = (np.load(tmp / f"{name}{k}.npz") for k in (1, 2))
            row = {"images": n, "threads_per_process": os.environ.get("OMP_NUM_THREADS", "default")}
            for key in ("seconds", "call_seconds", "cpu_seconds"):
                medians = [float(np.median([r[key] for r in runs[k]])) for k in (1, 2)]
                row[key] = {"nproc_1": medians[0], "nproc_2": medians[1]}
                row[f"speedup_{key}"] = medians[0] / medians[1]
            row["runs"] = runs
            row["max_difference"] = max(float(np.abs(one[k] - two[k]).max()) for k in one.files)
            out[name] = row
            sec, call = row["seconds"], row["call_seconds"]
            print(
                f"{name:<8} {n:>6,} images: 1 process {sec['nproc_1']:6.1f} s (call "
                f"{call['nproc_1']:6.1f} s) | 2 processes {sec['nproc_2']:6.1f} s (call "
                f"{call['nproc_2']:6.1f} s) | speed-up {row['speedup_seconds']:.2f}x (call "
                f"{row['speedup_call_seconds']:.2f}x) | CPU {row['cpu_seconds']['nproc_1']:.0f} s "
                f"vs {row['cpu_seconds']['nproc_2']:.0f} s | max difference {row['max_difference']:.3g}",
                flush=True,
            )
    return out


def fit_line(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least-squares slope and intercept."""
    slope, intercept = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)
    return float(slope), float(intercept)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000, 300_000])
    parser.add_argument("--kfold-images", type=int, default=2000, help="0: skip")
    parser.add_argument("--predict-images", type=int, default=30_000, help="0: skip")
    parser.add_argument("--repeats", type=int, default=2, help="runs at each process count")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale.json")
    args = parser.parse_args()
    os.environ["TQDM_DISABLE"] = "1"
    rows = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            params = yaml.safe_load((ROOT / "params.yaml").read_text())
            params["base"].update(image_size=28, channels=1)
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
    for stage in ("ingest", "inference", "epoch") if len(rows) > 1 else ():
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
    if fits:
        print("\nfitted growth (least squares over the sizes above)")
    for stage, f in fits.items():
        print(
            f"  {stage:<9} time {f['seconds_per_100k']:7.1f} s per 100k images (+{f['seconds_fixed']:.0f} s fixed); "
            f"peak RSS {f['rss_mib_per_100k']:+6.1f} MiB per 100k images (base {f['rss_mib_fixed']:.0f} MiB)"
        )
    spread = {}
    if args.kfold_images > 0 or args.predict_images > 0:
        print("\n1 and 2 processes under torchrun, side by side")
        spread = spread_rows(args.kfold_images, args.predict_images, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"rows": rows, "fits": fits, "spread": spread}
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
