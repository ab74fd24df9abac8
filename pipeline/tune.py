"""tune: a jittered log-scale grid over related params, run as DVC experiments.

`dvc exp run --queue -S key=value` queues one experiment per mesh point and `dvc queue start`
runs them: DVC's own experiment engine, not a home-made scheduler. Experiments target
the `train` stage (round r000, human labels only), and the score is its validation accuracy (never the test split). The user's
params.yaml is left unchanged; `--apply NAME` writes a chosen experiment's values into it.

Batch size is locked by default: it changes the noise scale of every step, so the best
learning rate and weight decay move with it and a mesh over lr x batch size mostly measures
that coupling. Tune it on its own, with `--unlock-batch-size`, if you must.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import report
from pipeline.ensemble import load_ensemble
from pipeline.errors import PipelineError
from pipeline.io import Rows, atomic_dir, edit_yaml, read_array, read_json, read_table, write_table

log = logging.getLogger(__name__)

TARGET = "train"
METRICS_FILE = "artifacts/rounds/r000/live/metrics.json"
DEFAULT_METRIC = "ensemble_val_acc"
LOCKED = {"train.batch_size"}


@dataclass(frozen=True)
class Range:
    key: str  # dotted params key, e.g. train.lr
    low: float
    high: float

    @property
    def decades(self) -> float:
        return math.log10(self.high) - math.log10(self.low)


def parse_range(text: str, *, unlock_batch_size: bool = False) -> Range:
    """`train.lr=1e-1:1e-4` -> Range('train.lr', 1e-4, 1e-1); the order of the bounds is free."""
    try:
        key, bounds = text.split("=", 1)
        a, b = (float(v) for v in bounds.split(":"))
    except ValueError:
        raise PipelineError(
            f"--param {text!r}: expected KEY=LOW:HIGH, e.g. train.lr=1e-4:1e-1"
        ) from None
    if a <= 0 or b <= 0 or a == b:
        raise PipelineError(
            f"--param {text!r}: a log-scale range needs two different positive bounds"
        )
    if key in LOCKED and not unlock_batch_size:
        raise PipelineError(
            f"--param {key} is locked (see the README); pass --unlock-batch-size to tune it"
        )
    return Range(key, min(a, b), max(a, b))


def build_mesh(
    ranges: list[Range], per_decade: int, jitter: float, seed: int
) -> list[dict[str, float]]:
    """Every combination of log-spaced values, each point shifted randomly within its cell.

    A range of D decades gets round(D * per_decade) + 1 values (at least 2). With jitter j,
    each coordinate moves uniformly by up to +-j/2 of a cell in log space (clipped to the
    range), so no two runs probe the same value and the mesh covers the space better than a
    fixed grid.
    """
    rng = np.random.default_rng(seed)
    axes = []
    for r in ranges:
        n = max(2, round(r.decades * per_decade) + 1)
        axes.append((r, np.linspace(math.log10(r.low), math.log10(r.high), n), r.decades / (n - 1)))
    points = []
    for combo in itertools.product(*(range(len(values)) for _, values, _ in axes)):
        point = {}
        for (r, values, cell), i in zip(axes, combo):
            log_value = values[i] + rng.uniform(-jitter / 2, jitter / 2) * cell
            # Edge points only move inwards: the user's bounds are bounds.
            log_value = min(max(log_value, math.log10(r.low)), math.log10(r.high))
            point[r.key] = float(f"{10**log_value:.4g}")
        points.append(point)
    return points


def refine_mesh(
    results: pd.DataFrame, keys: list[str], metric: str, *, factor: float = 3.0
) -> tuple[list[dict[str, float]], dict[str, str]]:
    """A finer 3-point-per-param mesh around the best experiment.

    The step is the median log gap between the tried values divided by `factor`. Where the best
    value lies on the border of what was tried, the new points extend past that border
    instead of centering on it. Returns (points, {key: "low"/"high"/""} border flags).
    """
    best = results.loc[results[metric].idxmax()]
    points_per_key, borders = [], {}
    for key in keys:
        logs = np.log10(results[key].astype(float))
        gaps = np.diff(np.unique(np.round(logs, 6)))
        step = (float(np.median(gaps)) if len(gaps) else 1.0) / factor
        center = math.log10(float(best[key]))
        if center <= logs.min() + 1e-9:
            borders[key], offsets = "low", (-2, -1, 0)
        elif center >= logs.max() - 1e-9:
            borders[key], offsets = "high", (0, 1, 2)
        else:
            borders[key], offsets = "", (-1, 0, 1)
        points_per_key.append([float(f"{10 ** (center + o * step):.4g}") for o in offsets])
    points = [dict(zip(keys, combo)) for combo in itertools.product(*points_per_key)]
    return points, borders


# --------------------------------------------------------------------------------------------
# DVC


def dvc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()
        raise PipelineError(
            f"dvc {' '.join(args[:3])} failed: {message[-1] if message else result.returncode}"
        )
    return result


def queue(points: list[dict[str, float]], *, epochs: int | None, prefix: str) -> list[str]:
    """Queue one experiment per point; returns the experiment names."""
    names = []
    for point in points:
        sets = [f"{k}={v}" for k, v in point.items()]
        if epochs:  # a short schedule: exactly these epochs, not stretched to train.min_steps
            sets += [f"train.epochs={epochs}", "train.min_steps=0"]
        name = f"{prefix}-{hashlib.sha1(json.dumps(sets).encode()).hexdigest()[:7]}"
        args = ["exp", "run", "--queue", "-n", name, TARGET]
        for s in sets:
            args += ["-S", s]
        dvc(*args)
        names.append(name)
        log.info("queued %s: %s", name, ", ".join(sets))
    return names


def run_queue(jobs: int, poll: float = 2.0) -> None:
    """Start the queue with `jobs` workers and wait until it is empty."""
    dvc("queue", "start", "-j", str(jobs))
    while True:
        status = dvc("queue", "status", check=False).stdout
        if not any(word in status for word in ("Queued", "Running")):
            break
        time.sleep(poll)
    failed = [line for line in status.splitlines() if "Failed" in line]
    if failed:
        log.warning("%d experiment(s) failed; see `dvc queue logs NAME`", len(failed))


def experiments(metric: str = DEFAULT_METRIC) -> pd.DataFrame:
    """Finished experiments as a table: name, every flattened param, and the metric."""
    shown = json.loads(dvc("exp", "show", "--json").stdout or "[]")
    rows = []
    for entry in shown:
        for exp in entry.get("experiments") or []:
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                metrics = (data.get("metrics") or {}).get(METRICS_FILE, {}).get("data", {})
                if metric not in metrics:
                    continue
                params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
                rows.append(
                    {
                        "name": rev.get("name") or exp.get("name"),
                        **_flatten(params),
                        metric: metrics[metric],
                    }
                )
    return pd.DataFrame(rows)


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# --------------------------------------------------------------------------------------------
# Report and apply


def write_report(
    results: pd.DataFrame, keys: list[str], metric: str, out_dir: Path
) -> pd.DataFrame:
    """Write tune.csv and a heat map of the metric over the first two keys; return the table."""
    table = (
        results[["name", *keys, metric]].sort_values(metric, ascending=False).reset_index(drop=True)
    )
    with atomic_dir(out_dir) as tmp:
        write_table(tmp / "tune.csv", table)
        if len(keys) >= 2:
            plot_heatmap(tmp / "heatmap.png", table, keys[:2], metric)
    return table


def plot_heatmap(path: Path, table: pd.DataFrame, keys: list[str], metric: str) -> None:
    plt = report.pyplot()

    x, y = table[keys[0]].astype(float), table[keys[1]].astype(float)
    fig, ax = plt.subplots(figsize=(6, 5))
    points = ax.scatter(x, y, c=table[metric], s=220, cmap="viridis", edgecolors="k")
    best = table.iloc[0]
    ax.scatter(
        [best[keys[0]]], [best[keys[1]]], marker="*", s=500, c="red", label=f"best: {best['name']}"
    )
    on_border = (x == x.min()) | (x == x.max()) | (y == y.min()) | (y == y.max())
    if on_border.iloc[0]:
        ax.annotate(
            "best lies on the border:\nrefine will extend the mesh",
            (best[keys[0]], best[keys[1]]),
            textcoords="offset points",
            xytext=(10, 10),
            fontsize=8,
        )
    for _, row in table.iterrows():
        ax.annotate(
            f"{row[metric]:.3f}",
            (row[keys[0]], row[keys[1]]),
            fontsize=7,
            ha="center",
            va="center",
            color="white",
        )
    ax.set(
        xscale="log", yscale="log", xlabel=keys[0], ylabel=keys[1], title=f"{metric} (validation)"
    )
    fig.colorbar(points, ax=ax)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def apply(name: str, keys: list[str], params_path: Path, metric: str = DEFAULT_METRIC) -> dict:
    """Write experiment `name`'s values of `keys` into params.yaml (comments kept)."""
    results = experiments(metric)
    match = results[results["name"] == name] if len(results) else results
    if match.empty:
        known = ", ".join(results["name"]) if len(results) else "none"
        raise PipelineError(f"no finished experiment named {name!r}; finished: {known}")
    row = match.iloc[0]
    applied = {key: row[key].item() if hasattr(row[key], "item") else row[key] for key in keys}

    def write(doc) -> None:
        for key, value in applied.items():
            *parents, last = key.split(".")
            node = doc
            for part in parents:
                node = node[part]
            node[last] = value

    edit_yaml(params_path, write)
    return applied


