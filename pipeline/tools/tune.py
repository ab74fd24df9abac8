"""tune: an Optuna study whose trials are DVC experiments.

Optuna asks (TPE, QMC, random, or the jittered log-grid), `dvc exp run --queue -S key=value`
queues one experiment per trial, `dvc queue start` runs them, and each experiment's
validation score (from `dvc exp show --json`, never the test split) is told back; failed
experiments are told as failed. The study lives in SQLite (`artifacts/tune/study.db`), and each
trial records its experiment's name before the experiment is queued, so a killed `tune`
resumes where it stopped: trials left running are matched to their experiments by name and
told, or queued again when their experiment never reached the queue. No trial counts twice.

Experiments target the `train` stage (round r000, human labels only) or, when a pseudolabel
key is tuned, the last pool round's. The user's params.yaml is left unchanged; `--apply NAME`
writes a chosen experiment's values into it. The search space: pipeline/tools/tune_space.py.
"""

from __future__ import annotations

import json
import logging
import secrets
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from pipeline.core.errors import PipelineError
from pipeline.core.io import (
    Rows,
    atomic_dir,
    edit_yaml,
    read_array,
    read_json,
    read_table,
    write_table,
)
from pipeline.reports import report
from pipeline.tools.tune_space import (  # noqa: F401  (parse_range, build_mesh: the public names)
    LOCKED,
    Dimension,
    Space,
    assignments,
    build_mesh,
    narrow_space,
    parse_dimension,
    refine_mesh,
    suggest,
)
from pipeline.training.ensemble import load_ensemble

log = logging.getLogger(__name__)

DEFAULT_METRIC = "ensemble_val_acc"
SAMPLERS = ("tpe", "qmc", "random", "grid")
parse_range = parse_dimension  # the name the grid-only tune had


def metrics_file(round_name: str) -> str:
    return f"artifacts/rounds/{round_name}/live/metrics.json"


def target_stage(round_name: str) -> str:
    return "train" if round_name == "r000" else f"train_round@{round_name}"


@dataclass(frozen=True)
class Outcome:
    state: str  # queued | running | success | failed
    value: float | None = None  # the metric, for a success that logged it


# --------------------------------------------------------------------------------------------
# 1) The study


