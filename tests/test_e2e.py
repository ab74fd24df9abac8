"""The README's main path in a temporary git repo: demo-data, dvc repro, dvc push and pull
into a fresh clone, add-pool, dvc repro. The tests run in this order on one project."""

import ast
import json
import re
import shutil
import sys
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from sklearn.datasets import load_digits

from .conftest import ROOT, S3_BUCKET, S3_REGION, dvc, sh, stages_ran, stale, tree_hash

pytestmark = pytest.mark.slow

TRAIN_ROUNDS = {"train_round@r001", "train_round@r002"}
ROUND_ZERO = {"ingest", "clean", "augment", "init_pseudo", "train", "evaluate"}  # no pool needed


@pytest.fixture(scope="module")
def repo(demo_repo):
    root, output, raw_hash, _ = demo_repo
    return root, output, raw_hash


def test_demo_repro_runs_every_stage_and_reports(repo):
    root, output, _ = repo
    assert stages_ran(output) >= ROUND_ZERO | {
        "pseudolabel@r001",
        "train_round@r001",
        "evaluate_round@r001",
        "pseudolabel@r002",
        "train_round@r002",
        "evaluate_round@r002",
        "summarize",
        "dataset",
    }
    clean = json.loads((root / "artifacts/clean/metrics.json").read_text())
    assert clean["truth"]["truly_wrong"] > 0 and clean["label_issues"] > 0
    summary = json.loads((root / "artifacts/summary/metrics.json").read_text())
    assert summary["rounds"] == 3 and summary["test_accuracy"] > 0.8
    for report in (
        "artifacts/clean/report.html",
        "artifacts/reports/r002/evaluate/report.html",
        "artifacts/reports/r001/pseudolabel/report.html",
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


def test_the_improved_dataset_accounts_for_every_file_and_exports_as_image_folders(repo, tmp_path):
    root, _, _ = repo
    labels = pd.read_csv(root / "artifacts/dataset/labels.csv", dtype=str, keep_default_na=False)
    data = root / "data"
    files = [p.relative_to(data).as_posix() for p in data.rglob("*.png")]
    assert sorted(labels["path"]) == sorted(files)  # every labeled, pool and test image once
    dest = tmp_path / "improved"
    sh(root, sys.executable, "-m", "pipeline", "export", str(dest))
    kept = labels[(labels["label"] != "") & (labels["split"] != "test")]
    tree = {p.name: p.parent.name for p in dest.rglob("*.png")}
    assert tree == {p.replace("/", "__"): label for p, label in zip(kept["path"], kept["label"])}
    again = sh(root, sys.executable, "-m", "pipeline", "export", str(dest), check=False)
    assert again.returncode == 1 and "--force" in again.stderr


def test_second_repro_does_nothing(repo):
    root, _, _ = repo
    again = dvc(root, "repro")
    assert stages_ran(again.stdout) == set()
    assert stale(root) == {}


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ("pipeline/stages/train.py", {"train", *TRAIN_ROUNDS}),  # imported by training only
        ("pipeline/training/feed.py", {"clean", "train", *TRAIN_ROUNDS}),  # batches: K-fold too
        (
            "pipeline/training/calibration.py",
            {
                "clean",
                "init_pseudo",
                "train",
                "evaluate",
                "pseudolabel@r001",
                "pseudolabel@r002",
                "evaluate_round@r001",
                "evaluate_round@r002",
                *TRAIN_ROUNDS,
            },
        ),  # fmt: skip
        ("pipeline/stages/summarize.py", {"summarize"}),
        ("params.yaml", {"augment"}),  # augment.preview_rows: the K-fold does not read it
    ],
)
def test_an_edit_makes_exactly_the_stages_that_run_it_stale(repo, edit, expected):
    root, _, _ = repo
    path = root / edit
    original = path.read_text()
    try:
        if edit == "params.yaml":
            path.write_text(original.replace("preview_rows: 8", "preview_rows: 5"))
        else:  # a change to a function body
            tree = ast.parse(original)
            body = next(n for n in tree.body if isinstance(n, ast.FunctionDef)).body[-1]
            lines = original.splitlines(keepends=True)
            indent = " " * body.col_offset
            lines.insert(body.lineno - 1, f"{indent}_ = None  # an edit\n")
            path.write_text("".join(lines))
        assert set(stale(root)) == expected
    finally:
        path.write_text(original)
    assert stale(root) == {}


