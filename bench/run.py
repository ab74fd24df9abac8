"""The benchmark suite: every performance figure, measured side by side in one run.

    python bench/run.py [--quick] [--out bench/results/all.json]

Sections, in order:
  ingest   images/s and peak RSS at 10k and 100k generated 28x28 PNGs (bench/ingest.py)
  train    the train stage and its inference vs a bare PyTorch loop, both augmentation
           backends, 10k images (bench/train.py)
  stages   wall time and peak RSS of each stage's command on the 100k set (1 epoch, 2 folds)
  clean    the clean stage's time split: K-fold training vs the cleanlab part, 1k and 5k images,
           and a round's pool re-scoring (the top-k ensemble) per 1k images beside the K-fold
  dvc      the demo project in a clone of the committed repository, with the `dvc` command:
           full `dvc repro`, no-op `dvc repro` beside `dvc status`, and the incremental run
           after `add-pool` relative to the full run
Prints a table of figures against the targets and writes JSON. `--quick` shrinks every size
(a check that the suite runs, not figures to record); `--sections stages dvc` reruns only
those, updating their figures in the last run's JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")
GIT_IDENTITY = {
    f"GIT_{who}_{what}": value
    for who in ("AUTHOR", "COMMITTER")
    for what, value in (("NAME", "bench"), ("EMAIL", "bench@example.invalid"))
}
RESULTS = ROOT / "bench" / "results"
SECTIONS = ("ingest", "train", "stages", "clean", "files", "dvc")


def measured(cmd: list[str], cwd: Path) -> dict:
    """Run cmd; its wall seconds, its own peak RSS (os.wait4: this child only) and the CPU
    seconds of it and every process it waited for (torchrun's workers too)."""
    log = tempfile.TemporaryFile()
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=cwd, stdout=log, stderr=log, env={**os.environ, **GIT_IDENTITY}
    )
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        log.seek(0)
        raise SystemExit(f"{' '.join(cmd)} failed:\n{log.read().decode()[-3000:]}")
    return {
        "seconds": seconds,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
    }


def script(name: str, *args: str, results: Path) -> list:
    out = results / f"{name}.json"
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / f"{name}.py"), *args, "--out", str(out)], check=True
    )
    return json.loads(out.read_text())


# --------------------------------------------------------------------------------------------


