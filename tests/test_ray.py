"""cluster.engine: ray on a local Ray instance (2 CPUs): evaluate's and pseudolabel's prediction
as Ray Data workers gives what one local process gives, number for number, even when a worker
is killed mid-run; a node that cannot read the project is refused in one line; the clean
stage's K-fold as Ray tasks writes what the local K-fold writes; the train stage as a 2-worker
Ray Train TorchTrainer writes the checkpoints torchrun's 2 processes write, bit for bit.

Needs `pip install -e '.[ray]'` (.ci/run installs it); skipped without it.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from pipeline.core.config import ClusterConfig, load_params
from pipeline.core.errors import PipelineError
from pipeline.stages import augment, ingest, pseudolabel
from pipeline.training.ensemble import load_ensemble, predict_packed
from pipeline.training.ray_fit import train_on_ray

from .conftest import (
    ONE_THREAD,
    augment_and_train,
    ingest_digits,
    pipeline_cli,
    train_table,
    tree_hash,
    write_digits,
    write_params,
    write_pool,
    write_truth,
)
from .test_train import train_command

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")  # a dependency of ray's

pytestmark = pytest.mark.slow  # a Ray instance and its workers per test module

RAY = ClusterConfig(engine="ray", workers=2)


def kill_one(name: str) -> int | None:
    """SIGKILL the first process whose command line holds `name`: its pid, or None."""
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if name in " ".join(proc.info["cmdline"] or []):
            os.kill(proc.info["pid"], signal.SIGKILL)
            return proc.info["pid"]
    return None


@pytest.fixture(scope="module")
def round0(tmp_path_factory):
    """A trained round r000 over 3 digit classes, 30 test images and a pool of 60."""
    root = tmp_path_factory.mktemp("ray")
    params = load_params(write_params(root))
    data = root / "data"
    write_digits(data, {0: "zero", 1: "one", 2: "two"}, 30, test_per_class=10)
    write_pool(data / "unlabeled" / "pool", 200, 260)
    ingest.run(data, root / "ingest", params)
    augment_and_train(root, root / "ingest", train_table(root / "ingest"), params)
    pseudolabel.init_pseudo(root / "init", root / "ingest" / "images")
    return root


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_ray_prediction_equals_local_in_row_order(round0, local_ray):
    """Batches of 4, so both workers predict several: probabilities, the members' (M, N, K)
    and the embeddings come back in the order of the rows asked for."""
    ensemble = load_ensemble(round0 / "model")
    images = round0 / "ingest" / "images"
    rows = np.arange(0, 120, 3)[::-1]  # any rows, in any order
    options = {"members": True, "embeddings": True, "batch_size": 4}
    local = predict_packed(ensemble, images, rows, **options)
    on_ray = predict_packed(ensemble, images, rows, cluster=RAY, **options)
    members, dim = len(ensemble.models), ensemble.models[0].embedding_dim
    assert [a.shape for a in on_ray] == [(40, 3), (members, 40, 3), (40, dim)]
    for a, b in zip(local, on_ray):
        assert np.array_equal(a, b)


def test_a_worker_killed_mid_run_is_replaced_and_the_numbers_do_not_change(
    round0, local_ray, record
):
    ensemble = load_ensemble(round0 / "model")
    images = round0 / "ingest" / "images"
    local = predict_packed(ensemble, images, batch_size=1)
    result: dict = {}
    run = threading.Thread(
        target=lambda: result.update(
            probs=predict_packed(ensemble, images, batch_size=1, cluster=RAY)
        )
    )
    run.start()
    killed = None
    while run.is_alive() and killed is None:  # the first worker process to appear
        killed = kill_one("MapWorker")
        time.sleep(0.05)
    assert killed is not None, "the prediction ended before any worker could be killed"
    run.join()
    assert np.array_equal(result["probs"], local)
    record("fault", "a Ray prediction worker killed mid-run", "replaced; the same numbers")


def test_a_node_that_cannot_read_the_project_is_refused_in_one_line(round0, local_ray, tmp_path):
    ensemble = load_ensemble(round0 / "model")
    ensemble.folder = tmp_path / "elsewhere"  # as a node without the shared path sees it
    with pytest.raises(PipelineError) as caught:
        predict_packed(ensemble, round0 / "ingest" / "images", cluster=RAY)
    message = str(caught.value)
    assert message.startswith("cluster: node ") and "\n" not in message
    assert f"cannot read {tmp_path / 'elsewhere'}" in message


def test_more_workers_than_the_cluster_holds_are_refused_in_one_line(round0, local_ray):
    too_many = ClusterConfig(engine="ray", workers=3)  # local_ray has 2 CPUs
    with pytest.raises(PipelineError) as caught:
        predict_packed(
            load_ensemble(round0 / "model"), round0 / "ingest" / "images", cluster=too_many
        )
    assert str(caught.value) == (
        "cluster: 3 workers x 1 CPU each need 3 CPUs, the Ray cluster has 2: lower "
        "cluster.workers or cluster.cpus_per_worker, or add nodes"
    )


def test_training_on_ray_takes_whole_gpus_one_a_worker(project):
    params = load_params(write_params(project, {"cluster": {"gpus_per_worker": 0.5}}))
    with pytest.raises(PipelineError, match=r"^cluster.gpus_per_worker 0.5: training on Ray"):
        train_on_ray(None, {"params": params})


def test_evaluate_and_pseudolabel_stages_on_ray_write_what_local_writes(round0):
    """The stages as `dvc repro` runs them (each starts its own local Ray): every output file
    byte for byte."""
    for engine in ("local", "ray"):
        write_params(round0, {"cluster": {"engine": engine}})
        for command in (
            f"evaluate --round r000 --model model --ingest ingest --train-report train "
            f"--out evaluate-{engine}",
            f"pseudolabel --round r001 --pool pool --previous r000 --pseudo-in init "
            f"--model model --ingest ingest --out pseudo-{engine} --report report-{engine} "
            f"--data-dir data",
        ):
            done = pipeline_cli(round0, command)
    assert "on Ray, 2 workers" in done.stderr
    for name in ("evaluate", "report", "pseudo"):
        assert tree_hash(round0 / f"{name}-local") == tree_hash(round0 / f"{name}-ray"), name


def test_the_local_engine_never_imports_ray(round0):
    """With Ray installed and `cluster.engine: local`, a stage that predicts never imports it
    (Python's own import log of the stage's process)."""
    write_params(round0, {"cluster": {"engine": "local"}})
    command = "evaluate --round r000 --model model --ingest ingest --train-report train --out e"
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "pipeline", *command.split()],
        cwd=round0,
        capture_output=True,
        text=True,
        env=ONE_THREAD,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    imported = {
        line.rsplit("|", 1)[-1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert {"torch", "pipeline.training.ensemble"} <= imported  # the log is the stage's
    assert not [name for name in imported if name == "ray" or name.startswith("ray.")]


def test_the_kfold_as_ray_tasks_writes_what_the_local_kfold_writes(project):
    """3 folds at two budgets on 2 workers, each fold a task on one CPU (one thread, as the
    local run has): every output of the clean stage byte for byte, and no stack trace from
    cleanlab's forked pool."""
    data = project / "data"
    truth = write_digits(data, {0: "zero", 1: "one", 2: "two"}, 30, flip=0.1, test_per_class=5)
    write_truth(data, truth)
    ingest.run(data, project / "ingest", load_params(project / "params.yaml"))
    for engine in ("local", "ray"):
        clean_params = {"embedding_steps": 0, "min_steps": [0, 60]}
        write_params(project, {"clean": clean_params, "cluster": {"engine": engine}})
        done = pipeline_cli(project, f"clean --ingest ingest --data-dir data --out clean-{engine}")
    assert "clean: K-fold at 60 steps on Ray, 3 folds, at most 2 at a time" in done.stderr
    assert "SIGTERM" not in done.stderr  # cleanlab's forked pool, ended quietly
    assert tree_hash(project / "clean-local") == tree_hash(project / "clean-ray")
    budgets = json.loads((project / "clean-ray" / "metrics.json").read_text())["kfold_budgets"]
    assert [b["min_steps"] for b in budgets] == [0, 60]


