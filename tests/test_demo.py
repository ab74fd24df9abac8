"""demo-data: the quick start's dataset, and the short training budgets it writes into
params.yaml (demo.train_min_steps, demo.clean_min_steps, demo.clean_embedding_steps) with every
comment kept, leaving the
committed general defaults to data a user brings."""

import subprocess
import sys

import pytest
import yaml

from pipeline.core.config import load_params
from pipeline.core.io import edit_yaml
from pipeline.tools import demo

from .conftest import ROOT


@pytest.fixture
def params_path(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    return path


def set_keys(path, **sections):
    def edit(doc):
        for section, values in sections.items():
            doc[section].update(values)

    edit_yaml(path, edit)


def test_demo_data_writes_its_budgets_into_params_and_keeps_the_comments(tmp_path, params_path):
    before = yaml.safe_load(params_path.read_text())
    params = load_params(params_path)
    assert (before["train"]["min_steps"], before["clean"]["min_steps"]) == (3000, [150, 600])
    assert before["clean"]["embedding_steps"] == 400

    counts = demo.run(tmp_path / "data", params, register=False, params_path=params_path)

    text = params_path.read_text()
    after = yaml.safe_load(text)
    assert after["train"]["min_steps"] == params.demo.train_min_steps == 200
    assert after["clean"]["min_steps"] == list(params.demo.clean_min_steps) == [60]
    assert after["clean"]["embedding_steps"] == params.demo.clean_embedding_steps == 0
    assert "  min_steps: [60]" in text  # the list keeps its flow style
    for comment in (
        "# optimizer steps at least: a small set is passed over several times an epoch",
        "# optimizer steps per fold at least; of several, the one whose",
        "# demo-data writes these into train.min_steps, clean.min_steps and",
        "# seeds numpy",
        "# One entry per unlabeled pool",
    ):
        assert comment in text, comment
    for doc in (after, before):  # nothing else changed
        doc["train"].pop("min_steps"), doc["clean"].pop("min_steps")
        doc["clean"].pop("embedding_steps")
    assert after == before
    # the demo's share: a tenth of the non-test digits labeled, 15% of those flipped
    non_test = counts["labeled"] + counts["pool_001"] + counts["pool_002"]
    assert counts["labeled"] == pytest.approx(0.1 * non_test, abs=10)
    assert counts["flipped"] == round(0.15 * counts["labeled"])
    assert load_params(params_path).rounds.keys() == {"r001", "r002"}  # one round per pool


def test_budgets_are_written_as_given_and_a_second_write_changes_nothing(params_path):
    budgets = {"train_min_steps": 250, "clean_min_steps": [100, 400], "clean_embedding_steps": 60}
    set_keys(params_path, demo=budgets)
    demo.write_budgets(params_path, load_params(params_path).demo)
    params = load_params(params_path)
    assert (params.train.min_steps, params.clean.min_steps) == (250, (100, 400))
    assert params.clean.embedding_steps == 60
    text = params_path.read_text()
    assert "  min_steps: [100, 400]" in text
    demo.write_budgets(params_path, params.demo)
    assert params_path.read_text() == text


@pytest.mark.parametrize(
    ("written", "budget", "expected_line"),
    [
        (600, [150], "  min_steps: 150"),  # a number stays a number
        (600, [150, 300], "  min_steps: [150, 300]"),
        (None, [150], "  min_steps: 150"),  # the key was missing
    ],
)
def test_a_k_fold_budget_written_as_a_number_is_replaced_in_kind(
    params_path, written, budget, expected_line
):
    def edit(doc):
        if written is None:
            del doc["clean"]["min_steps"]
        else:
            doc["clean"]["min_steps"] = written
        doc["demo"]["clean_min_steps"] = budget

    edit_yaml(params_path, edit)
    demo.write_budgets(params_path, load_params(params_path).demo)
    lines = [line.split("  #")[0].rstrip() for line in params_path.read_text().splitlines()]
    assert expected_line in lines
    if written is not None:
        assert "optimizer steps per fold at least" in params_path.read_text()  # its comment kept
    assert load_params(params_path).clean.min_steps == tuple(budget)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("train_min_steps", -1, "demo.train_min_steps: -1 is out of range"),
        ("train_min_steps", "long", "demo.train_min_steps: expected an integer"),
        ("clean_min_steps", [], "demo.clean_min_steps: expected at least one value"),
        ("clean_min_steps", [150, 2.5], "demo.clean_min_steps[1]: expected an integer"),
        ("clean_embedding_steps", -5, "demo.clean_embedding_steps: -5 is out of range"),
    ],
)
def test_demo_data_refuses_a_bad_budget_before_writing_anything(
    tmp_path, params_path, key, value, message, record
):
    set_keys(params_path, demo={key: value})
    written = params_path.read_text()
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "demo-data", "--no-register"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()
    assert params_path.read_text() == written
    record(
        "params",
        "demo-data with a bad demo budget (wrong type, out of range, empty list)",
        "refused with the key path; no data written, params.yaml unchanged",
    )
