"""The README's main path in a temporary git repo: demo-data, dvc repro, add-pool, dvc repro."""

import json
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from .conftest import dvc, sh, stages_ran, tree_hash

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
