import subprocess
import sys

import pytest
import yaml
from ruamel.yaml import YAML

from pipeline.core.config import Params, load_params
from pipeline.core.errors import PipelineError
from pipeline.core.io import edit_yaml
from pipeline.core.typed import read_yaml, to_dict
from pipeline.tools.tune import build_mesh, parse_range

from .conftest import ROOT, write_params


def test_project_params_load():
    params = load_params(ROOT / "params.yaml")
    assert params.train.model.blocks == (1, 1, 1)
    assert set(params.rounds) == {"r001", "r002"}


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"train": {"lrr": 0.1}}, "unknown key 'train.lrr'"),
        ({"train": {"lr": "fast"}}, "train.lr: expected a number"),
        ({"train": {"lr": -0.1}}, "train.lr: -0.1 is out of range; allowed (0.0, 10.0]"),
        (
            {"pseudolabel": {"threshold": 1.5}},
            "pseudolabel.threshold: 1.5 is out of range; allowed [0.0, 1.0]",
        ),
        ({"clean": {"folds": 0}}, "clean.folds: 0 is out of range; allowed [2, 20]"),
        ({"clean": {"policy": "burn"}}, "clean.policy: 'burn' is not one of relabel, drop, flag"),
        ({"train": {"model": {"blocks": [1, -1]}}}, "train.model.blocks[1]: -1 is out of range"),
        ({"augment": {"crop": {"scale": [1.0, 0.5]}}}, "augment.crop.scale: expected [low, high]"),
        ({"augment": {"twirl": {"p": 0.5}}}, "unknown key 'augment.twirl'"),
        ({"augment": {"exclude": {"6": ["spin"]}}}, "augment.exclude.6: unknown transform 'spin'"),
        (
            {"base": {"channels": 1}, "augment": {"hsv": {"p": 0.5}}},
            "augment.hsv.p: HSV shifts need colour images",
        ),
        (
            {"base": {"channels": 2}, "augment": {"hsv": {"p": 0.5}}},
            "base.channels is 2",
        ),
        ({"base": {"image_size": "large"}}, "base.image_size: expected an integer or auto"),
        ({"base": {"channels": 2.0}}, "base.channels: expected an integer or auto"),
        ({"pseudolabel": {"balance": "yes"}}, "pseudolabel.balance: expected true or false"),
        ({"train": {"epochs": 2.5}}, "train.epochs: expected an integer"),
        ({"clean": {"min_steps": []}}, "clean.min_steps: expected at least one value"),
        ({"clean": {"min_steps": [150, -1]}}, "clean.min_steps[1]: -1 is out of range"),
        ({"clean": {"min_steps": "long"}}, "clean.min_steps: expected an integer"),
        ({"demo": {"train_min_steps": -1}}, "demo.train_min_steps: -1 is out of range"),
        ({"demo": {"train_min_steps": 2.5}}, "demo.train_min_steps: expected an integer"),
        ({"demo": {"clean_min_steps": []}}, "demo.clean_min_steps: expected at least one value"),
        ({"demo": {"clean_min_steps": [150, -5]}}, "demo.clean_min_steps[1]: -5 is out of range"),
        ({"demo": {"clean_min_steps": "short"}}, "demo.clean_min_steps: expected an integer"),
        ({"cluster": {"engine": "spark"}}, "cluster.engine: 'spark' is not one of local, ray"),
        ({"cluster": {"address": "head 6379"}}, "cluster.address: head 6379 is not an address"),
        ({"cluster": {"workers": 0}}, "cluster.workers: 0 is out of range"),
        ({"cluster": {"cpus_per_worker": 0}}, "cluster.cpus_per_worker: 0.0 is out of range"),
    ],
)
def test_refuses_bad_params_with_key_path(tmp_path, extra, expected, record):
    path = write_params(tmp_path, extra)
    with pytest.raises(PipelineError) as err:
        load_params(path)
    assert expected in str(err.value)
    record(
        "params",
        "hand-picked bad values: wrong type, out of range, unknown key or choice",
        "refused with the key path and what is allowed",
    )


