import contextlib
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml

from pipeline.core.config import load_params
from pipeline.core.errors import PipelineError
from pipeline.tools import tune, tune_dvc, tune_report, tune_space

from .conftest import ROOT, sh, write_digits, write_params


def test_mesh_is_log_spaced_jittered_within_cells_and_seeded():
    ranges = [
        tune.parse_dimension("train.lr=1e-1:1e-4"),
        tune.parse_dimension("train.weight_decay=1e-6:1e-3"),
    ]
    mesh = tune.build_mesh(ranges, per_decade=1, jitter=0.5, seed=3)
    assert len(mesh) == 16
    for key, r in (("train.lr", ranges[0]), ("train.weight_decay", ranges[1])):
        logs = np.array(sorted({round(math.log10(p[key]), 6) for p in mesh}))
        assert r.low <= 10 ** logs.min() and 10 ** logs.max() <= r.high * 1.0001
        grid = np.linspace(math.log10(r.low), math.log10(r.high), 4)
        nearest = np.abs(logs[:, None] - grid[None, :]).min(1)
        assert (nearest <= 0.25 + 1e-6).all()  # within half a jittered cell of its grid value
    assert len({tuple(p.values()) for p in mesh}) == 16  # jitter makes every point distinct
    assert mesh == tune.build_mesh(ranges, per_decade=1, jitter=0.5, seed=3)
    assert mesh != tune.build_mesh(ranges, per_decade=1, jitter=0.5, seed=4)


def test_batch_size_is_locked_unless_unlocked():
    with pytest.raises(PipelineError, match="locked"):
        tune.parse_dimension("train.batch_size=16:256")
    unlocked = tune.parse_dimension("train.batch_size=16:256", unlock_batch_size=True)
    assert (unlocked.high, unlocked.kind) == (256, "int")
    with pytest.raises(PipelineError, match="KEY=LOW:HIGH"):
        tune.parse_dimension("train.lr=fast:1")
    with pytest.raises(PipelineError, match="two different positive bounds"):
        tune.parse_dimension("train.lr=0:1")


def test_refine_narrows_around_the_best_and_extends_past_a_border():
    results = pd.DataFrame(
        {
            "train.lr": [1e-3, 1e-3, 1e-2, 1e-2],
            "train.weight_decay": [1e-4, 1e-3, 1e-4, 1e-3],
            "acc": [0.5, 0.6, 0.9, 0.7],
        }
    )
    points, borders = tune.refine_mesh(results, ["train.lr", "train.weight_decay"], "acc")
    assert len(points) == 9
    assert borders == {"train.lr": "high", "train.weight_decay": "low"}
    lrs = sorted({p["train.lr"] for p in points})
    assert (
        lrs[0] == pytest.approx(1e-2) and lrs[-1] > 1e-2
    )  # past the upper border, 1/3-decade steps
    assert math.log10(lrs[1] / lrs[0]) == pytest.approx(1 / 3, abs=1e-3)
    wds = sorted({p["train.weight_decay"] for p in points})
    assert wds[-1] == pytest.approx(1e-4) and wds[0] < 1e-4


def test_space_reads_log_integer_categorical_and_linear_keys(tmp_path):
    params = write_params(tmp_path)  # train.model.blocks: [1, 1]
    space = tune_space.parse_space(
        [
            "train.lr=1e-4:1e-1",
            "train.model.width=8:32",
            "train.model.blocks=1:3",
            "train.optimizer=adamw,sgd",
            "train.momentum=lin:0.8:0.99",
            "train.beta1=lin:0.8:0.95",
            "pseudolabel.threshold=lin:0.8:0.99",
            "train.min_steps=100:1000",
        ],
        params,
    )
    kinds = {d.key: (d.kind, d.log) for d in space.dims}
    assert kinds["train.lr"] == ("float", True)
    assert kinds["train.model.width"] == kinds["train.min_steps"] == ("int", True)
    assert kinds["train.model.blocks"] == ("int", True)
    assert kinds["pseudolabel.threshold"] == kinds["train.momentum"] == ("float", False)
    assert space.dims[0].key == "train.optimizer"  # sampled first: the conditions read it
    assert space.setting_keys.count("train.betas") == 1
    cat = tune.parse_dimension("train.model.blocks=[1,1],[2,2]")
    assert cat.choices == ("[1,1]", "[2,2]")
    assert (
        tune_space.target_round(space, load_params(params)) == "r002"
    )  # pseudolabel: a pool round


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train.lrr=1e-4:1e-1", "unknown key 'train.lrr'"),
        ("train.model.dropout=lin:0.1:2", r"train.model.dropout: 2.0 is out of range"),
        ("train.momentum=lin:0.8:0.99", "only applies with train.optimizer sgd"),
        ("train.beta1=lin:0.8:0.95 train.optimizer=sgd", "only applies with train.optimizer adam"),
        ("evaluate.slice_bins=2:8", "cannot change a validation score"),
        ("train.optimizer=adamw,lion", "train.optimizer"),
    ],
)
def test_space_refuses_keys_and_values_that_cannot_apply(tmp_path, text, message):
    with pytest.raises(PipelineError, match=message):
        tune_space.parse_space(text.split(), write_params(tmp_path))


