import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image, PngImagePlugin
from sklearn.datasets import load_digits

from pipeline.core.config import load_params
from pipeline.core.errors import PipelineError
from pipeline.core.io import read_json
from pipeline.data import inputs, label_decisions, label_issues, quality
from pipeline.stages import clean, ingest
from pipeline.training import kfold

from .conftest import write_digits, write_params, write_truth


def _noisy_probs(n=300, k=3, flips=30, seed=0):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, k, n)
    probs = rng.dirichlet(np.ones(k) * 0.3, n) * 0.15
    probs[np.arange(n), truth] += 0.85
    probs /= probs.sum(1, keepdims=True)
    labels = truth.copy()
    flipped = rng.choice(n, flips, replace=False)
    labels[flipped] = (truth[flipped] + rng.integers(1, k, flips)) % k
    return labels, probs, flipped


def test_flags_injected_label_noise_and_not_clean_rows():
    labels, probs, flipped = _noisy_probs()
    found = label_issues.find_issues(labels, probs, filter_by="prune_by_noise_rate")
    flagged = set(np.flatnonzero(found["label_issue"]))
    assert len(flagged & set(flipped)) >= 0.9 * len(flipped)
    assert len(flagged - set(flipped)) <= 3
    assert (found.loc[list(flipped), "label_quality"].mean()) < found["label_quality"].mean()


def _issue_rows(suggested_prob):
    return pd.DataFrame(
        {
            "path": ["a.png", "b.png"],
            "given_label": ["cat", "dog"],
            "suggested_label": ["dog", "cat"],
            "suggested_prob": [suggested_prob, 0.2],
            "label_issue": [True, False],
            "issue_types": ["label_issue", ""],
        }
    )


@pytest.mark.parametrize(
    ("prob", "decision", "label"), [(0.85, "drop", "cat"), (0.95, "relabel", "dog")]
)
def test_relabel_never_fires_under_its_threshold(prob, decision, label):
    out = label_decisions.decide(
        _issue_rows(prob), ["cat", "dog"], policy="relabel", relabel_threshold=0.9
    )
    assert out.loc[0, "decision"] == decision and out.loc[0, "label"] == label
    assert out.loc[1, "decision"] == "keep" and out.loc[1, "label"] == "dog"


@pytest.mark.parametrize(
    ("policy", "decision"),
    [("relabel", "drop"), ("relabel_keep", "flag"), ("drop", "drop"), ("flag", "flag")],
)
def test_an_unsure_issue_follows_the_policy_and_is_not_scored_on_validation(policy, decision):
    out = label_decisions.decide(
        _issue_rows(0.6), ["cat", "dog"], policy=policy, relabel_threshold=0.9
    )
    assert (out.loc[0, "decision"], out.loc[0, "label"]) == (decision, "cat")
    assert (out.loc[1, "decision"], out.loc[1, "label"]) == ("keep", "dog")  # not an issue
    # validation rows: an unsure flag is left out of the score, whatever the policy
    label, scored = label_decisions.validation_labels(out, relabel_threshold=0.9)
    assert (label[0], bool(scored[0])) == ("dog", False) and scored[1]


def test_datalab_flags_the_rare_class_and_the_group_the_model_fails():
    rng = np.random.default_rng(0)
    labels = np.array(["a"] * 300 + ["b"] * 290 + ["c"] * 6)
    features = rng.normal(size=(len(labels), 8))
    features[:40] += 6.0  # a tight group of class "a" the model gets wrong
    probs = np.full((len(labels), 3), 0.05)
    probs[np.arange(len(labels)), pd.Series(labels).map({"a": 0, "b": 1, "c": 2})] = 0.9
    probs[:40] = [0.05, 0.9, 0.05]
    flags, scores, summary = label_issues.datalab_checks(list(labels), probs, features)
    assert summary["class_imbalance"]["rarest_class"] == "c"
    assert (
        flags["class_imbalance"][labels == "c"].all() and not flags["class_imbalance"][:590].any()
    )
    assert flags["underperforming_group"][:40].mean() > 0.9
    assert flags["underperforming_group"][40:].mean() < 0.05
    assert all(((s >= 0) & (s <= 1)).all() for s in scores.values())


