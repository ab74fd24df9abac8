import json
import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.core.config import load_params
from pipeline.core.errors import PipelineError
from pipeline.core.io import read_array, read_json
from pipeline.stages import augment, train
from pipeline.tools import lr_find
from pipeline.training import diagnostics, ensemble, feed, loop
from pipeline.training.calibration import apply_temperature
from pipeline.training.model import build_model

from .conftest import train_table, val_table, write_params


def _samples(ingest_dir):
    manifest = pd.read_csv(ingest_dir / "manifest.csv", dtype=str, keep_default_na=False)
    rows = manifest[manifest["split"] == "train"]
    classes = read_json(ingest_dir / "classes.json")
    images = read_array(ingest_dir / "images")
    return feed.Samples(
        np.ascontiguousarray(images[rows["row"].astype(int).to_numpy()]),
        rows["label"].map(classes.index).to_numpy(np.int64),
    )


def train_command(table, ingested, name: str) -> list[str]:
    """`python -m pipeline train` writing under artifacts/{rounds,reports}/<name>/."""
    return [
        sys.executable,
        "-m",
        "pipeline",
        "train",
        "--table", str(table),
        "--val", str(val_table(table)),
        "--ingest", str(ingested),
        "--augment", "artifacts/augment",
        "--model", f"artifacts/rounds/{name}/model",
        "--report", f"artifacts/reports/{name}/train",
        "--live", f"artifacts/rounds/{name}/live",
    ]  # fmt: skip


def _fit(params, samples, seed=0, epochs=None):
    """fit on four fifths of `samples`, validated on the other fifth."""
    held = np.arange(len(samples)) % 5 == 0
    train_set = feed.Samples(samples.images[~held], samples.labels[~held])
    val_set = feed.Samples(samples.images[held], samples.labels[held])
    torch.manual_seed(seed)
    model = build_model(params.train.model, 1, 3)
    result = loop.fit(
        model,
        train_set,
        val_set,
        params.train,
        seed=seed,
        device=torch.device("cpu"),
        epochs=epochs,
    )
    return model, result


def test_short_training_reduces_loss(ingested, fast_params):
    _, result = _fit(fast_params, _samples(ingested), epochs=15)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]
    assert result.history[-1]["val_acc"] > 0.6
    first = result.history[0]
    assert set(first["activations"]) and all(
        0 <= s["dead_fraction"] <= 1 for s in first["activations"].values()
    )
    assert first["grad_norm"] > 0 and all(r > 0 for r in first["update_ratio"].values())


def test_two_cpu_runs_with_the_same_seed_are_identical(ingested, fast_params):
    samples = _samples(ingested)
    _, a = _fit(fast_params, samples)
    _, b = _fit(fast_params, samples)
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    assert [h["val_loss"] for h in a.history] == [h["val_loss"] for h in b.history]


def test_mixup_and_label_smoothing_soften_the_fit_learn_and_stay_reproducible(
    ingested, fast_params
):
    """On labels a third of which are wrong, both still learn the classes, never fit the
    given labels as tightly as plain cross-entropy, and are deterministic for a seed."""
    samples = _samples(ingested)
    rng = np.random.default_rng(0)
    wrong = rng.random(len(samples)) < 0.3  # a third of the labels moved to another class
    noisy = feed.Samples(samples.images, np.where(wrong, (samples.labels + 1) % 3, samples.labels))
    runs = {}
    for name, extra in {
        "plain": {"mixup": 0.0},
        "mixup": {"mixup": 0.4},
        "smoothing": {"mixup": 0.0, "label_smoothing": 0.2},
    }.items():
        params = replace(fast_params, train=replace(fast_params.train, **extra))
        _, a = _fit(params, noisy, epochs=12)
        _, b = _fit(params, noisy, epochs=12)
        assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
        runs[name] = a.history[-1]["train_loss"]
        assert a.history[-1]["val_acc"] > 0.5  # scored against the noisy labels too
    assert runs["mixup"] > runs["plain"] and runs["smoothing"] > runs["plain"]


