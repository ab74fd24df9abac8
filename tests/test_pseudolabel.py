import shutil
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from pipeline.core.config import PseudolabelConfig, load_params
from pipeline.core.errors import PipelineError
from pipeline.core.io import read_array
from pipeline.stages import pseudolabel
from pipeline.training import selection

from .conftest import (
    augment_and_train,
    ingest_digits,
    train_table,
    tree_hash,
    val_table,
    write_params,
)


def _probs(rows):
    return np.array(rows, dtype=float)


def test_fixed_threshold_accepts_only_confident_rows():
    probs = _probs([[0.97, 0.03], [0.6, 0.4], [0.02, 0.98]])
    accepted, predicted, thresholds = selection.select(
        probs,
        np.zeros((0, 3, 2)),
        PseudolabelConfig(policy="fixed", threshold=0.95),
        np.array([0.5, 0.5]),
    )
    assert accepted.tolist() == [True, False, True] and predicted.tolist() == [0, 0, 1]
    assert thresholds.tolist() == [0.95, 0.95, 0.95]


def test_flexmatch_lowers_the_bar_for_poorly_learned_classes():
    # Class 0 is predicted confidently often, class 1 rarely: class 1 gets the lower threshold.
    probs = _probs([[0.99, 0.01]] * 8 + [[0.3, 0.7]] * 4 + [[0.02, 0.98]])
    thresholds = selection.class_thresholds(
        probs, PseudolabelConfig(policy="flexmatch", threshold=0.95)
    )
    assert thresholds[0] == pytest.approx(0.95) and thresholds[1] < thresholds[0]


def test_per_class_cap_keeps_the_most_confident():
    probs = _probs([[0.99, 0.01], [0.96, 0.04], [0.98, 0.02], [0.01, 0.99]])
    cfg = PseudolabelConfig(policy="fixed", threshold=0.9, per_class_cap=2)
    accepted, _, _ = selection.select(probs, np.zeros((0, 4, 2)), cfg, np.array([0.5, 0.5]))
    assert accepted.tolist() == [True, False, True, True]


def test_balance_follows_the_labeled_class_distribution():
    probs = _probs([[0.99, 0.01]] * 6 + [[0.01, 0.99]] * 2)
    cfg = PseudolabelConfig(policy="fixed", threshold=0.9, balance=True)
    accepted, predicted, _ = selection.select(probs, np.zeros((0, 8, 2)), cfg, np.array([0.5, 0.5]))
    assert np.bincount(predicted[accepted]).tolist() == [2, 2]


def test_agreement_requires_every_ensemble_member():
    probs = _probs([[0.97, 0.03], [0.97, 0.03]])
    members = np.array([[[0.99, 0.01], [0.99, 0.01]], [[0.95, 0.05], [0.4, 0.6]]])
    cfg = PseudolabelConfig(policy="fixed", threshold=0.9, agreement=True)
    accepted, _, _ = selection.select(probs, members, cfg, np.array([0.5, 0.5]))
    assert accepted.tolist() == [True, False]


ROUND0 = {"train": {"epochs": 15}}  # a model confident enough to accept pool images


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Round r000's model on the `ingested` digits, trained once for the module."""
    root = tmp_path_factory.mktemp("round0")
    write_params(root)
    ingest_dir = ingest_digits(root)
    params = load_params(write_params(root, ROUND0))
    augment_and_train(root, ingest_dir, train_table(ingest_dir), params)
    return root


@pytest.fixture
def round0(trained, ingested, project):
    """The trained model copied into this test's project (whose ingest outputs are the same:
    same digits, same params, deterministic), and the empty pseudo-label set."""
    params = load_params(write_params(project, ROUND0))
    train_table(ingested)
    for name in ("augment", "model"):
        shutil.copytree(trained / name, project / name)
    pseudolabel.init_pseudo(project / "init", ingested / "images")
    return params


def _run(project, params, pool, name="r000", pseudo_in="init", **options):
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
        **options,
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
    (pool / ".hidden.png").write_bytes(labeled_images[0].read_bytes())
    before = tree_hash(data)
    metrics = _run(project, round0, "mixed")
    quarantine = pd.read_csv(project / "r000" / "report" / "quarantine.csv")
    reasons = dict(zip(quarantine["path"], quarantine["reason"]))
    assert sum("test image" in r for r in reasons.values()) == 5
    assert sum("labeled image" in r for r in reasons.values()) == 5
    assert "not an image" in reasons["unlabeled/mixed/broken.png"]
    assert reasons["unlabeled/mixed/.hidden.png"] == "hidden or system file"
    assert set(quarantine["split"]) == {"pool"}  # whichever check refused the file
    assert metrics["candidates"] == 0 and metrics["accepted"] == 0
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