def create_sampler(name: str, *, seed: int, trials: int, told: int):
    """Optuna's sampler by name. `told` trials already in the study shift the seed of the
    samplers that draw at random, so a resumed study does not repeat its first draws; QMC keeps
    its seed, since it continues its sequence from the trial count."""
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if name == "tpe":
        # Few startup trials for small budgets: 10 random ones would be a whole 16-trial study.
        startup = min(10, max(2, trials // 4))
        return optuna.samplers.TPESampler(
            seed=seed + told, n_startup_trials=startup, multivariate=True, group=True
        )
    if name == "qmc":
        return optuna.samplers.QMCSampler(
            seed=seed,
            scramble=True,
            warn_independent_sampling=False,
            warn_asynchronous_seeding=False,
        )
    if name in ("random", "grid"):  # grid: every mesh point is enqueued; random fills no gap
        return optuna.samplers.RandomSampler(seed=seed + told)
    raise PipelineError(f"--sampler {name!r}: one of {', '.join(SAMPLERS)}")


def open_study(storage: Path, name: str, sampler, *, create: dict | None = None):
    """Load study `name` from the SQLite file, or create it when `create` (its attributes:
    space, sampler, target round, metric) is given."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage.parent.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{storage.resolve()}"
    known = study_names(storage)
    if name not in known and create is None:
        raise PipelineError(
            f"no study {name!r} in {storage}: start one with --param KEY=LOW:HIGH"
            + (f" (studies there: {', '.join(sorted(known))})" if known else "")
        )
    study = optuna.create_study(
        storage=url, study_name=name, sampler=sampler, direction="maximize", load_if_exists=True
    )
    if name not in known:
        for key, value in {**create, "tag": secrets.token_hex(2)}.items():
            study.set_user_attr(key, value)
    return study


def study_names(storage: Path) -> set[str]:
    import optuna

    if not storage.exists():
        return set()
    return {s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{storage.resolve()}")}


def next_study_name(name: str, storage: Path) -> str:
    """tune -> tune-refine1 -> tune-refine2 ...: the refining studies of one search."""
    base, known = name.split("-refine")[0], study_names(storage)
    return next(f"{base}-refine{k}" for k in range(1, 10_000) if f"{base}-refine{k}" not in known)


def study_space(study) -> Space:
    return Space.from_json(study.user_attrs["space"])


class Runner(Protocol):
    """Where trials run: DVC's queue here, in-process training in bench/tune_compare.py."""

    def queue(self, name: str, sets: list[str]) -> None: ...

    def wait(self, names: list[str]) -> dict[str, Outcome]: ...


def run_study(study, runner: Runner, *, trials: int, batch: int, fixed: list[str]) -> dict:
    """Ask, queue, run and tell in batches of `batch` until `trials` trials are told.

    `fixed` assignments go to every experiment (e.g. a short schedule). Returns counts.
    """
    import optuna
    from optuna.trial import TrialState

    space = study_space(study)
    done = (TrialState.COMPLETE, TrialState.FAIL)
    # 1) trials a killed tune left running: told from their experiment, or queued again
    left = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if left:
        log.info("resuming: %d trial(s) left running by an earlier tune", len(left))
        # Optuna returns a parameter already suggested to a trial, so a rebuilt trial keeps
        # the values it was given and draws only the ones a kill kept it from drawing.
        rebuilt = [optuna.trial.Trial(study, t._trial_id) for t in left]
        _run_batch(study, runner, rebuilt, space, fixed, resume=True)
    # 2) new batches
    batches = 0
    while (told := len(study.get_trials(deepcopy=False, states=done))) < trials:
        asked = [study.ask() for _ in range(min(batch, trials - told))]
        _run_batch(study, runner, asked, space, fixed, resume=False)
        batches += 1
    finished = study.get_trials(deepcopy=False, states=done)
    return {
        "told": len(finished),
        "failed": sum(t.state == TrialState.FAIL for t in finished),
        "batches": batches,
    }


def experiment_name(study, number: int) -> str:
    """Unique across studies of the same name (the tag is drawn when the study is created)."""
    return f"{study.study_name}-{study.user_attrs['tag']}-{number:03d}"


def _run_batch(study, runner: Runner, trials: list, space: Space, fixed, *, resume) -> None:
    from optuna.trial import TrialState

    names = {t.number: experiment_name(study, t.number) for t in trials}
    known = runner.wait(list(names.values())) if resume else {}
    for trial in trials:
        name = names[trial.number]
        if name in known:  # queued (or finished) before the kill: never queued twice
            continue
        # The name is stored before the experiment is queued: a kill in between leaves a
        # trial whose experiment DVC does not know, and the resume queues it then.
        trial.set_user_attr("experiment", name)
        sets = assignments(suggest(trial, space), space) + fixed
        trial.set_user_attr("sets", sets)
        runner.queue(name, sets)
        log.info("trial %d: %s (%s)", trial.number, name, ", ".join(sets))
    outcomes = runner.wait(list(names.values()))
    for number, name in names.items():
        outcome = outcomes.get(name, Outcome("failed"))
        if outcome.state == "success" and outcome.value is not None:
            study.tell(number, float(outcome.value), skip_if_finished=True)
        else:
            log.warning("trial %d (%s) failed; see `dvc queue logs %s`", number, name, name)
            study.tell(number, state=TrialState.FAIL, skip_if_finished=True)


# --------------------------------------------------------------------------------------------
# 2) DVC


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
# 3) Report and apply


def trials_table(study) -> pd.DataFrame:
    """One row per trial: number, experiment, state, the metric and every parameter (best
    first; failed and unfinished trials last)."""
    metric = study.user_attrs.get("metric", DEFAULT_METRIC)
    keys = study_space(study).keys
    rows = [
        {
            "trial": t.number,
            "name": t.user_attrs.get("experiment", ""),
            "state": t.state.name.lower(),
            **{k: t.params.get(k) for k in keys},
            metric: t.value,
        }
        for t in study.get_trials(deepcopy=False)
    ]
    table = pd.DataFrame(rows, columns=["trial", "name", "state", *keys, metric])
    return table.sort_values(metric, ascending=False, na_position="last").reset_index(drop=True)


def write_report(study, out_dir: Path) -> pd.DataFrame:
    """tune.csv, importances.json, and Optuna's plots: optimization history, parameter
    importances, slice and contour over the two most important parameters (heatmap.png as
    before when two numeric parameters are tuned). Returns the table."""
    import optuna
    from optuna.trial import TrialState

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    table = trials_table(study)
    metric = table.columns[-1]
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    space = study_space(study)
    importances = {}
    if len(complete) >= 2:
        try:
            importances = optuna.importance.get_param_importances(study)
        except (RuntimeError, ValueError) as exc:  # e.g. one distinct value per parameter
            log.warning("parameter importances skipped: %s", exc)
    top = list(importances)[:2] or space.keys[:2]
    plt = report.pyplot()
    vis = optuna.visualization.matplotlib
    plots = {"history.png": lambda: vis.plot_optimization_history(study)}
    if importances:
        plots["importances.png"] = lambda: vis.plot_param_importances(study)
    if complete:
        plots["slice.png"] = lambda: vis.plot_slice(study, params=top)
    if len(top) == 2 and len(complete) >= 2:
        plots["contour.png"] = lambda: vis.plot_contour(study, params=top)
    with atomic_dir(out_dir) as tmp:
        write_table(tmp / "tune.csv", table)
        (tmp / "importances.json").write_text(json.dumps(importances, indent=2) + "\n")
        for file, draw in plots.items():
            axes = np.ravel(draw())
            axes[0].figure.savefig(tmp / file, dpi=90, bbox_inches="tight")
            plt.close(axes[0].figure)
        numeric = [d.key for d in space.dims if d.numeric and d.log][:2]
        done = table[table["state"] == "complete"].dropna(subset=numeric)
        if len(numeric) == 2 and len(done):
            plot_heatmap(tmp / "heatmap.png", done, numeric, metric)
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
            "best lies on the border:\nrefine will extend the range",
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
# 4) Ensembles across runs


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