# --------------------------------------------------------------------------------------------
# Ensembles across runs


def fetch_models(
    names: list[str], dest: Path, model_path: str = "artifacts/rounds/r000/model"
) -> list[Path]:
    """Copy each finished experiment's checkpoint ensemble out of DVC's cache into dest/<name>."""
    from dvc.fs import DVCFileSystem

    shown = json.loads(dvc("exp", "show", "--json").stdout or "[]")
    revs = {
        rev.get("name") or exp.get("name"): rev["rev"]
        for entry in shown
        for exp in entry.get("experiments") or []
        for rev in exp.get("revs") or []
    }
    folders = []
    for name in names:
        if name not in revs:
            raise PipelineError(
                f"no experiment named {name!r}; known: {', '.join(sorted(revs)) or 'none'}"
            )
        target = dest / name
        DVCFileSystem(url=".", rev=revs[name]).get(model_path, str(target), recursive=True)
        folders.append(target)
    return folders


def ensemble_runs(model_dirs: list[Path], ingest_dir: Path, val_path: Path) -> pd.DataFrame:
    """Validation accuracy of each run's checkpoint ensemble and of all of them averaged; the
    combined result's test accuracy, reported once (runs are compared on validation only)."""
    classes = read_json(ingest_dir / "classes.json")
    manifest = read_table(ingest_dir / "manifest.csv")
    images = read_array(ingest_dir / "images")
    val = read_table(val_path)
    val = val[val["scored"] == "True"]
    test = manifest[manifest["split"] == "test"]
    splits = {
        name: (
            Rows(images, t["row"].astype(int).to_numpy()),
            t["label"].map(classes.index).to_numpy(),
        )
        for name, t in (("val", val), ("test", test))
    }
    rows, probs = [], {"val": [], "test": []}
    for folder in model_dirs:
        ensemble = load_ensemble(folder)
        if ensemble.classes != classes:
            raise PipelineError(f"{folder} was trained on other classes than {ingest_dir}")
        for name, (x, _) in splits.items():
            probs[name].append(ensemble.predict(x))
        labels = splits["val"][1]
        rows.append(
            {
                "run": folder.name,
                "val_accuracy": float((probs["val"][-1].argmax(1) == labels).mean()),
            }
        )
    combined = {
        name: float((np.mean(probs[name], axis=0).argmax(1) == labels).mean())
        for name, (_, labels) in splits.items()
    }
    rows.append(
        {
            "run": "ensemble of all",
            "val_accuracy": combined["val"],
            "test_accuracy": combined["test"],
        }
    )
    table = pd.DataFrame(rows)
    table["val_gain_over_best_single"] = combined["val"] - table["val_accuracy"].iloc[:-1].max()
    return table