def _write_pools(data, pools, truth_rows=None):
    """Digit pools under data/unlabeled/<pool>/nested/ and their truth; pools: {name: offset}."""
    digits = load_digits()
    truth = ["path,true_label"]
    for pool, offset in pools.items():
        folder = data / "unlabeled" / pool / "nested"
        folder.mkdir(parents=True)
        for i in np.flatnonzero(digits.target < 3)[offset : offset + 30]:
            rel = f"unlabeled/{pool}/nested/d{i}.png"
            Image.fromarray((digits.images[i] * 16).clip(0, 255).astype(np.uint8)).save(data / rel)
            truth.append(f"{rel},{['zero', 'one', 'two'][digits.target[i]]}")
    (data / "truth.csv").write_text("\n".join(truth) + "\n")


def test_every_round_rescores_every_pool_and_records_provenance(round0, project):
    data = project / "data"
    _write_pools(data, {"p1": 200, "p2": 300})
    # the curriculum alone: no confidence floor
    params = replace(round0, pseudolabel=replace(round0.pseudolabel, min_confidence=0.0))
    first = _run(project, params, "p1")
    second = _run(project, params, "p2", name="r001", pseudo_in="r000/pseudo")
    t1 = pd.read_csv(project / "r000" / "pseudo" / "table.csv", dtype=str, keep_default_na=False)
    t2 = pd.read_csv(project / "r001" / "pseudo" / "table.csv", dtype=str, keep_default_na=False)
    # every eligible pool image so far is in the table, the earlier pools first
    assert len(t1) == first["candidates"] == 30 and len(t2) == second["candidates"] == 60
    assert t2.iloc[:30]["path"].tolist() == t1["path"].tolist()
    assert set(t2["pool"]) == {"p1", "p2"} and set(t2["round"]) == {"r001"}
    assert read_array(project / "r001" / "pseudo" / "images").shape[0] == 60
    # the curriculum admits half of each predicted class in round 0, 70% in round 1
    in_set = t2["accepted"] == "True"
    assert first["accepted"] == sum(int(0.5 * n) for n in t1["predicted"].value_counts())
    assert in_set.sum() == second["accepted"] > first["accepted"]
    assert (t2.loc[in_set, "label"] == t2.loc[in_set, "predicted"]).all()
    assert (t2.loc[~in_set, "label"] == "").all()
    confidence, bar = t2["confidence"].astype(float), t2["threshold"].astype(float)
    assert (confidence[in_set] >= bar[in_set]).all() and (confidence[~in_set] < bar[~in_set]).all()
    # the same model scores p1 again: rejected images join, nobody leaves
    joined_late = t2.iloc[:30][(t1["accepted"] == "False") & in_set.iloc[:30]]
    assert len(joined_late) > 0 and (joined_late["joined"] == "r001").all()
    assert second["left"] == 0 and (t2["left"] == "").all()
    assert t2["model"].str.len().eq(12).all()
    assert first["pseudo_label_accuracy"] > 0.8
    assert (project / "r000" / "report" / "report.html").read_text().count("class='tile'") > 0
    # the labeling queue: rejected pool images only, most uncertain first, a label to fill in
    queue = pd.read_csv(project / "r001" / "report" / "to_label.csv", keep_default_na=False)
    assert len(queue) == min(second["candidates"] - second["accepted"], 50) == second["queue"]
    assert set(queue["path"]) <= set(t2.loc[~in_set, "path"]) and (queue["label"] == "").all()
    assert queue["rank"].tolist() == list(range(1, len(queue) + 1))
    assert set(queue["true_label"]) <= {"zero", "one", "two"}


def test_the_labeling_queue_starts_uncertain_and_skips_near_identical_images():
    probs = _probs([[0.51, 0.49], [0.52, 0.48], [0.6, 0.4], [0.99, 0.01], [0.55, 0.45]])
    embeddings = np.array([[1.0, 0.0], [1.0, 0.001], [0.0, 1.0], [0.7, 0.7], [0.6, 0.8]])
    accepted = np.array([False, False, False, False, True])
    queue = selection.labeling_queue(probs, embeddings, accepted, size=2)
    # row 0 is the most uncertain; row 1 is nearly as uncertain but a near copy of row 0, so
    # the farthest of the shortlist comes second; the accepted row 4 is never queued
    assert queue.tolist() == [0, 2]
    assert selection.labeling_queue(probs, embeddings, accepted, size=0).tolist() == []
    assert sorted(selection.labeling_queue(probs, embeddings, accepted, size=9)) == [0, 1, 2, 3]