def test_without_the_datalab_extra_the_checks_are_skipped_not_crashed():
    # cleanlab without `datasets` exports a stand-in Datalab that raises when called
    code = (
        "import sys; sys.modules['datasets'] = None\n"
        "import numpy as np\n"
        "from pipeline.data import label_issues\n"
        "probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])\n"
        "print(label_issues.datalab_checks(['a', 'b', 'a'], probs, np.eye(3)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "None", done.stderr


def test_flag_policy_keeps_every_row():
    out = label_decisions.decide(
        _issue_rows(0.99), ["cat", "dog"], policy="flag", relabel_threshold=0.9
    )
    assert list(out["decision"]) == ["flag", "keep"] and list(out["label"]) == ["cat", "dog"]


def test_overrides_win_over_decisions():
    decided = label_decisions.decide(
        _issue_rows(0.99), ["cat", "dog"], policy="drop", relabel_threshold=0.9
    )
    overrides = pd.DataFrame({"path": ["a.png", "b.png"], "action": ["keep", "cat"]})
    out, unmatched = label_decisions.apply_overrides(decided, overrides)
    assert list(out["decision"]) == ["keep", "relabel"] and list(out["label"]) == ["cat", "cat"]
    assert out["reason"].str.startswith("override").all() and unmatched == 0


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (["a.png,keep", "a.png,drop"], "overridden twice"),
        (["../x.png,keep"], "escapes data/"),
        (["a.png,horse"], "not keep, drop or a class"),
    ],
)
def test_bad_overrides_are_one_clear_error(tmp_path, rows, message, record):
    (tmp_path / "overrides.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(PipelineError, match=message):
        label_decisions.read_overrides(tmp_path, ["cat", "dog"])
    record(
        "input",
        "conflicting, escaping or unknown-class rows in data/overrides.csv",
        f"one error line: {message}",
    )


def test_stage_finds_flipped_labels_keeps_class_order_and_obeys_overrides(project, record):
    # Class names whose alphabetical order ("10" < "9" < "b") is not their numeric order.
    names = {0: "9", 1: "10", 2: "b"}
    data = project / "data"
    truth = write_digits(data, names, 60, flip=0.12, test_per_class=5, seed=1)
    write_truth(data, truth)
    flipped = sorted(
        p for p, t in truth.items() if p.startswith("labeled") and p.split("/")[1] != t
    )
    clean_rows = sorted(
        p for p, t in truth.items() if p.startswith("labeled") and p.split("/")[1] == t
    )
    # the same pixels under another name and other bytes (a metadata-only change)
    original = sorted((data / "labeled" / "b").iterdir())[0]
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "re-saved")
    Image.open(original).save(original.with_name("resaved.png"), pnginfo=info)
    dim = np.asarray(Image.open(original), dtype=np.float32) * 0.08  # the same digit, unlit
    Image.fromarray(dim.astype(np.uint8)).save(original.with_name("underexposed.png"))
    params = load_params(project / "params.yaml")
    ingest.run(data, project / "ingest", params)
    # overrides for training rows (validation rows are scored, never trained on)
    manifest = pd.read_csv(project / "ingest" / "manifest.csv", dtype=str, keep_default_na=False)
    human = manifest[manifest["split"] == "train"].reset_index(drop=True)
    is_val = inputs.stratified_holdout(human["label"], 0.2, 0, minimum=5)
    val_paths = set(human.loc[is_val, "path"])
    flipped = [p for p in flipped if p not in val_paths]
    clean_rows = [p for p in clean_rows if p not in val_paths]
    (data / "overrides.csv").write_text(f"path,label\n{flipped[0]},keep\n{clean_rows[0]},drop\n")
    metrics = clean.run(project / "ingest", data, project / "clean", params)

    classes = read_json(project / "ingest" / "classes.json")
    assert classes == ["10", "9", "b"]
    issues = pd.read_csv(project / "clean" / "issues.csv", dtype=str, keep_default_na=False)
    probs = np.load(project / "clean" / "pred_probs.npy")
    given = issues["given_label"].map(classes.index).to_numpy()
    is_clean = ~issues["path"].isin(flipped).to_numpy()
    assert (
        probs[is_clean].argmax(1) == given[is_clean]
    ).mean() > 0.85  # columns follow classes.json

    assert metrics["truth"]["recall"] >= 0.7 and metrics["truth"]["precision"] >= 0.7
    # a row is relabeled only on a confident suggestion, or by a person's override
    relabeled = issues[issues["decision"] == "relabel"]
    assert relabeled["reason"].str.match("relabel_confident|override").all()
    # Datalab's shape: one is_<type>_issue and one <type>_score per type, filtered directly
    table = pd.read_csv(project / "clean" / "issues.csv")
    thresholds = vars(params.clean.quality)
    for name in ("label", "near_duplicate", "outlier", "dark", "light", "blurry",
                 "low_information", "odd_aspect_ratio", "odd_size",
                 *label_issues.DATALAB_CHECKS):  # fmt: skip
        flagged, score = table[f"is_{name}_issue"], table[f"{name}_score"]
        assert flagged.dtype == bool and score.between(0, 1).all(), name
        if name in thresholds:  # CleanVision's rule, with the thresholds from params
            assert ((score < thresholds[name]) == flagged).all(), name
        if name == "near_duplicate":  # the later member of each close pair is flagged
            assert (score[flagged] <= 0.5).all()
    assert "is_grayscale_issue" not in table  # a grayscale project is not told it is grayscale
    dark = table.set_index("path").loc["labeled/b/underexposed.png"]
    assert dark["is_dark_issue"] and "dark" in dark["issue_types"]
    # one embedding space: the two copies lie together whatever fold each fell in
    embeddings = np.load(project / "clean" / "embeddings.npy")
    pair = [table.index[table["path"] == f"labeled/b/{name}"][0]
            for name in (original.name, "resaved.png")]  # fmt: skip
    unit = embeddings[pair] / np.linalg.norm(embeddings[pair], axis=1, keepdims=True)
    assert 1 - unit[0] @ unit[1] < 1e-4
    assert table.loc[pair, "is_near_duplicate_issue"].any()
    assert table["is_near_duplicate_issue"].mean() < 0.05  # distinct digits are not
    flagged_labels = table[table["is_label_issue"]]
    assert set(flagged_labels["path"]) & set(flipped)
    assert (table["predicted_label"].astype(str).isin(classes)).all()
    by_path = issues.set_index("path")
    assert by_path.loc[flipped[0], "decision"] == "keep"
    assert by_path.loc[clean_rows[0], "decision"] == "drop"
    cleaned = pd.read_csv(project / "clean" / "train.csv", dtype=str)
    assert flipped[0] in set(cleaned["path"]) and clean_rows[0] not in set(cleaned["path"])
    assert (set(issues.loc[issues["decision"] == "drop", "path"]) & set(cleaned["path"])) == set()
    html = (project / "clean" / "report.html").read_text()
    assert html.count("class='tile'") >= metrics["label_issues"]
    record(
        "input",
        "overrides against cleanlab's decision (keep a flagged row, drop a clean one)",
        "the override wins",
        cases=2,
    )
    record(
        "input",
        "class names whose text order differs from numeric order (10, 9, b)",
        "one class order in every table and array",
    )


