"""The crosscheck: a model of the pseudo-labels alone relabels the human rows it disagrees with."""

import subprocess

import numpy as np
import pandas as pd
from sklearn.datasets import load_digits

from pipeline import train
from pipeline.config import load_params
from pipeline.crosscheck import MIN_PER_CLASS, decide
from pipeline.io import ShardWriter, read_json, read_table

from .conftest import train_table, val_table, write_params
from .test_train import _augment, _stage_args, train_command

DIGIT = {"zero": 0, "one": 1, "two": 2}


def write_pool(folder, per_class: int, labels: dict[str, int] | None = None):
    """A pseudo-label folder of right labels on digits the `ingested` fixture never wrote (its
    images are the first 40 of each class); `labels` accepts only that many of a class."""
    digits = load_digits()
    images, names = [], []
    for name, digit in DIGIT.items():
        count = (labels or {}).get(name, per_class)
        index = np.flatnonzero(digits.target == digit)[40 : 40 + count]
        images.append(np.clip(digits.images[index] * 16, 0, 255).astype(np.uint8)[..., None])
        names += [name] * count
    writer = ShardWriter(folder / "images", (8, 8, 1))
    writer.extend(np.concatenate(images))
    writer.close()
    pd.DataFrame(
        {
            "id": [f"p{i}" for i in range(len(names))],
            "row": range(len(names)),
            "accepted": "True",
            "label": names,
            "human": "",
        }
    ).to_csv(folder / "table.csv", index=False)
    return folder


def flipped(table_path, rows: dict[int, str], person: int | None = None):
    """A copy of the training table beside it with wrong labels on `rows`, as cleaning would
    leave them; `person` marks one of them as a person's decision (data/overrides.csv)."""
    table = read_table(table_path)
    table["reason"] = ""
    for row, label in rows.items():
        table.loc[row, "label"] = label
    if person is not None:
        table.loc[person, "reason"] = f"override: {rows[person]} (data/overrides.csv)"
    path = table_path.with_name("flipped.csv")
    table.to_csv(path, index=False)
    return path


def test_a_model_of_the_pseudo_labels_alone_relabels_the_wrong_human_rows_but_not_a_persons(
    ingested, project
):
    write_params(project, {"train": {"min_steps": 300, "crosscheck": 0.01}})
    table_path = train_table(ingested)
    original = read_table(table_path)
    wrong = {0: "two", 31: "zero", 50: "one", 60: "one"}  # rows of each class made wrong
    assert [original.loc[r, "label"] for r in wrong] == ["one", "two", "zero", "zero"]
    _augment(project, ingested)
    pseudo = write_pool(project / "pseudo", 80)
    args = _stage_args(project, ingested, "r001") | {
        "pseudo_dir": pseudo,
        "table_path": flipped(table_path, wrong, person=60),
    }
    summary = train.run(**args)

    relabeled = read_table(args["report_dir"] / "crosschecked.csv").set_index("id")
    # every wrong row back to its true class but the person's (60); no right row touched
    assert relabeled["label"].to_dict() == {
        original.loc[r, "id"]: original.loc[r, "label"] for r in (0, 31, 50)
    }
    assert relabeled["cleaned_label"].to_dict() == {
        original.loc[r, "id"]: wrong[r] for r in (0, 31, 50)
    }
    assert (relabeled["label_probability"].astype(float) <= 0.01).all()
    assert (relabeled["confidence"].astype(float) >= 0.5).all()
    assert summary["crosscheck_relabeled"] == 3
    check = read_json(args["report_dir"] / "diagnostics.json")["crosscheck"]
    assert check["pseudo"] == 240 and check["relabeled"] == 3 and check["val_acc"] > 0.8
    # the round trained on the relabeled rows: as many as before, the person's row as they said
    assert summary["train_size_human"] == len(original) and summary["train_size_pseudo"] == 240
    trained = read_table(args["report_dir"] / "per_class.csv").set_index("class")["human"]
    expected = original["label"].value_counts().to_dict()
    expected["zero"] -= 1
    expected["one"] += 1
    assert trained.astype(int).to_dict() == expected

    write_params(project, {"train": {"min_steps": 300, "crosscheck": 0}})
    off = args | {
        "params": load_params(project / "params.yaml"),
        "model_dir": project / "off" / "model",
        "report_dir": project / "off" / "train",
        "live_dir": project / "off" / "live",
        "state_dir": project / "off" / ".state",
    }
    assert "crosscheck_relabeled" not in train.run(**off)  # off: the summary page shows no column
    assert read_table(off["report_dir"] / "crosschecked.csv").empty