def test_one_k_fold_budget_may_be_written_as_a_number(tmp_path):
    assert load_params(write_params(tmp_path, {"clean": {"min_steps": 600}})).clean.min_steps == (
        600,
    )


def test_refuses_invalid_yaml(tmp_path, record):
    path = tmp_path / "params.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(PipelineError, match="not valid YAML"):
        load_params(path)
    record("params", "params.yaml that is not valid YAML", "one error line")


def test_hsv_allowed_with_colour_images(tmp_path):
    path = write_params(tmp_path, {"base": {"channels": 3}, "augment": {"hsv": {"p": 0.5}}})
    assert load_params(path).augment.hsv.p == 0.5


def test_cli_prints_one_line_and_exits_nonzero_on_bad_params(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["clean"]["folds"] = 0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "ingest"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: clean.folds: 0 is out of range; allowed [2, 20]"
    ]
    assert "Traceback" not in result.stderr


def test_cli_missing_data_folder_is_one_clear_line(tmp_path):
    write_params(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "ingest"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "error: no labeled data" in result.stderr
    assert "Traceback" not in result.stderr


def test_typed_defaults_equal_the_committed_params():
    committed = read_yaml(ROOT / "params.yaml")
    committed.pop("rounds")
    assert to_dict(Params()) | {"rounds": {}} == {**committed, "rounds": {}}


@pytest.mark.parametrize("text", ["5e-4", "1e-05", "1E-3", "1.0e-4", "0.0005", "1e+0"])
def test_numbers_in_exponent_form_are_numbers_as_dvc_reads_them(tmp_path, text):
    path = write_params(tmp_path)
    path.write_text(path.read_text().replace("weight_decay: 0.0005", f"weight_decay: {text}", 1))
    assert load_params(path).clean.weight_decay == float(text)  # the first weight_decay


def test_every_value_tune_queues_is_read_back_as_the_same_number(tmp_path):
    ranges = [parse_range("train.lr=1e-1:1e-5"), parse_range("train.weight_decay=1e-3:1e-6")]
    points = build_mesh(ranges, per_decade=1, jitter=0.0, seed=0)
    points += build_mesh(ranges, per_decade=2, jitter=0.5, seed=1)
    path = write_params(tmp_path)
    for point in points:
        for key, value in point.items():
            # as `dvc exp run -S key=value` does: the text parsed as YAML, written back with
            # ruamel's round-trip dumper (it keeps 1e-05 as 1e-05)
            section, leaf = key.split(".")
            parsed = YAML(typ="safe", pure=True).load(f"{value}")
            edit_yaml(path, lambda doc, s=section, k=leaf, v=parsed: doc[s].__setitem__(k, v))
            assert getattr(getattr(load_params(path), section), leaf) == value


HOSTILE_POOLS = ("../../x", "a/b", ".hidden", "", "p$(touch PWNED)", "Batch 2", "=cmd", "drop")


def test_a_pool_name_a_shell_or_a_path_could_misread_is_refused_naming_the_key(tmp_path, record):
    for pool in HOSTILE_POOLS:
        path = write_params(tmp_path, {"rounds": {"r001": {"pool": pool, "previous": "r000"}}})
        with pytest.raises(PipelineError, match=r"rounds\.r001\.pool .* is refused: "):
            load_params(path)
    record(
        "params",
        "a round's pool outside data/unlabeled/, with shell syntax, a space, a leading `=`, "
        "a reserved word",
        "refused with the key path",
        len(HOSTILE_POOLS),
    )
    for key in ("r1", "x001", "r0001", "r001; touch PWNED"):
        path = write_params(tmp_path, {"rounds": {key: {"pool": "pool_001", "previous": "r000"}}})
        with pytest.raises(PipelineError, match=r"rounds: round key .* must be r followed by 3"):
            load_params(path)
    record("params", "a round key other than rNNN", "refused, named", 4)
    for rounds in ({"r000": {"pool": "a"}}, {"r001": {"pool": "a", "previous": "r005"}}):
        path = write_params(tmp_path, {"rounds": rounds})
        with pytest.raises(PipelineError, match=r"rounds\.r00.: r000 is the round trained on"):
            load_params(path)
    record("params", "a round named r000 or following an unknown round", "refused, named", 2)