def test_a_class_smaller_than_the_folds_is_a_clear_error(project, record):
    data = project / "data"
    write_digits(data, {0: "zero", 1: "one"}, 2)
    params = load_params(project / "params.yaml")
    ingest.run(data, project / "ingest", params)
    with pytest.raises(PipelineError, match="fewer than clean.folds"):
        clean.run(project / "ingest", data, project / "clean", params)
    record("input", "a class smaller than clean.folds", "one error line")


def test_dropping_every_image_is_a_clear_error(project):
    data = project / "data"
    truth = write_digits(data, {0: "zero", 1: "one"}, 4)
    rows = "\n".join(f"{p},drop" for p in truth)
    (data / "overrides.csv").write_text("path,label\n" + rows + "\n")
    params = load_params(write_params(project, {"clean": {"epochs": 1}}))
    ingest.run(data, project / "ingest", params)
    with pytest.raises(PipelineError, match="every training image was dropped"):
        clean.run(project / "ingest", data, project / "clean", params)


def test_validation_rows_are_carved_before_cleaning_and_scored_by_the_rule(project):
    data = project / "data"
    truth = write_digits(data, {0: "zero", 1: "one", 2: "two"}, 40, flip=0.15, seed=2)
    write_truth(data, truth)
    ingest.run(data, project / "ingest", load_params(project / "params.yaml"))
    tables = {}
    for policy in ("drop", "flag"):
        params = load_params(write_params(project, {"clean": {"policy": policy}}))
        clean.run(project / "ingest", data, project / policy, params)
        tables[policy] = [
            pd.read_csv(project / policy / name, dtype=str, keep_default_na=False)
            for name in ("train.csv", "val.csv", "issues.csv")
        ]
    (train_drop, val_drop, issues), (train_flag, val_flag, _) = tables["drop"], tables["flag"]
    # the same rows whatever cleaning decides, at least 5 a class, and never trained on
    assert val_drop["id"].tolist() == val_flag["id"].tolist()
    assert val_drop.merge(issues, on="id")["given_label_x"].value_counts().min() >= 5
    assert not set(val_drop["id"]) & (set(train_drop["id"]) | set(train_flag["id"]))
    # a flagged validation row is scored against a confident suggestion, or not at all
    rows = val_drop.merge(issues[["id", "label_issue", "suggested_label", "suggested_prob"]])
    flagged = rows[rows["label_issue"] == "True"]
    confident = flagged["suggested_prob"].astype(float) >= 0.9
    assert (flagged.loc[confident, "label"] == flagged.loc[confident, "suggested_label"]).all()
    assert (flagged.loc[confident, "scored"] == "True").all()
    assert (flagged.loc[~confident, "scored"] == "False").all()
    unflagged = rows[rows["label_issue"] == "False"]
    assert (unflagged["label"] == unflagged["given_label"]).all()
    assert (unflagged["scored"] == "True").all()


