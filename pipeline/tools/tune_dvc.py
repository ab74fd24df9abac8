"""tune's DVC side: trials as queued DVC experiments (`dvc exp run --queue`, `dvc queue start`),
their outcomes read from `dvc exp show --json`, a chosen experiment's values written into
params.yaml (`tune --apply`), and finished experiments' checkpoint ensembles fetched and averaged
(the `ensemble` command). The Optuna study that drives them: pipeline/tools/tune.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.errors import PipelineError
from pipeline.core.io import Rows, edit_yaml, read_array, read_json, read_table
from pipeline.tools.tune import DEFAULT_METRIC, Outcome
from pipeline.training.ensemble import load_ensemble


def metrics_file(round_name: str) -> str:
    return f"artifacts/rounds/{round_name}/live/metrics.json"


def target_stage(round_name: str) -> str:
    return "train" if round_name == "r000" else f"train_round@{round_name}"


# --------------------------------------------------------------------------------------------
# 1) DVC experiments


def dvc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()
        raise PipelineError(
            f"dvc {' '.join(args[:3])} failed: {message[-1] if message else result.returncode}"
        )
    return result


class DvcRunner:
    """Trials as queued DVC experiments of one stage, run by `jobs` queue workers."""

    def __init__(self, stage: str, metrics_path: str, metric: str, jobs: int, poll: float = 3.0):
        self.stage, self.metrics_path, self.metric = stage, metrics_path, metric
        self.jobs, self.poll = jobs, poll

    def queue(self, name: str, sets: list[str]) -> None:
        args = ["exp", "run", "--queue", "-n", name, self.stage]
        for s in sets:
            args += ["-S", s]
        dvc(*args)

    def wait(self, names: list[str]) -> dict[str, Outcome]:
        """Start the queue and wait until none of `names` is queued or running; returns the
        outcome of each of them DVC knows (a name it does not know was never queued)."""
        started = False
        while True:
            shown = json.loads(dvc("exp", "show", "--json").stdout or "[]")
            outcomes = read_outcomes(shown, self.metrics_path, self.metric)
            outcomes = {n: outcomes[n] for n in names if n in outcomes}
            if not any(o.state in ("queued", "running") for o in outcomes.values()):
                return outcomes
            if not started:
                dvc("queue", "start", "-j", str(self.jobs))
                started = True
            time.sleep(self.poll)


def read_outcomes(shown: list, metrics_path: str, metric: str) -> dict[str, Outcome]:
    """Each experiment's state and metric from `dvc exp show --json`.

    A queued or failed experiment carries the baseline's committed metrics file, so only an
    experiment whose run succeeded (or was run outside the queue) has a score.
    """
    out = {}
    for entry in shown:
        for exp in entry.get("experiments") or []:
            executor = exp.get("executor") or {}
            for rev in exp.get("revs") or []:
                name = rev.get("name") or exp.get("name")
                state = "failed" if rev.get("error") else executor.get("state") or "success"
                metrics = ((rev.get("data") or {}).get("metrics") or {}).get(metrics_path) or {}
                value = (metrics.get("data") or {}).get(metric) if state == "success" else None
                out[name] = Outcome(state, value)
    return out


def experiments(metric: str = DEFAULT_METRIC, round_name: str = "r000") -> pd.DataFrame:
    """Finished experiments as a table: name, every flattened param, and the metric."""
    shown = json.loads(dvc("exp", "show", "--json").stdout or "[]")
    outcomes = read_outcomes(shown, metrics_file(round_name), metric)
    rows = []
    for entry in shown:
        for exp in entry.get("experiments") or []:
            for rev in exp.get("revs") or []:
                name = rev.get("name") or exp.get("name")
                outcome = outcomes.get(name)
                if outcome is None or outcome.value is None:
                    continue
                params = ((rev.get("data") or {}).get("params") or {}).get("params.yaml", {})
                rows.append(
                    {"name": name, **_flatten(params.get("data", {})), metric: outcome.value}
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
# 2) Apply


def apply(
    name: str, keys: list[str], params_path: Path, metric: str = DEFAULT_METRIC, round_name="r000"
) -> dict:
    """Write experiment `name`'s values of `keys` into params.yaml (comments kept)."""
    results = experiments(metric, round_name)
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
# 3) Ensembles across runs


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
