"""diff: the labels that changed between two commits of the dataset table."""

import pandas as pd
import pytest

from pipeline.core.errors import PipelineError
from pipeline.data.dataset_table import COLUMNS
from pipeline.tools import diff

from .conftest import sh


def table(rows):
    return pd.DataFrame([dict(zip(COLUMNS, r)) for r in rows], columns=COLUMNS).fillna("")


BEFORE = [
    ("labeled/cat/1.png", "train", "cat", "human", "cat"),
    ("labeled/cat/2.png", "train", "cat", "human", "cat"),
    ("labeled/dog/3.png", "train", "dog", "human", "dog"),
    ("unlabeled/p1/a.png", "pool", "", "", "", "", "", "not accepted"),
    ("unlabeled/p1/b.png", "pool", "dog", "pseudo", "", "r001", "0.97"),
]
AFTER = [
    ("labeled/cat/1.png", "train", "cat", "human", "cat"),
    ("labeled/cat/2.png", "train", "dog", "relabeled", "cat"),  # clean relabeled it
    ("labeled/dog/3.png", "train", "", "", "dog", "", "", "dropped by clean"),
    ("labeled/dog/added/p1/a.png", "train", "dog", "answer", "dog"),  # answered
    ("unlabeled/p1/a.png", "pool", "", "", "", "", "", "not accepted"),
    ("unlabeled/p1/b.png", "pool", "dog", "pseudo", "", "r001", "0.98"),  # same label: no change
    ("unlabeled/p2/c.png", "pool", "cat", "pseudo", "", "r002", "0.99"),  # a new pool
]


def test_each_change_gets_its_kind_and_nothing_unchanged_is_listed():
    changes = diff.label_changes(table(BEFORE), table(AFTER))
    kinds = dict(zip(changes["path"], changes["kind"]))
    assert kinds == {
        "labeled/cat/2.png": "relabeled",
        "labeled/dog/3.png": "dropped",
        "labeled/dog/added/p1/a.png": "answered",
        "unlabeled/p2/c.png": "pseudo-labeled",
    }
    assert "relabeled: 1 (dog 1)" in diff.describe(changes)


def test_reads_two_commits_of_a_repository(tmp_path):
    sh(tmp_path, "git", "init", "-q")
    path = tmp_path / "artifacts" / "dataset" / "labels.csv"
    path.parent.mkdir(parents=True)
    unlabeled_new_pool = ("unlabeled/p2/d.png", "pool", "", "", "", "", "", "not accepted")
    rounds = (BEFORE, BEFORE[:3] + AFTER[4:] + [unlabeled_new_pool])
    for rows, message in zip(rounds, ("round 1", "round 2")):
        table(rows).to_csv(path, index=False)
        sh(tmp_path, "git", "add", "-A")
        sh(tmp_path, "git", "commit", "-qm", message)
    changes = diff.run("HEAD~1", "HEAD", out=tmp_path / "changes.csv", repo=tmp_path)
    # a new pool round: its pseudo-labels and nothing else (not its images left out of the set)
    assert changes["path"].tolist() == ["unlabeled/p2/c.png"]
    assert changes["kind"][0] == "pseudo-labeled"
    assert len(pd.read_csv(tmp_path / "changes.csv")) == 1
    with pytest.raises(PipelineError, match="not a revision"):
        diff.run("--output=x", "HEAD", repo=tmp_path)
    with pytest.raises(PipelineError, match="commit after `dvc repro`"):
        diff.run("HEAD~5", "HEAD", repo=tmp_path)