def test_noise_guard_falls_back_to_flag_when_the_folds_are_near_chance():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 30)
    near_chance = rng.dirichlet(np.ones(10), size=len(labels)).astype(np.float32)
    policy, warning = label_decisions.guarded_policy(labels, near_chance, "relabel", 0.4)
    assert policy == "flag" and "clean.max_noise_rate" in warning
    confident = np.full((len(labels), 10), 0.01, np.float32)
    confident[np.arange(len(labels)), labels] = 0.91
    assert label_decisions.guarded_policy(labels, confident, "relabel", 0.4) == ("relabel", "")


def _digit_set(per_class=30, flip=0.2, seed=0):
    """sklearn digits as the K-fold sees them: (N, 8, 8, 1) uint8 and labels, some flipped."""
    digits = load_digits()
    rng = np.random.default_rng(seed)
    rows = np.concatenate([np.flatnonzero(digits.target == k)[:per_class] for k in range(3)])
    images = (digits.images[rows] * 16).clip(0, 255).astype(np.uint8)[..., None]
    labels = digits.target[rows].copy()
    flipped = rng.choice(len(rows), int(flip * len(rows)), replace=False)
    labels[flipped] = (labels[flipped] + 1) % 3
    return images, labels


def test_the_k_fold_keeps_the_budget_that_agrees_best_with_the_given_labels(tmp_path):
    images, labels = _digit_set()
    classes = ["0", "1", "2"]
    params = load_params(write_params(tmp_path, {"clean": {"min_steps": [120, 0, 5]}}))
    probs, embeddings, tried = kfold.kfold_pred_probs(images, labels, 3, params, classes)
    # 5 steps train a fold exactly as 0 do (its 8 epochs make more): run once, smallest first
    assert [t["min_steps"] for t in tried] == [0, 120]
    best = max(tried, key=lambda t: (t["accuracy"], -t["log_loss"]))
    assert [t["chosen"] for t in tried] == [t is best for t in tried]
    assert best["min_steps"] == 120  # 16 steps leave these folds underfit: not the first tried
    for t in tried:  # the scores are those of the run's own out-of-fold predictions
        one = load_params(write_params(tmp_path, {"clean": {"min_steps": t["min_steps"]}}))
        alone, alone_embeddings, _ = kfold.kfold_pred_probs(images, labels, 3, one, classes)
        assert kfold.budget_scores(labels, alone) == {k: t[k] for k in ("accuracy", "log_loss")}
        if t["chosen"]:  # and what the stage goes on with is the chosen run, bit for bit
            assert np.array_equal(alone, probs)
            assert np.array_equal(alone_embeddings, embeddings)


def test_a_budget_wins_on_agreement_then_log_loss_and_a_tie_keeps_the_one_tried_first():
    low = {"accuracy": 0.70, "log_loss": 1.2}
    assert kfold.better({"accuracy": 0.71, "log_loss": 1.5}, low)
    assert kfold.better({"accuracy": 0.70, "log_loss": 1.1}, low)
    assert not kfold.better(dict(low), low)
    assert not kfold.better({"accuracy": 0.69, "log_loss": 0.1}, low)


def test_image_checks_score_every_mode_ingest_accepts_and_leave_the_files_alone(tmp_path, record):
    """CleanVision reads the files itself; a two-channel image (LA) used to crash it."""
    files = []
    for mode, color, fmt, *save in [
        ("L", 30, "PNG"),
        ("LA", (200, 255), "PNG"),
        ("P", 3, "PNG"),
        ("P", 3, "GIF", {"transparency": 3}),
        ("I;16", 40000, "PNG"),
        ("1", 1, "PNG"),
        ("RGBA", (255, 255, 255, 128), "PNG"),
        ("CMYK", (0, 0, 0, 0), "JPEG"),
        ("RGB", (10, 200, 30), "PNG"),
    ]:
        path = tmp_path / f"{mode.replace(';', '_')}.{fmt.lower()}"
        Image.new(mode, (24, 16), color).save(path, format=fmt, **(save[0] if save else {}))
        files.append(path)
    before = {p: p.read_bytes() for p in files}
    params = load_params(write_params(tmp_path))
    found = quality.image_issues(files, params.clean.quality, channels=3)
    assert len(found) == len(files)
    for name in quality.checks_for(3):
        assert found[f"{name}_score"].between(0, 1).all(), name
    assert found.set_axis([p.stem for p in files])["is_grayscale_issue"]["LA"]  # read as gray
    assert {p: p.read_bytes() for p in files} == before
    record("input", "LA, palette, transparent GIF, 16-bit, 1-bit, RGBA, CMYK files at the image checks",
           "scored on a decoded copy; the files untouched", cases=7)  # fmt: skip