class Storage(NamedTuple):
    """How a project and its clones reach the `storage` remote."""

    name: str  # for the reliability record
    url: str  # what `dvc remote list` shows in a fresh clone (its end)
    committed: dict[str, str]  # `dvc remote modify` settings committed to git
    machine: dict[str, str]  # `dvc remote modify --local` settings each machine adds
    objects: Callable[[], list]  # what the remote holds


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    """The repository's own ../dvc-storage, or an S3 bucket as a team sets one up (README),
    served by moto; only the endpoint (a local port here) stays out of git."""
    if request.param == "local":
        folder = tmp_path / "dvc-storage"  # the project and its clone are siblings in tmp_path
        return Storage(
            "the local remote",
            "dvc-storage",
            {},
            {},
            lambda: [p for p in folder.rglob("*") if p.is_file()],
        )
    endpoint, keys = request.getfixturevalue("s3_endpoint")
    url = f"s3://{S3_BUCKET}/dataset-pipeline"
    return Storage(
        "an S3 remote (moto's S3 server)",
        url,
        {"url": url, "region": S3_REGION},
        {"endpointurl": endpoint},
        keys,
    )


def modify_storage(root, settings: dict[str, str], *flags: str) -> None:
    for option, value in settings.items():
        dvc(root, "remote", "modify", *flags, "storage", option, value)


def test_push_then_pull_into_a_fresh_clone_restores_every_output(repo, tmp_path, storage, record):
    project = tmp_path / "project"
    shutil.copytree(repo[0], project, symlinks=True)  # the finished demo, before add-pool
    # The repository's own remote setting, as a clone of it gets it: ../dvc-storage.
    shutil.copy(ROOT / ".dvc" / "config", project / ".dvc" / "config")
    modify_storage(project, storage.committed)
    modify_storage(project, storage.machine, "--local")
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "a finished round")
    pushed = dvc(project, "push")
    count = re.search(r"(\d+) files? pushed", pushed.stdout)
    assert count and len(storage.objects()) == int(count.group(1)) > 0, pushed.stdout

    clone = tmp_path / "clone"  # a sibling: the same ../dvc-storage
    sh(tmp_path, "git", "clone", "-q", str(project), str(clone))
    assert not (clone / "artifacts" / "rounds" / "r000" / "model").exists()
    remote = dvc(clone, "remote", "list").stdout.split()  # the committed setting came along
    assert remote[0] == "storage" and remote[1].endswith(storage.url), remote
    modify_storage(clone, storage.machine, "--local")
    dvc(clone, "pull")
    for folder in ("data", "artifacts"):
        assert tree_hash(clone / folder) == tree_hash(project / folder), folder
    assert stale(clone) == {}
    assert stages_ran(dvc(clone, "repro").stdout) == set()
    loaded = sh(
        clone,
        sys.executable,
        "-c",
        "from pipeline.training.ensemble import load_ensemble; "
        "print(len(load_ensemble('artifacts/rounds/r002/model').models))",
    )
    assert int(loaded.stdout) >= 1
    record(
        "fault",
        f"a fresh clone with nothing but git: `dvc pull` from {storage.name}",
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
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "before the new pool", check=False)  # labels.csv in git
    added = sh(root, sys.executable, "-m", "pipeline", "add-pool", str(incoming))
    assert "round r003" in added.stdout
    status = stale(root)
    # Only the new round is out of date; summarize and the dataset follow once its outputs change.
    new_round = {"pseudolabel@r003", "train_round@r003", "evaluate_round@r003"}
    assert {k for k in status if not k.endswith(".dvc")} == new_round, status
    output = dvc(root, "repro").stdout
    assert stages_ran(output) == new_round | {"summarize", "dataset"}
    summary = json.loads((root / "artifacts/summary/metrics.json").read_text())
    assert summary["rounds"] == 4

    # which labels the round changed: pool images only (the new pool's pseudo-labels, and those
    # of earlier pools the new model re-scored), never a human label
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "round r003")
    sh(root, sys.executable, "-m", "pipeline", "diff", "HEAD~1", "HEAD", "--out", "changes.csv")
    changes = pd.read_csv(root / "changes.csv", dtype=str, keep_default_na=False)
    labels = pd.read_csv(root / "artifacts/dataset/labels.csv", dtype=str, keep_default_na=False)
    new_pool = labels[
        labels["path"].str.startswith("unlabeled/pool_003/") & (labels["label"] != "")
    ]
    assert len(new_pool) > 0 and set(new_pool["path"]) <= set(changes["path"])
    assert (changes["split"] == "pool").all()
    assert set(changes["kind"]) <= {"pseudo-labeled", "unlabeled", "changed"}