def test_conditional_parameters_follow_the_optimizer(tmp_path):
    space = tune_space.parse_space(
        ["train.optimizer=adamw,adam,sgd", "train.momentum=lin:0.5:0.99", "train.beta1=lin:0.8:0.95",
         "train.model.blocks=1:3"],
        write_params(tmp_path),
    )  # fmt: skip
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        values = tune_space.suggest(trial, space)
        sets = dict(s.split("=", 1) for s in tune_space.assignments(values, space))
        optimizer = values["train.optimizer"]
        seen.add(optimizer)
        assert ("train.momentum" in values) == (optimizer == "sgd")
        assert ("train.betas" in sets) == (optimizer != "sgd")
        if optimizer != "sgd":
            assert yaml.safe_load(sets["train.betas"])[1] == 0.999  # beta2 as in params.yaml
        blocks = yaml.safe_load(sets["train.model.blocks"])
        assert len(blocks) == 2 and len(set(blocks)) == 1  # the same count in every stage
        study.tell(trial, 0.5)
    assert seen == {"adamw", "adam", "sgd"}


class FakeQueue:
    """DVC's experiment queue as run_study sees it: a name is queued once, then runs.

    `kill_at`: the number of `queue` calls after which the next one raises, as a kill would
    stop `tune` there. `fail` names the values DVC would fail on."""

    def __init__(self, experiments=None, kill_at=None, fail=lambda sets: False):
        self.experiments = {} if experiments is None else experiments  # name -> [sets, state]
        self.kill_at, self.fail, self.calls = kill_at, fail, []

    def queue(self, name, sets):
        if self.kill_at is not None and len(self.calls) == self.kill_at:
            raise KeyboardInterrupt  # killed before DVC queued it
        assert name not in self.experiments, f"{name} queued twice"
        self.calls.append(name)
        self.experiments[name] = [sets, "queued"]

    def wait(self, names):
        out = {}
        for name in names:
            if name in self.experiments:
                sets, state = self.experiments[name]
                if state == "queued":
                    state = "failed" if self.fail(sets) else "success"
                    self.experiments[name][1] = state
                lr = float(dict(s.split("=") for s in sets)["train.lr"])
                out[name] = tune.Outcome(
                    state, -abs(math.log10(lr) + 2.5) if state == "success" else None
                )
        return out


def open_tpe(tmp_path, space, trials=4):
    settings = {"space": space.to_json(), "metric": "acc", "round": "r000"}
    study = tune.open_study(tmp_path / "study.db", "tune", None, create=settings)
    study.sampler = tune.create_sampler("tpe", seed=0, trials=trials, told=len(study.trials))
    return study


def test_a_killed_study_resumes_and_counts_no_trial_twice(tmp_path):
    space = tune_space.parse_space(
        ["train.lr=1e-4:1e-1", "train.weight_decay=1e-6:1e-3"], write_params(tmp_path)
    )
    dvc_state = {}
    # killed in the second batch: trial 2 queued, trial 3 asked and named but never queued
    with pytest.raises(KeyboardInterrupt):
        tune.run_study(
            open_tpe(tmp_path, space), FakeQueue(dvc_state, kill_at=3), trials=4, batch=2, fixed=[]
        )
    study = open_tpe(tmp_path, space)  # a new process: the study comes back from SQLite
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "COMPLETE", "RUNNING", "RUNNING"]
    given = {t.number: t.params for t in study.trials}

    queue = FakeQueue(dvc_state)
    counts = tune.run_study(study, queue, trials=4, batch=2, fixed=["train.epochs=1"])
    assert counts == {"told": 4, "failed": 0, "batches": 0}
    assert queue.calls == [tune.experiment_name(study, 3)]  # only the one DVC never saw
    trials = study.trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    assert {t.number: t.params for t in trials} == given  # resumed trials keep their values
    names = [t.user_attrs["experiment"] for t in trials]
    assert len(set(names)) == 4 and set(names) == set(dvc_state)
    for t in trials:  # each trial's value is its own experiment's
        assert t.value == queue.wait([t.user_attrs["experiment"]])[t.user_attrs["experiment"]].value


