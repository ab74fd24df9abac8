import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from pipeline import pseudolabel
from pipeline.config import PseudolabelConfig, load_params
from pipeline.errors import PipelineError

from .conftest import augment_and_train, train_table, tree_hash, write_params


def _probs(rows):
    return np.array(rows, dtype=float)


def test_fixed_threshold_accepts_only_confident_rows():
    probs = _probs([[0.97, 0.03], [0.6, 0.4], [0.02, 0.98]])
    accepted, predicted, thresholds = pseudolabel.select(
        probs, np.zeros((0, 3, 2)), PseudolabelConfig(threshold=0.95), np.array([0.5, 0.5])
    )
    assert accepted.tolist() == [True, False, True] and predicted.tolist() == [0, 0, 1]
    assert thresholds.tolist() == [0.95, 0.95, 0.95]


def test_flexmatch_lowers_the_bar_for_poorly_learned_classes():
    # Class 0 is predicted confidently often, class 1 rarely: class 1 gets the lower threshold.
    probs = _probs([[0.99, 0.01]] * 8 + [[0.3, 0.7]] * 4 + [[0.02, 0.98]])
    thresholds = pseudolabel.class_thresholds(
        probs, PseudolabelConfig(policy="flexmatch", threshold=0.95)
    )
    assert thresholds[0] == pytest.approx(0.95) and thresholds[1] < thresholds[0]


def test_per_class_cap_keeps_the_most_confident():
    probs = _probs([[0.99, 0.01], [0.96, 0.04], [0.98, 0.02], [0.01, 0.99]])
    cfg = PseudolabelConfig(threshold=0.9, per_class_cap=2)
    accepted, _, _ = pseudolabel.select(probs, np.zeros((0, 4, 2)), cfg, np.array([0.5, 0.5]))
    assert accepted.tolist() == [True, False, True, True]


def test_balance_follows_the_labeled_class_distribution():
    probs = _probs([[0.99, 0.01]] * 6 + [[0.01, 0.99]] * 2)
    cfg = PseudolabelConfig(threshold=0.9, balance=True)
    accepted, predicted, _ = pseudolabel.select(
        probs, np.zeros((0, 8, 2)), cfg, np.array([0.5, 0.5])
    )
    assert np.bincount(predicted[accepted]).tolist() == [2, 2]


def test_agreement_requires_every_ensemble_member():
    probs = _probs([[0.97, 0.03], [0.97, 0.03]])
    members = np.array([[[0.99, 0.01], [0.99, 0.01]], [[0.95, 0.05], [0.4, 0.6]]])
    cfg = PseudolabelConfig(threshold=0.9, agreement=True)
    accepted, _, _ = pseudolabel.select(probs, members, cfg, np.array([0.5, 0.5]))
    assert accepted.tolist() == [True, False]


@pytest.fixture
def round0(ingested, project):
    params = load_params(write_params(project, {"train": {"epochs": 15}}))
    table = train_table(ingested)
    augment_and_train(project, ingested, table, params)
    pseudolabel.init_pseudo(project / "init", params.base)
    return params


def _run(project, params, pool, name="r000", pseudo_in="init"):
    return pseudolabel.run(
        round_name=name,
        pool=pool,
        data_dir=project / "data",
        model_dir=project / "model",
        ingest_dir=project / "artifacts" / "ingest",
        pseudo_in=project / pseudo_in,
        out_dir=project / name / "pseudo",
        report_dir=project / name / "report",
        params=params,
    )