def test_training_on_ray_writes_what_torchrun_writes_even_after_a_worker_is_killed(project, record):
    """2 Ray Train workers against `train.nproc: 2` under torchrun, each process on one
    thread: the same shards, seeds and gradient all-reduce. One Ray worker is SIGKILLed once
    the second epoch's checkpoint is saved; the group restarts, `fit` resumes from the last
    checkpoint, and the checkpoints are the same bit for bit, the metrics written once."""
    ingested = ingest_digits(project)
    table = train_table(ingested)
    recipe = {"epochs": 6, "patience": 100}
    write_params(project, {"train": {**recipe, "nproc": 2}})
    images, classes = ingested / "images", ingested / "classes.json"
    params = load_params(project / "params.yaml")
    augment.run(table, images, classes, project / "artifacts" / "augment", params)
    command = train_command(table, ingested, "torchrun")
    done = subprocess.run(command, cwd=project, capture_output=True, text=True, env=ONE_THREAD)
    assert done.returncode == 0, done.stderr[-3000:]

    write_params(project, {"train": recipe, "cluster": {"engine": "ray", "workers": 2}})
    state = project / "artifacts" / "rounds" / "ray" / ".model.state"
    run = subprocess.Popen(
        train_command(table, ingested, "ray"),
        cwd=project,
        stderr=subprocess.PIPE,
        text=True,
        env=ONE_THREAD,
    )
    killed = None
    while run.poll() is None and killed is None:
        if (state / "epoch_002.pt").exists():
            killed = kill_one("RayTrainWorker")
        time.sleep(0.05)
    stderr = run.communicate()[1]
    assert run.returncode == 0, stderr[-3000:]
    assert killed is not None, "training ended before a worker could be killed"
    assert "train: 2 workers on Ray (DistributedDataParallel)" in stderr
    assert "train: ensemble of " in stderr  # the first worker's summary, logged by the driver

    rounds, reports = project / "artifacts" / "rounds", project / "artifacts" / "reports"
    kept = sorted(p.name for p in (rounds / "torchrun" / "model").glob("*.pt"))
    assert kept and kept == sorted(p.name for p in (rounds / "ray" / "model").glob("*.pt"))
    for name in kept:
        a, b = (
            torch.load(rounds / r / "model" / name, weights_only=True)["state_dict"]
            for r in ("torchrun", "ray")
        )
        assert all(torch.equal(a[key], b[key]) for key in a), name
    first, second = (
        json.loads((reports / r / "train" / "diagnostics.json").read_text())
        for r in ("torchrun", "ray")
    )
    assert first["summary"] == second["summary"] and len(second["history"]) == 6
    metrics = json.loads((rounds / "ray" / "live" / "metrics.json").read_text())
    assert metrics["ensemble_val_acc"] == first["summary"]["ensemble_val_acc"]
    assert not [p for p in project.rglob("*") if ".parts." in p.name or p.name.endswith(".state")]
    record("fault", "a Ray Train worker killed mid-training", "resumed; the same checkpoints")

    # An error of the pipeline's own, met by every worker: one line, and no restart of the group
    write_params(
        project, {"train": {**recipe, "batch_size": 1}, "cluster": {"engine": "ray", "workers": 2}}
    )
    failed = subprocess.run(
        train_command(table, ingested, "bad"), cwd=project, capture_output=True, text=True
    )
    assert failed.returncode == 1
    last = failed.stderr.strip().splitlines()[-1]
    assert "train.batch_size 1 is smaller than the 2 training processes" in last, last
    assert "Traceback" not in failed.stderr
    assert not (rounds / "bad" / "model").exists()
