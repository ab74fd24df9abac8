"""The README's main path in a temporary git repo: demo-data, dvc repro, dvc push and pull
into a fresh clone, add-pool, dvc repro. The tests run in this order on one project."""

import json
import shutil
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from .conftest import ROOT, dvc, sh, stages_ran, tree_hash

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(demo_repo):
    root, output, raw_hash, _ = demo_repo
    return root, output, raw_hash


def test_demo_repro_runs_every_stage_and_reports(repo):
    root, output, _ = repo
    assert stages_ran(output) >= {
        "ingest",
        "clean",
        "augment",
        "init_pseudo",
        "train@r000",
        "evaluate@r000",
        "pseudolabel@r000",
        "train@r001",
        "evaluate@r001",
        "pseudolabel@r001",
        "summarize",
    }
    clean = json.loads((root / "artifacts/clean/metrics.json").read_text())
    assert clean["truth"]["truly_wrong"] > 0 and clean["label_issues"] > 0
    summary = json.loads((root / "artifacts/summary/metrics.json").read_text())
    assert summary["rounds"] == 2 and summary["test_accuracy"] > 0.8
    for report in (
        "artifacts/clean/report.html",
        "artifacts/reports/r001/evaluate/report.html",
        "artifacts/reports/r000/pseudolabel/report.html",
        "artifacts/summary/index.html",
    ):
        assert (root / report).stat().st_size > 2000
    shown = dvc(root, "metrics", "show", "--json").stdout
    assert '"accuracy"' in shown and '"ensemble_val_acc"' in shown
    plots = dvc(root, "plots", "show", "-o", str(root / "plots_out"))
    assert (root / "plots_out" / "index.html").is_file(), plots.stdout


def test_raw_data_is_never_modified_by_the_pipeline(repo, record):
    root, _, raw_hash = repo
    assert tree_hash(root / "data") == raw_hash
    record(
        "fault",
        "the whole demo pipeline (`dvc repro`), then a hash of every file under data/",
        "nothing under data/ changed",
    )


def test_second_repro_does_nothing(repo):
    root, _, _ = repo
    again = dvc(root, "repro")
    assert stages_ran(again.stdout) == set()
    assert "up to date" in dvc(root, "status").stdout


def test_push_then_pull_into_a_fresh_clone_restores_every_output(repo, tmp_path, record):
    project = tmp_path / "project"
    shutil.copytree(repo[0], project, symlinks=True)  # the finished demo, before add-pool
    # The repository's own remote setting, as a clone of it gets it: ../dvc-storage.
    shutil.copy(ROOT / ".dvc" / "config", project / ".dvc" / "config")
    remote = dvc(project, "remote", "list").stdout.split()
    assert remote[0] == "storage" and remote[1].endswith("dvc-storage")
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "a finished round")
    pushed = dvc(project, "push")
    assert (tmp_path / "dvc-storage").is_dir(), pushed.stdout

    clone = tmp_path / "clone"  # a sibling: the same ../dvc-storage
    sh(tmp_path, "git", "clone", "-q", str(project), str(clone))
    assert not (clone / "artifacts" / "rounds" / "r000" / "model").exists()
    dvc(clone, "pull")
    for folder in ("data", "artifacts"):
        assert tree_hash(clone / folder) == tree_hash(project / folder), folder
    assert "up to date" in dvc(clone, "status").stdout
    assert stages_ran(dvc(clone, "repro").stdout) == set()
    loaded = sh(
        clone,
        sys.executable,
        "-c",
        "from pipeline.train import load_ensemble; "
        "print(len(load_ensemble('artifacts/rounds/r001/model').models))",
    )
    assert int(loaded.stdout) >= 1
    record(
        "fault",
        "a fresh clone with nothing but git: `dvc pull` from the local remote",
        "every output and data file restored byte for byte; `dvc repro` has nothing to do",
    )


def test_add_pool_then_repro_runs_only_the_new_round_and_summary(repo, tmp_path):
    root, _, _ = repo
    digits = load_digits()
    incoming = tmp_path / "new_pool"
    incoming.mkdir()
    for i in range(0, 300, 3):  # shifted copies: new content the pipeline has never seen
        image = np.roll((digits.images[i] * 16).clip(0, 255).astype(np.uint8), 1, axis=1)
        Image.fromarray(image).save(incoming / f"shifted_{i}.png")
    added = sh(root, sys.executable, "-m", "pipeline", "add-pool", str(incoming))
    assert "round r002" in added.stdout
    status = json.loads(dvc(root, "status", "--json").stdout)
    stale = {key for key in status if not key.endswith(".dvc")}
    # Only the new round is out of date; summarize follows once its reports change.
    assert stale == {"train@r002", "evaluate@r002", "pseudolabel@r002"}, status
    output = dvc(root, "repro").stdout
    assert stages_ran(output) == {"train@r002", "evaluate@r002", "pseudolabel@r002", "summarize"}
    summary = json.loads((root / "artifacts/summary/metrics.json").read_text())
    assert summary["rounds"] == 3


def test_changing_one_image_reruns_ingest(repo):
    root, _, _ = repo
    image = next((root / "data/labeled/3").iterdir())
    image.write_bytes(
        (root / "data/labeled/4" / next((root / "data/labeled/4").iterdir()).name).read_bytes()
    )
    status = json.loads(dvc(root, "status", "--json").stdout)
    assert "ingest" in status