def test_changing_one_image_reruns_ingest(repo):
    root, _, _ = repo
    image = next((root / "data/labeled/3").iterdir())
    image.write_bytes(
        (root / "data/labeled/4" / next((root / "data/labeled/4").iterdir()).name).read_bytes()
    )
    assert "ingest" in stale(root)


def test_a_project_without_truth_or_overrides_runs_with_audit_figures_absent(repo, tmp_path):
    project = tmp_path / "no_extras"
    shutil.copytree(repo[0], project, symlinks=True)
    for name in ("data/truth.csv", "data/truth.csv.dvc", "data/overrides.csv"):
        (project / name).unlink(missing_ok=True)
    output = dvc(project, "repro").stdout
    assert {"ingest", "clean", "pseudolabel@r001", "summarize"} <= stages_ran(output)
    assert stale(project) == {}
    clean = json.loads((project / "artifacts/clean/metrics.json").read_text())
    pseudo = json.loads((project / "artifacts/reports/r001/pseudolabel/metrics.json").read_text())
    assert "truth" not in clean and clean["label_issues"] > 0
    assert "pseudo_label_accuracy" not in pseudo and pseudo["accepted"] > 0
    assert (project / "artifacts/audit/truth.csv").read_text() == "path,true_label\n"
    # adding the file back makes exactly what it feeds stale, once `audit` has copied it
    shutil.copy(repo[0] / "data/truth.csv", project / "data/truth.csv")
    dvc(project, "repro", "audit")
    rounds = {f"pseudolabel@r{i:03d}" for i in (1, 2, 3)}  # r003 came with add-pool above
    assert set(stale(project)) == {"ingest"} | rounds


def test_a_users_first_project_has_no_test_split_no_pool_and_no_extras(repo, tmp_path):
    """As a user starts: labeled images only. r000 still trains and is evaluated on a held-out
    share of the labeled images; the first add-pool then runs only the new round."""
    project = tmp_path / "first"
    shutil.copytree(repo[0], project, symlinks=True)
    for name in ("data/test", "data/unlabeled", "artifacts"):
        shutil.rmtree(project / name)
    for name in ("data/test.dvc", "data/truth.csv", "data/truth.csv.dvc", "dvc.lock"):
        (project / name).unlink(missing_ok=True)
    for pool_file in (project / "data").glob("unlabeled*.dvc"):
        pool_file.unlink()
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["rounds"] = {}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    output = dvc(project, "repro").stdout  # init_pseudo: the empty set's shape is ingest's
    assert stages_ran(output) == ROUND_ZERO | {"summarize", "dataset"}
    assert (project / "data/test").is_dir() and not any((project / "data/test").iterdir())
    ingest = json.loads((project / "artifacts/ingest/metrics.json").read_text())
    summary = json.loads((project / "artifacts/summary/metrics.json").read_text())
    assert ingest["test_images"] > 0 and summary["rounds"] == 1
    assert (project / "artifacts/reports/r000/evaluate/report.html").is_file()
    assert stale(project) == {}

    pool = repo[0] / "data/unlabeled/pool_001"
    sh(project, sys.executable, "-m", "pipeline", "add-pool", str(pool))
    output = dvc(project, "repro").stdout
    assert stages_ran(output) == {
        "pseudolabel@r001", "train_round@r001", "evaluate_round@r001", "summarize", "dataset"
    }  # fmt: skip
    pseudo = json.loads((project / "artifacts/reports/r001/pseudolabel/metrics.json").read_text())
    assert pseudo["candidates"] > 0 and "pseudo_label_accuracy" not in pseudo