def test_failed_experiments_are_told_as_failed_and_count_toward_the_budget(tmp_path):
    space = tune_space.parse_space(["train.lr=1e-4:1e-1"], write_params(tmp_path))
    study = open_tpe(tmp_path, space)
    fails = lambda sets: float(dict(s.split("=") for s in sets)["train.lr"]) > 1e-2  # noqa: E731
    counts = tune.run_study(study, FakeQueue(fail=fails), trials=6, batch=3, fixed=[])
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    assert counts["told"] == 6 and counts["failed"] == len(failed)
    assert all(t.params["train.lr"] > 1e-2 for t in failed)
    table = tune_report.trials_table(study)
    assert list(table["state"].iloc[len(table) - len(failed) :]) == ["fail"] * len(failed)


def test_grid_sampler_runs_every_jittered_mesh_point_once(tmp_path):
    space = tune_space.parse_space(
        ["train.lr=1e-3:1e-1", "train.weight_decay=1e-5:1e-3"], write_params(tmp_path)
    )
    mesh = tune.build_mesh(list(space.dims), per_decade=1, jitter=0.5, seed=0)
    assert len(mesh) == 9
    settings = {"space": space.to_json(), "metric": "acc", "round": "r000"}
    study = tune.open_study(tmp_path / "study.db", "grid", None, create=settings)
    study.sampler = tune.create_sampler("grid", seed=0, trials=9, told=0)
    for point in mesh:
        study.enqueue_trial(point)
    queue = FakeQueue()
    tune.run_study(study, queue, trials=9, batch=4, fixed=[])
    ran = sorted(tuple(sorted(t.params.items())) for t in study.trials)
    assert ran == sorted(tuple(sorted(p.items())) for p in mesh)
    assert len(queue.calls) == 9


def test_refine_narrows_the_study_around_the_best_trial(tmp_path):
    space = tune_space.parse_space(
        ["train.lr=1e-3:1e-1", "train.weight_decay=1e-5:1e-3", "train.optimizer=adamw,sgd"],
        write_params(tmp_path),
    )
    results = pd.DataFrame(
        {
            "train.lr": [1e-3, 1e-2, 1e-1, 1e-2],
            "train.weight_decay": [1e-4, 1e-5, 1e-3, 1e-3],
            "train.optimizer": ["adamw", "sgd", "adamw", "adamw"],
            "acc": [0.5, 0.9, 0.6, 0.7],
        }
    )
    narrowed, borders = tune_space.narrow_space(space, results, "acc")
    dims = {d.key: d for d in narrowed.dims}
    assert borders == {"train.lr": "", "train.weight_decay": "low"}
    assert dims["train.optimizer"].choices == ("sgd",)  # categoricals fixed to the best's
    lr = dims["train.lr"]
    assert lr.low < 1e-2 < lr.high and lr.decades == pytest.approx(2 / 3, abs=0.01)
    wd = dims["train.weight_decay"]
    assert wd.high == pytest.approx(1e-5) and wd.low < 1e-5  # extends past the low border
    assert len(tune_space.three_point_mesh(narrowed)) == 9


def test_exp_show_scores_only_experiments_that_succeeded():
    metrics = {"artifacts/rounds/r000/live/metrics.json": {"data": {"ensemble_val_acc": 0.9}}}

    def exp(name, executor, error=None):
        rev = {"rev": name * 4, "name": name, "data": {"metrics": metrics}, "error": error}
        return {"name": name, "executor": executor, "revs": [rev]}

    shown = [
        {"rev": "workspace", "experiments": None},
        {
            "rev": "abc",
            "experiments": [
                exp("ok", {"state": "success"}),
                exp("old", None),  # ran before, outside the queue
                exp("waiting", {"state": "queued"}),  # carries the baseline's metrics file
                exp("busy", {"state": "running"}),
                exp("bad", {"state": "failed"}, {"msg": "Experiment run failed"}),
            ],
        },
    ]
    out = tune_dvc.read_outcomes(shown, tune_dvc.metrics_file("r000"), "ensemble_val_acc")
    assert {n: (o.state, o.value) for n, o in out.items()} == {
        "ok": ("success", 0.9),
        "old": ("success", 0.9),
        "waiting": ("queued", None),
        "busy": ("running", None),
        "bad": ("failed", None),
    }


def test_report_writes_the_table_and_optunas_plots(tmp_path):
    space = tune_space.parse_space(
        ["train.lr=1e-4:1e-1", "train.weight_decay=1e-6:1e-3"], write_params(tmp_path)
    )
    study = open_tpe(tmp_path, space, trials=6)
    tune.run_study(study, FakeQueue(), trials=6, batch=3, fixed=[])
    table = tune_report.write_report(study, tmp_path / "report")
    assert len(table) == 6 and table["acc"].is_monotonic_decreasing
    for name in ("history", "importances", "slice", "contour", "heatmap"):
        assert (tmp_path / "report" / f"{name}.png").stat().st_size > 1000, name
    importances = json.loads((tmp_path / "report" / "importances.json").read_text())
    assert set(importances) == {"train.lr", "train.weight_decay"}