def test_round_zero_and_thin_pseudo_sets_are_not_crosschecked(ingested, project):
    write_params(project, {"train": {"crosscheck": 0.01}})
    table_path = train_table(ingested)
    _augment(project, ingested)
    summary = train.run(**_stage_args(project, ingested))  # r000: no pseudo-label set
    assert "crosscheck_relabeled" not in summary
    few = {"zero": MIN_PER_CLASS, "one": MIN_PER_CLASS - 1, "two": MIN_PER_CLASS - 1}
    pseudo = write_pool(project / "pseudo", 0, few)
    args = _stage_args(project, ingested, "r001") | {"pseudo_dir": pseudo}
    assert train.run(**args)["crosscheck_relabeled"] == 0
    check = read_json(args["report_dir"] / "diagnostics.json")["crosscheck"]
    assert "fewer than two classes" in check["skipped"]
    assert table_path.is_file()


def test_decide_overturns_only_a_label_the_checker_finds_next_to_impossible():
    classes = ["a", "b", "c"]
    human = pd.DataFrame(
        {
            "id": ["r0", "r1", "r2", "r3", "r4"],
            "path": [f"labeled/x/{i}.png" for i in range(5)],
            "label": ["a", "a", "a", "a", "b"],
            "given_label": ["c", "a", "a", "a", "b"],
            "reason": ["", "", "", "", "override: b (data/overrides.csv)"],
        }
    )
    probs = np.array(
        [
            [0.005, 0.99, 0.005],  # a at 0.005, b at 0.99: relabeled
            [0.05, 0.9, 0.05],  # confident in b, but a at 0.05 is not next to impossible
            [0.9, 0.05, 0.05],  # agrees
            [0.006, 0.497, 0.497],  # a next to impossible, but no class holds half
            [0.9, 0.005, 0.095],  # b next to impossible, but a person decided b
        ]
    )
    known = np.array([True, True, True])
    out = decide(human, probs, classes, known, 0.01)
    assert out.to_dict("records") == [
        {
            "id": "r0",
            "path": "labeled/x/0.png",
            "given_label": "c",
            "cleaned_label": "a",
            "label": "b",
            "confidence": 0.99,
            "label_probability": 0.005,
        }
    ]
    assert list(decide(human, probs, classes, known, 0.05)["id"]) == ["r0", "r1"]
    # a class the pseudo-labels barely hold is neither left nor joined
    assert decide(human, probs, classes, np.array([True, False, True]), 0.01).empty
    assert decide(human, probs, classes, np.array([False, True, True]), 0.01).empty
    # a table without a reason column (an older clean stage) is checked all the same
    assert list(decide(human.drop(columns="reason"), probs, classes, known, 0.01)["id"]) == [
        "r0",
        "r4",
    ]


def test_offline_copies_follow_their_rows_new_label(ingested, project):
    write_params(project, {"augment": {"offline_copies": 1}})
    table_path = train_table(ingested)
    _augment(project, ingested)
    classes = read_json(ingested / "classes.json")
    table = read_table(table_path)
    moved = table[table["label"] == "zero"].head(3)
    relabel = pd.DataFrame({"id": moved["id"], "label": "two"})
    args = (table_path, val_table(table_path), ingested / "images", classes, None)
    _, _, before, _ = train.load_training_samples(*args, project / "artifacts" / "augment")
    _, _, after, _ = train.load_training_samples(
        *args, project / "artifacts" / "augment", relabel=relabel
    )
    for column in ("human", "offline"):
        assert after.loc["zero", column] == before.loc["zero", column] - 3
        assert after.loc["two", column] == before.loc["two", column] + 3


def test_under_torchrun_the_first_process_decides_and_every_process_trains_on_it(ingested, project):
    write_params(project, {"train": {"min_steps": 300, "crosscheck": 0.01, "nproc": 2}})
    table_path = train_table(ingested)
    original = read_table(table_path)
    _augment(project, ingested)
    pseudo = write_pool(project / "pseudo", 80)
    wrong = {0: "two", 31: "zero", 50: "one"}
    command = train_command(flipped(table_path, wrong), ingested, "r001")
    result = subprocess.run(
        [*command, "--pseudo", str(pseudo)], cwd=project, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes (gloo)" in result.stderr
    assert result.stderr.count("crosscheck: a model of the 240 pseudo-labels") == 1
    report = project / "artifacts/reports/r001/train"
    relabeled = read_table(report / "crosschecked.csv").set_index("id")
    assert relabeled["label"].to_dict() == {
        original.loc[r, "id"]: original.loc[r, "label"] for r in wrong
    }
    summary = read_json(report / "diagnostics.json")["summary"]
    assert summary["crosscheck_relabeled"] == 3