def test_a_label_the_new_model_no_longer_supports_leaves_the_set(round0, ingested, project):
    data = project / "data"
    _write_pools(data, {"p1": 200, "p2": 300})
    _run(project, round0, "p1")
    # A second model trained with the labels of "zero" and "one" swapped disagrees with round 0.
    table = train_table(ingested)
    swap = {"zero": "one", "one": "zero", "two": "two"}
    for path in (table, val_table(table)):
        rows = pd.read_csv(path, dtype=str, keep_default_na=False)
        rows.assign(label=rows["label"].map(swap)).to_csv(path, index=False)
    augment_and_train(project / "swapped", ingested, table, round0)
    metrics = pseudolabel.run(
        round_name="r001",
        pool="p2",
        data_dir=data,
        model_dir=project / "swapped" / "model",
        ingest_dir=ingested,
        pseudo_in=project / "r000" / "pseudo",
        out_dir=project / "r001" / "pseudo",
        report_dir=project / "r001" / "report",
        params=round0,
    )
    t1 = pd.read_csv(project / "r000" / "pseudo" / "table.csv", dtype=str, keep_default_na=False)
    t2 = pd.read_csv(project / "r001" / "pseudo" / "table.csv", dtype=str, keep_default_na=False)
    was = t1[t1["accepted"] == "True"]
    now = t2.set_index("path").loc[was["path"]]
    moved = (now["label"].to_numpy() != was["label"].to_numpy()) & (
        was["label"] != "two"
    ).to_numpy()
    assert moved.sum() > 0 and metrics["left"] >= moved.sum()
    assert (now.loc[moved, "left"] == "r001").all()
    # a changed label leaves and joins again, under the new label
    rejoined = now[moved & (now["accepted"] == "True").to_numpy()]
    assert (rejoined["joined"] == "r001").all()
    candidates = pd.read_csv(project / "r001" / "report" / "candidates.csv", dtype=str)
    assert (candidates.set_index("path").loc[now.index[moved], "move"] != "stayed").all()
    # round 0's labels were right: the audit says the swapped model took out right labels
    assert metrics["left_were_wrong"] < 0.2


def test_a_pool_scored_by_an_earlier_round_is_refused(round0, project):
    _write_pools(project / "data", {"p1": 200})
    _run(project, round0, "p1")
    with pytest.raises(PipelineError, match="already scored by an earlier round"):
        _run(project, round0, "p1", name="r001", pseudo_in="r000/pseudo")


def test_curriculum_admits_a_growing_top_share_of_each_class():
    zeros = [0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.7, 0.69, 0.68, 0.67]
    ones = [0.8, 0.79, 0.78, 0.77, 0.55]
    probs = _probs([[p, 1 - p] for p in zeros] + [[1 - p, p] for p in ones])
    none = np.zeros((0, 15, 2))
    cfg = PseudolabelConfig(
        policy="curriculum", share_start=0.5, share_step=0.25, share_max=0.9, min_confidence=0.0
    )

    def per_class(accepted, predicted):
        return np.bincount(predicted[accepted], minlength=2).tolist()

    first, predicted, bars = selection.select(probs, none, cfg, np.ones(2) / 2, 0)
    assert per_class(first, predicted) == [5, 2]  # half of each predicted class, the surest
    assert first[:5].all() and first[10:12].all() and first.sum() == 7
    assert bars[0] == 0.95 and bars[10] == 0.79
    later, _, _ = selection.select(probs, none, cfg, np.ones(2) / 2, 2)
    assert per_class(later, predicted) == [9, 4]  # 0.5 + 2 x 0.25, capped at 0.9
    floor = PseudolabelConfig(**{**cfg.__dict__, "min_confidence": 0.75})
    floored, _, _ = selection.select(probs, none, floor, np.ones(2) / 2, 2)
    assert per_class(floored, predicted) == [6, 4]  # never under min_confidence


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


def test_a_persons_decisions_on_pseudo_labels_win_over_the_model(round0, project, record):
    data = project / "data"
    _write_pools(data, {"p1": 200})
    first = _run(project, round0, "p1")
    table = pd.read_csv(project / "r000" / "pseudo" / "table.csv", dtype=str, keep_default_na=False)
    rejected = table[table["accepted"] == "True"].iloc[0]
    confirmed = table[table["accepted"] == "False"].iloc[0]
    other = next(c for c in ("zero", "one", "two") if c != confirmed["predicted"])
    (data / "pseudo_overrides.csv").write_text(
        f"path,label\n{rejected['path']},reject\n{confirmed['path']},{other}\n"
    )
    again = _run(project, round0, "p1", name="r000b")
    after = pd.read_csv(
        project / "r000b" / "pseudo" / "table.csv", dtype=str, keep_default_na=False
    ).set_index("path")
    assert after.loc[rejected["path"], "accepted"] == "False"
    assert after.loc[rejected["path"], "human"] == "reject"
    assert after.loc[confirmed["path"], ["accepted", "label"]].tolist() == ["True", other]
    assert again["accepted"] == first["accepted"]  # one out, one in
    (data / "pseudo_overrides.csv").write_text("path,label\nx.png,seven\n")
    with pytest.raises(PipelineError, match="not reject or a class"):
        _run(project, round0, "p1", name="r000c")
    record("input", "data/pseudo_overrides.csv naming an unknown class", "refused, one line")