def bench_stages(data_dir: Path, work: Path) -> dict:
    """Each stage's command on the generated set, with a short recipe: time and peak RSS."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["base"].update(image_size=28, channels=1)
    params["clean"].update(folds=2, epochs=1, min_steps=0)
    params["train"].update(epochs=1, min_steps=0)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    run = [sys.executable, "-m", "pipeline"]
    art = work / "artifacts"
    steps = {
        "ingest": [*run, "ingest", "--data-dir", str(data_dir), "--out", str(art / "ingest")],
        "clean": [*run, "clean", "--ingest", str(art / "ingest"), "--data-dir", str(data_dir), "--out", str(art / "clean")],
        "augment": [*run, "augment", "--table", str(art / "clean/train.csv"), "--ingest", str(art / "ingest"), "--out", str(art / "augment")],
        "train": [*run, "train", "--table", str(art / "clean/train.csv"), "--val", str(art / "clean/val.csv"), "--ingest", str(art / "ingest"), "--augment", str(art / "augment"), "--model", str(art / "model"), "--report", str(art / "reports/r000/train"), "--live", str(art / "live")],
        "evaluate": [*run, "evaluate", "--model", str(art / "model"), "--ingest", str(art / "ingest"), "--out", str(art / "reports/r000/evaluate")],
    }  # fmt: skip
    out = {}
    for name, cmd in steps.items():
        out[name] = measured(cmd, work)
        print(
            f"  {name}: {out[name]['seconds']:.0f} s, peak RSS {out[name]['peak_rss_mib']:.0f} MiB",
            flush=True,
        )
    ingested = json.loads((art / "ingest" / "metrics.json").read_text())
    out["images"] = ingested["train_images"] + ingested["test_images"]
    return out


def bench_clean_split(sizes: list[int]) -> list[dict]:
    """The clean stage's two halves, timed separately on generated images, and what a round's
    re-scoring of the pools costs per 1k images beside them."""
    from bench.gpu import generate
    from pipeline.core.config import load_params
    from pipeline.core.device import pick_device
    from pipeline.data import label_issues
    from pipeline.training.ensemble import predict_proba
    from pipeline.training.kfold import kfold_pred_probs
    from pipeline.training.model import build_model

    params = load_params(ROOT / "params.yaml", {"base.image_size": 28, "base.channels": 1})
    classes = [str(i) for i in range(10)]
    rows = []
    for n in sizes:
        images, labels = generate(n, seed=1)
        start = time.perf_counter()
        probs, embeddings, _ = kfold_pred_probs(images, labels, 10, params, classes)
        kfold = time.perf_counter() - start
        start = time.perf_counter()
        label_issues.find_issues(labels, probs, filter_by=params.clean.filter_by)
        label_issues.near_duplicates(embeddings, params.clean.near_duplicate_ratio)
        label_issues.outlier_scores(embeddings)
        cleanlab_part = time.perf_counter() - start
        total = kfold + cleanlab_part
        # a round's re-scoring: the top-3 ensemble over every pool image so far, with the
        # members' probabilities and embeddings pseudolabel reads (inference mode, 1024 a batch)
        models = [build_model(params.train.model, 1, 10) for _ in range(params.train.top_k)]
        start = time.perf_counter()
        predict_proba(models, images, pick_device(), members=True, embeddings=True)
        rescoring = time.perf_counter() - start
        rows.append(
            {
                "images": n,
                "kfold_seconds": kfold,
                "cleanlab_seconds": cleanlab_part,
                "kfold_share": kfold / total,
                "kfold_seconds_per_1k": kfold / n * 1000,
                "rescoring_seconds_per_1k": rescoring / n * 1000,
            }
        )
        print(
            f"  clean {n}: K-fold {kfold:.1f} s, cleanlab {cleanlab_part:.2f} s; "
            f"re-scoring {rescoring:.2f} s",
            flush=True,
        )
    return rows


def bench_file_passes(sizes: list[int]) -> list[dict]:
    """What reading the original files again adds: ingest's near-copy pass (signatures and both
    searches) and clean's CleanVision checks, on generated 28x28 PNGs."""
    from PIL import Image

    from bench.gpu import generate
    from pipeline.core.config import load_params
    from pipeline.data import images as imaging
    from pipeline.data import near_copies, quality

    params = load_params(ROOT / "params.yaml")
    rows = []
    for n in sizes:
        images, _ = generate(n, seed=1)
        with tempfile.TemporaryDirectory() as tmp:
            paths = [Path(tmp) / f"{i}.png" for i in range(n)]
            for path, image in zip(paths, images):
                Image.fromarray(image[:, :, 0]).save(path)
            start = time.perf_counter()
            looks = np.stack([imaging.signature(Image.open(p)) for p in paths])
            near_copies.near_copy_cutoff(looks, 0.2, 0.1, seed=0)
            near_copies.nearest(looks[n // 5 :], looks[: n // 5])
            near_copies.nearest(looks[n // 5 :], looks[n // 5 :], exclude_self=True)
            near = time.perf_counter() - start
            start = time.perf_counter()
            quality.image_issues(paths, params.clean.quality, 1)  # grayscale PNGs
            checks = time.perf_counter() - start
        rows.append({"images": n, "near_copy_seconds": near, "cleanvision_seconds": checks})
        print(f"  {n} files: near copies {near:.2f} s, CleanVision {checks:.2f} s", flush=True)
    return rows


def bench_dvc(work: Path, new_pool_images: int) -> dict:
    """The demo project as a user meets it: a clone of the committed repository (its .dvc/config,
    analytics off), `python -m pipeline demo-data`, then the `dvc` command: full, no-op and
    post-add-pool `dvc repro`. Beside the no-op repro, in the same run: `dvc status`, and the
    same no-op repro as `python -m dvc` in a copy made with a fresh `dvc init` (analytics on),
    the way this suite measured it before."""
    env = {**os.environ, **GIT_IDENTITY}
    subprocess.run(["git", "clone", "-q", str(ROOT), str(work)], check=True, env=env)
    dvc = [str(Path(sys.executable).with_name("dvc"))]  # the console script a user types
    subprocess.run([sys.executable, "-m", "pipeline", "demo-data"], cwd=work, check=True, capture_output=True, env=env)  # fmt: skip
    full = measured([*dvc, "repro"], work)
    print(f"  full dvc repro: {full['seconds']:.0f} s", flush=True)
    fresh = work.parent / "fresh_init"  # the same finished project, .dvc/ made anew
    shutil.copytree(work, fresh, ignore=shutil.ignore_patterns(".dvc"))
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q", "-f"], cwd=fresh, check=True, capture_output=True, env=env)  # fmt: skip
    shutil.copytree(work / ".dvc" / "cache", fresh / ".dvc" / "cache")
    figures = {"noop": [], "status": [], "noop_fresh_init": []}
    for _ in range(3):  # interleaved, so background load hits all three alike
        figures["noop"].append(measured([*dvc, "repro"], work)["seconds"])
        figures["status"].append(measured([*dvc, "status"], work)["seconds"])
        figures["noop_fresh_init"].append(
            measured([sys.executable, "-m", "dvc", "repro"], fresh)["seconds"]
        )
    noop, status, noop_fresh = (min(v) for v in figures.values())
    print(
        f"  no-op dvc repro: {noop:.2f} s (dvc status {status:.2f} s; python -m dvc repro "
        f"after a fresh dvc init {noop_fresh:.2f} s)",
        flush=True,
    )
    incoming = work.parent / "new_pool"
    incoming.mkdir()
    from PIL import Image

    from bench.gpu import generate

    images, _ = generate(new_pool_images, seed=7)
    for i, image in enumerate(images):
        Image.fromarray(image[..., 0]).resize((8, 8)).save(incoming / f"new_{i:04d}.png")
    subprocess.run([sys.executable, "-m", "pipeline", "add-pool", str(incoming)], cwd=work, check=True, capture_output=True, env=env)  # fmt: skip
    incremental = measured([*dvc, "repro"], work)
    print(f"  dvc repro after add-pool: {incremental['seconds']:.0f} s", flush=True)
    return {
        "full_repro_seconds": full["seconds"],
        "noop_repro_seconds": noop,
        "status_seconds": status,
        "noop_repro_fresh_init_python_m_seconds": noop_fresh,
        "add_pool_repro_seconds": incremental["seconds"],
        "add_pool_over_full": incremental["seconds"] / full["seconds"],
    }


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the suite runs")
    parser.add_argument(
        "--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="default: all"
    )
    parser.add_argument(
        "--out", type=Path, help="default: bench/results/all.json (quick: a temporary folder)"
    )
    args = parser.parse_args()
    quick = args.quick
    out = args.out or (
        Path(tempfile.mkdtemp(prefix="bench-quick-")) / "all.json"
        if quick
        else RESULTS / "all.json"
    )
    results = out.parent  # each section's own JSON goes beside the suite's
    results.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    run = set(args.sections)
    # A partial run updates its sections in the last full run's figures.
    result = json.loads(out.read_text()) if run != set(SECTIONS) and out.is_file() else {}
    result.update(
        machine=f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        quick=quick,
    )
    sizes = [1_000, 3_000] if quick else [10_000, 100_000]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "ingest" in run:
            print("ingest", flush=True)
            result["ingest"] = script(
                "ingest", "--sizes", *map(str, sizes), "--keep", str(tmp / "data"), results=results
            )
        if "train" in run:
            print("train", flush=True)
            result["train"] = script(
                "train",
                *("--images", "1000" if quick else "10000", "--repeats", "1" if quick else "3"),
                results=results,
            )
        if "stages" in run:
            print(f"stages on {sizes[-1]:,} images", flush=True)
            if not (tmp / "data").is_dir():
                from bench.ingest import generate

                generate(tmp / "data", sizes[-1])
            (tmp / "stages").mkdir()
            result["stages"] = bench_stages(tmp / "data", tmp / "stages")
        if "clean" in run:
            print("clean time split", flush=True)
            result["clean"] = bench_clean_split([300, 600] if quick else [1_000, 5_000])
        if "files" in run:
            print("passes over the original files", flush=True)
            result["files"] = bench_file_passes([300, 600] if quick else [1_000, 10_000])
        if "dvc" in run:
            print("dvc on the demo project", flush=True)
            (tmp / "demo").mkdir()
            result["dvc"] = bench_dvc(tmp / "demo", 50 if quick else 200)
    result["seconds"] = time.perf_counter() - started
    out.write_text(json.dumps(result, indent=2) + "\n")
    if set(SECTIONS) <= set(result):
        print_table(result)
    print(f"JSON: {out}")


def print_table(r: dict) -> None:
    train, dvc, stages = r["train"], r["dvc"], r["stages"]
    peak = max(v["peak_rss_mib"] for k, v in stages.items() if isinstance(v, dict))
    rows = [
        *(
            (f"ingest {i['images']:,} images", f"{i['images_per_s']:,.0f} img/s, peak RSS {i['peak_rss_mib']:.0f} MiB", "")
            for i in r["ingest"]
        ),
        ("train stage / bare loop (albumentations)", f"{train['train_ratio']:.2f}", ">= 0.9"),
        ("train stage, gpu backend on CPU / bare loop", f"{train['gpu_backend_train_ratio']:.2f}", ""),
        ("inference / bare model(x) loop", f"{train['inference_ratio']:.2f}", ">= 0.9"),
        *(
            (f"stage {k} on {stages['images']:,} images", f"{v['seconds']:.0f} s, peak RSS {v['peak_rss_mib']:.0f} MiB", "< 2048 MiB")
            for k, v in stages.items()
            if isinstance(v, dict)
        ),
        ("largest stage peak RSS", f"{peak:.0f} MiB", "< 2048 MiB"),
        *(
            (f"clean {c['images']:,} images: K-fold / cleanlab", f"{c['kfold_seconds']:.1f} / {c['cleanlab_seconds']:.2f} s ({c['kfold_share']:.0%} K-fold)", "")
            for c in r["clean"]
        ),
        *(
            (f"per 1k images at {c['images']:,}: K-fold / re-scoring", f"{c['kfold_seconds_per_1k']:.1f} / {c['rescoring_seconds_per_1k']:.2f} s", "")
            for c in r["clean"]
            if "rescoring_seconds_per_1k" in c
        ),
        *(
            (f"{f['images']:,} files: near copies / CleanVision", f"{f['near_copy_seconds']:.2f} / {f['cleanvision_seconds']:.2f} s", "")
            for f in r["files"]
        ),
        ("no-op dvc repro (demo, a user's clone)", f"{dvc['noop_repro_seconds']:.2f} s", "< 3 s"),
        ("dvc status (same clone)", f"{dvc.get('status_seconds', float('nan')):.2f} s", ""),
        ("no-op python -m dvc repro, fresh dvc init", f"{dvc.get('noop_repro_fresh_init_python_m_seconds', float('nan')):.2f} s", ""),
        ("dvc repro after add-pool / full", f"{dvc['add_pool_repro_seconds']:.0f} s / {dvc['full_repro_seconds']:.0f} s = {dvc['add_pool_over_full']:.2f}", ""),
        ("full demo dvc repro", f"{dvc['full_repro_seconds']:.0f} s", "< 300 s"),
    ]  # fmt: skip
    width = max(len(a) for a, _, _ in rows)
    print(f"\n{r['machine']}; suite took {r['seconds'] / 60:.1f} min")
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:<48} {target}")


if __name__ == "__main__":
    main()