def test_never_pseudo_labels_test_images_or_copies_of_labeled_images(round0, project, record):
    data = project / "data"
    pool = data / "unlabeled" / "mixed"
    pool.mkdir(parents=True)
    test_images = sorted((data / "test").rglob("*.png"))[:5]
    labeled_images = sorted((data / "labeled").rglob("*.png"))[:5]
    for i, source in enumerate(test_images + labeled_images):
        (pool / f"copy_{i}.png").write_bytes(source.read_bytes())
    (pool / "broken.png").write_bytes(b"not a png")
    before = tree_hash(data)
    metrics = _run(project, round0, "mixed")
    quarantine = pd.read_csv(project / "r000" / "report" / "quarantine.csv")
    reasons = dict(zip(quarantine["path"], quarantine["reason"]))
    assert sum("test image" in r for r in reasons.values()) == 5
    assert sum("labeled image" in r for r in reasons.values()) == 5
    assert "not an image" in reasons["unlabeled/mixed/broken.png"]
    assert metrics["eligible"] == 0 and metrics["accepted"] == 0
    assert tree_hash(data) == before
    record(
        "input",
        "pool images that are copies of test or labeled images",
        "never pseudo-labeled; quarantined with the reason",
        cases=10,
    )
    record("input", "an unreadable file in a pool", "quarantined with the reason")


def test_a_pool_identical_to_the_labeled_set_adds_nothing(round0, project, record):
    data = project / "data"
    pool = data / "unlabeled" / "same"
    shutil.copytree(data / "labeled", pool)
    metrics = _run(project, round0, "same")
    quarantine = pd.read_csv(project / "r000" / "report" / "quarantine.csv")
    labeled = len(list((data / "labeled").rglob("*.png")))
    assert metrics["pool_images"] == labeled and metrics["accepted"] == 0
    assert quarantine["reason"].str.contains("labeled image").sum() == labeled
    assert len(pd.read_csv(project / "r000" / "pseudo" / "table.csv")) == 0
    record(
        "input",
        "an unlabeled pool identical to the labeled set",
        "nothing pseudo-labeled; every image quarantined as a copy",
    )


def test_accepted_rows_carry_provenance_and_the_set_is_cumulative(round0, project):
    digits = load_digits()
    data = project / "data"
    truth = ["path,true_label"]
    for pool, offset in (("p1", 100), ("p2", 130)):
        folder = data / "unlabeled" / pool / "nested"
        folder.mkdir(parents=True)
        for i in np.flatnonzero(digits.target < 3)[offset : offset + 30]:
            rel = f"unlabeled/{pool}/nested/d{i}.png"
            Image.fromarray((digits.images[i] * 16).clip(0, 255).astype(np.uint8)).save(data / rel)
            truth.append(f"{rel},{['zero', 'one', 'two'][digits.target[i]]}")
    (data / "truth.csv").write_text("\n".join(truth) + "\n")
    params = load_params(project / "params.yaml", {"pseudolabel.threshold": 0.5})
    first = _run(project, params, "p1")
    second = _run(project, params, "p2", name="r001", pseudo_in="r000/pseudo")
    t1 = pd.read_csv(project / "r000" / "pseudo" / "table.csv", dtype=str)
    t2 = pd.read_csv(project / "r001" / "pseudo" / "table.csv", dtype=str)
    assert len(t1) == first["accepted"] > 0
    assert len(t2) == len(t1) + second["accepted"]
    assert t2.iloc[: len(t1)]["path"].tolist() == t1["path"].tolist()
    assert set(t2["round"]) == {"r000", "r001"} and set(t2["pool"]) == {"p1", "p2"}
    assert (t2["confidence"].astype(float) >= t2["threshold"].astype(float)).all()
    assert t2["model"].str.len().eq(12).all()
    assert np.load(project / "r001" / "pseudo" / "images.npy").shape[0] == len(t2)
    assert 0 <= first["pseudo_label_accuracy"] <= 1
    assert (project / "r000" / "report" / "report.html").read_text().count("class='tile'") > 0


def test_an_empty_pool_is_reported_not_a_crash(round0, project, record):
    (project / "data" / "unlabeled" / "empty").mkdir(parents=True)
    metrics = _run(project, round0, "empty")
    assert metrics["pool_images"] == 0 and metrics["accepted"] == 0
    quarantine = pd.read_csv(project / "r000" / "report" / "quarantine.csv")
    assert "empty pool" in quarantine["reason"].iloc[0]
    record("input", "an empty pool", "reported as an empty pool, not a crash")


def test_a_missing_pool_is_a_clear_error(round0, project):
    with pytest.raises(PipelineError, match="pool 'nope' not found"):
        _run(project, round0, "nope")