def _stage_args(project, ingested, name="r000"):
    table = train_table(ingested)
    return dict(
        table_path=table,
        val_path=val_table(table),
        images_path=ingested / "images",
        classes_path=ingested / "classes.json",
        augment_dir=project / "artifacts" / "augment",
        pseudo_dir=None,
        model_dir=project / "artifacts" / "rounds" / name / "model",
        report_dir=project / "artifacts" / "reports" / name / "train",
        live_dir=project / "artifacts" / "rounds" / name / "live",
        state_dir=project / "artifacts" / "rounds" / name / ".model.state",
        params=load_params(project / "params.yaml"),
    )


def _augment(project, ingested):
    params = load_params(project / "params.yaml")
    augment.run(
        train_table(ingested),
        ingested / "images",
        ingested / "classes.json",
        project / "artifacts" / "augment",
        params,
    )


def test_stage_writes_a_reloadable_ensemble_dvclive_and_diagnostics(ingested, project):
    _augment(project, ingested)
    args = _stage_args(project, ingested)
    summary = train.run(**args)
    model_dir = args["model_dir"]
    info = read_json(model_dir / "ensemble.json")
    assert len(info["members"]) == 2 and info["classes"] == ["one", "two", "zero"]
    live = json.loads((args["live_dir"] / "metrics.json").read_text())
    assert "val" in live and "ensemble_val_acc" in live
    assert (args["live_dir"] / "plots" / "metrics" / "train" / "loss.tsv").is_file()
    for name in ("diagnostics.json", "diagnostics.png", "warnings.json", "config.json"):
        assert (args["report_dir"] / name).is_file()
    assert not args["state_dir"].exists()  # resume state is removed after success
    images = read_array(ingested / "images")[:20]
    first, second = ensemble.load_ensemble(model_dir), ensemble.load_ensemble(model_dir)
    probs = first.predict(images)
    assert np.array_equal(probs, second.predict(images))
    members = np.stack(
        [ensemble.predict_proba([m], images, torch.device("cpu")) for m in first.models]
    )
    raw = first.predict(images, calibrated=False)
    assert np.allclose(raw, members.mean(0), atol=1e-6)
    # the averaged probabilities are temperature-scaled, with the temperature fitted on validation
    assert info["temperature"] == summary["temperature"] > 0
    assert np.allclose(probs, apply_temperature(raw, info["temperature"]), atol=1e-6)
    assert (probs.argmax(1) == raw.argmax(1)).all()
    assert 0 <= summary["val_ece_after"] <= 1 and 0 <= summary["val_ece_before"] <= 1
    assert summary["train_size_human"] + summary["train_size_val"] == 90