def told_trials(db: Path) -> int:
    """COMPLETE trials in the study's SQLite file, read without Optuna (a reader, no lock)."""
    if not db.exists():
        return 0
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as con:
        try:
            return con.execute("select count(*) from trials where state='COMPLETE'").fetchone()[0]
        except sqlite3.OperationalError:  # tables not created yet
            return 0


@pytest.mark.slow
def test_tpe_study_runs_through_the_real_dvc_queue_and_resumes_after_a_kill(tmp_path):
    for name in ("pipeline", "dvc.yaml", ".gitignore"):
        sh(tmp_path, "cp", "-r", str(ROOT / name), str(tmp_path / name))
    data = tmp_path / "data"
    # no truth.csv: an optional file DVC tracks outside the train target is not checked out in
    # a queued experiment, which would then rerun ingest and clean without it
    write_digits(data, {0: "zero", 1: "one", 2: "two"}, 30, test_per_class=10)
    (data / "overrides.csv").write_text("path,label\n")
    write_params(tmp_path)
    dvc = [sys.executable, "-m", "dvc"]
    sh(tmp_path, "git", "init", "-q")
    sh(tmp_path, *dvc, "init", "-q")
    sh(tmp_path, *dvc, "add", "-q", "data/labeled", "data/test")
    sh(tmp_path, "git", "add", "-A")
    sh(tmp_path, "git", "commit", "-qm", "project")
    sh(tmp_path, *dvc, "repro", "train")
    sh(tmp_path, "git", "add", "-A")
    sh(tmp_path, "git", "commit", "-qm", "round 0")
    params_before = (tmp_path / "params.yaml").read_text()

    # 1) a 4-trial TPE study in batches of 2, killed (SIGKILL) once the first batch is told
    cli = [sys.executable, "-m", "pipeline", "tune"]
    space = ["--param", "train.lr=1e-3:1e-1", "--param", "train.weight_decay=1e-5:1e-3"]
    args = [*cli, *space, "--sampler", "tpe", "--trials", "4", "--batch", "2", "--epochs", "1"]
    db = tmp_path / "artifacts/tune/study.db"
    with open(tmp_path / "tune.log", "w") as log:
        process = subprocess.Popen(args, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        while told_trials(db) < 2 and process.poll() is None:
            time.sleep(1)  # polls the study; no timing assumption
        assert process.poll() is None, (tmp_path / "tune.log").read_text()[-3000:]
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert told_trials(db) == 2

    # 2) the same command without --param resumes the last study
    resumed = sh(tmp_path, *cli)
    assert "4 trials told (0 failed)" in resumed.stdout, resumed.stdout + resumed.stderr
    study = optuna.load_study(study_name="tune", storage=f"sqlite:///{db}")
    trials = study.trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4  # no trial counted twice
    results = {r["name"]: r for r in tune_results(tmp_path)}
    names = [t.user_attrs["experiment"] for t in trials]
    assert len(set(names)) == 4 and set(names) <= set(results)  # each a real experiment
    for t in trials:
        row = results[t.user_attrs["experiment"]]
        assert row["ensemble_val_acc"] == pytest.approx(t.value)
        assert row["train.lr"] == pytest.approx(t.params["train.lr"], rel=1e-5)
        assert row["train.epochs"] == 1
    assert (tmp_path / "params.yaml").read_text() == params_before  # workspace untouched

    # 3) report: the table and Optuna's plots
    report = sh(tmp_path, *cli, "--report")
    assert "ensemble_val_acc" in report.stdout
    for plot in ("history", "importances", "slice", "contour", "heatmap"):
        assert (tmp_path / f"artifacts/tune/report/{plot}.png").stat().st_size > 1000, plot

    # 4) two runs' ensembles combined, and the best one applied
    pair = names[:2]
    combined = sh(tmp_path, sys.executable, "-m", "pipeline", "ensemble", *pair).stdout
    assert "ensemble of all" in combined and all(name in combined for name in pair)
    assert len(list((tmp_path / "artifacts/tune/ensemble" / pair[0]).glob("epoch_*.pt"))) >= 1
    best = study.best_trial
    applied = sh(tmp_path, *cli, "--apply", best.user_attrs["experiment"])
    assert "wrote train.lr=" in applied.stdout
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    assert params["train"]["lr"] == pytest.approx(best.params["train.lr"], rel=1e-5)


def tune_results(root):
    code = "from pipeline.tools import tune_dvc; import json; print(tune_dvc.experiments().to_json(orient='records'))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)