@pytest.mark.slow  # a SIGKILL mid-training
def test_training_resumes_after_a_kill_and_matches_an_uninterrupted_run(ingested, project, record):
    write_params(project, {"train": {"epochs": 8, "patience": 100}})
    _augment(project, ingested)
    table = train_table(ingested)

    def command(name):
        return train_command(table, ingested, name)

    state = project / "artifacts" / "rounds" / "killed" / ".model.state" / "last.pt"
    proc = subprocess.Popen(
        command("killed"), cwd=project, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    hang = time.time() + 1800  # a guard against a hung process, not a guess of speed
    while proc.poll() is None and time.time() < hang:  # wait for the first finished epoch
        if state.is_file() and torch.load(state, weights_only=True)["epoch"] >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(state, weights_only=True)["epoch"]
    assert 1 <= killed_at < 7
    resumed = subprocess.run(command("killed"), cwd=project, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch" in resumed.stderr
    straight = subprocess.run(command("straight"), cwd=project, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    a = read_json(project / "artifacts/reports/killed/train/diagnostics.json")
    b = read_json(project / "artifacts/reports/straight/train/diagnostics.json")
    assert [h["val_loss"] for h in a["history"]] == [h["val_loss"] for h in b["history"]]
    assert a["summary"]["ensemble_val_acc"] == b["summary"]["ensemble_val_acc"]
    record(
        "fault",
        "SIGKILL of the train stage between epochs",
        "resumed after the last finished epoch; losses identical to an uninterrupted run",
    )


def test_a_malicious_pickle_checkpoint_is_refused(tmp_path, record):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "epoch_001.pt"
    path.write_bytes(pickle.dumps({"state_dict": Evil()}))
    with pytest.raises(PipelineError, match="refusing to load"):
        ensemble.load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()
    record(
        "security",
        "a pickle that runs a shell command, planted as a checkpoint",
        "refused; the command never ran",
    )


def plateau_with(rng, epochs: int) -> list[dict]:
    """A loss level at 0.5 from the first epoch, with Gaussian noise (sd 0.02) each epoch."""
    return [{"train_loss": 0.5 + 0.02 * rng.standard_normal()} for _ in range(epochs)]


def test_diagnostics_warn_in_plain_language(fast_params):
    rising = [{"train_loss": v, "activations": {}} for v in (1.0, 1.2, 1.5, 1.9, 2.4)]
    # a long run on a small set: noisy from epoch to epoch, but falling
    rng = np.random.default_rng(0)
    noisy = [
        {"train_loss": 2.0 * 0.97**e * (1 + 0.1 * rng.random()), "activations": {}}
        for e in range(100)
    ]
    assert diagnostics.diagnose(noisy, fast_params.train) == []
    # the demo's r000 at c20a28a: 10 mixup steps an epoch, one lucky epoch (0.535) on a plateau
    plateau = (1.997, 1.534, 1.264, 0.938, 0.719, 0.723, 0.974, 1.021, 0.699, 0.872, 0.861, 0.535)
    lucky = [{"train_loss": v, "activations": {}} for v in (*plateau, 0.694, 0.7, 0.752, 0.683)]
    assert diagnostics.diagnose(lucky, fast_params.train) == []
    risen = [{"train_loss": v, "activations": {}} for v in (*plateau, 0.694, 1.0, 1.1, 1.2)]
    assert "too high" in " ".join(diagnostics.diagnose(risen, fast_params.train))
    # a frozen tf_efficientnet_lite0's linear head (photo-few, seed 0, at 5819f9f): converged
    # within its first epoch, then mixup's noise around 0.5, in r000 and r001
    for converged in (
        (0.502, 0.526, 0.549, 0.512, 0.527, 0.533, 0.556, 0.514, 0.48, 0.526),
        (0.513, 0.491, 0.49, 0.553, 0.499, 0.528, 0.5, 0.478),
    ):
        head = [{"train_loss": v, "activations": {}} for v in converged]
        assert diagnostics.diagnose(head, fast_params.train) == []
        gave_up = [{"train_loss": v, "activations": {}} for v in (*converged, 0.62, 0.66, 0.7)]
        assert "too high" in " ".join(diagnostics.diagnose(gave_up, fast_params.train))
    # a loss that has stopped falling, with noise: rarely a rise, whatever the run's length
    rng = np.random.default_rng(0)
    alarms = sum(
        "rose" in " ".join(diagnostics.diagnose(plateau_with(rng, n), fast_params.train))
        for n in (8, 12, 20, 50)
        for _ in range(100)
    )
    assert alarms <= 16  # of 400: 9 with this rule, 332 with the one at 1b64a4c
    flat = [{"train_loss": v, "activations": {}} for v in (2.302, 2.301, 2.302, 2.300)]
    dead = [
        {"train_loss": v, "activations": {"blocks.0.act1": {"dead_fraction": 0.8}}}
        for v in (2.0, 1.0, 0.5)
    ]
    assert "too high" in " ".join(diagnostics.diagnose(rising, fast_params.train))
    assert "too low" in " ".join(diagnostics.diagnose(flat, fast_params.train))
    assert "dead" in " ".join(diagnostics.diagnose(dead, fast_params.train))
    falling = [{"train_loss": v, "activations": {}} for v in (2.0, 1.0, 0.5)]
    assert diagnostics.diagnose(falling, fast_params.train) == []


def test_lr_find_curve_has_its_minimum_between_its_ends(ingested, project):
    params = load_params(project / "params.yaml")
    curve = lr_find.lr_range_test(_samples(ingested), 3, params, steps=60)
    lowest = int(curve["smoothed"].idxmin())
    assert 0 < lowest < len(curve) - 1
    assert curve["lr"].iloc[0] == pytest.approx(1e-7)
    assert 1e-6 < lr_find.suggest(curve) < 1.0


@pytest.mark.slow  # torchrun
def test_two_processes_under_torchrun_match_one_and_write_once(ingested, project):
    table = train_table(ingested)
    summaries = {}
    for nproc in (1, 2):
        # no mixup: the loss curves are compared, and mixed targets put a floor under them
        train = {"epochs": 5, "patience": 100, "nproc": nproc, "mixup": 0.0}
        write_params(project, {"train": train})
        if nproc == 1:
            _augment(project, ingested)
        name = f"nproc{nproc}"
        result = subprocess.run(
            train_command(table, ingested, name), cwd=project, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr[-3000:]
        summaries[nproc] = read_json(project / f"artifacts/reports/{name}/train/diagnostics.json")
        model_dir = project / f"artifacts/rounds/{name}/model"
        kept = summaries[nproc]["kept"]
        assert sorted(p.name for p in model_dir.iterdir()) == sorted(
            [*(k["file"] for k in kept), "ensemble.json"]
        )
        steps = (project / f"artifacts/rounds/{name}/live/plots/metrics/train/loss.tsv").read_text()
        assert len(steps.splitlines()) == 1 + 5  # header + one row per epoch, written once
        assert not (project / f"artifacts/rounds/.{name.replace('nproc', 'model')}.state").exists()
    assert "2 processes (gloo)" in result.stderr
    assert result.stderr.count("train: ensemble of") == 1  # only the first process reports
    one, two = summaries[1], summaries[2]
    # Same global batch (2 x 16 vs 32), data and seed; batch-norm statistics per process and a
    # different sample order keep them from being equal.
    assert abs(one["summary"]["ensemble_val_acc"] - two["summary"]["ensemble_val_acc"]) <= 0.1
    first, last = (np.array([h["train_loss"] for h in s["history"]]) for s in (one, two))
    assert last[-1] < 0.6 * last[0] and abs(first[-1] - last[-1]) < 0.3 * first[0]


def test_small_sets_are_passed_over_until_min_steps(fast_params, ingested):
    cfg = replace(fast_params.train, batch_size=64, epochs=20, min_steps=1000)
    assert loop.passes_per_epoch(cfg, 391, 20) == 8  # 7 steps a pass: 20 x 56 >= 1000 steps
    assert loop.passes_per_epoch(cfg, 100_000, 20) == 1  # large sets: one pass an epoch
    assert loop.passes_per_epoch(replace(cfg, min_steps=0), 391, 20) == 1
    # a real fit makes that many steps: 3 epochs of 2 passes over 3 batches
    samples = _samples(ingested)
    cfg = replace(fast_params.train, batch_size=32, min_steps=18, top_k=1)
    steps = []
    original = torch.optim.AdamW.step

    def counted(self, *a, **k):
        steps.append(1)
        return original(self, *a, **k)

    torch.optim.AdamW.step = counted
    try:
        loop.fit(build_model(cfg.model, 1, 3), samples, None, cfg, seed=0,
                 device=torch.device("cpu"), epochs=3)  # fmt: skip
    finally:
        torch.optim.AdamW.step = original
    assert len(samples) == 90 and len(steps) == 3 * 2 * 3


def test_validation_rows_are_never_trained_on(ingested, project):
    table = train_table(ingested)
    classes = read_json(ingested / "classes.json")
    train_set, val_set, counts = train.load_training_samples(
        table, val_table(table), ingested / "images", classes, None, None
    )
    images = read_array(ingested / "images")
    val_rows = pd.read_csv(val_table(table), dtype=str)["row"].astype(int)
    trained = {img.tobytes() for img in train_set.images}
    assert len(val_set) == len(val_rows) > 0
    assert not any(images[r].tobytes() in trained for r in val_rows)
    assert counts["human"].sum() == len(train_set)
    # a training table that holds a validation row is refused
    both = pd.concat([pd.read_csv(table, dtype=str), pd.read_csv(val_table(table), dtype=str)])
    both.to_csv(project / "leaky.csv", index=False)
    with pytest.raises(PipelineError, match="holds validation rows"):
        train.load_training_samples(
            project / "leaky.csv", val_table(table), ingested / "images", classes, None, None
        )
