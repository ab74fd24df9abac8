import subprocess
import sys

import pytest
import yaml

from pipeline.config import load_params
from pipeline.errors import PipelineError

from .conftest import ROOT, write_params


def test_project_params_load():
    params = load_params(ROOT / "params.yaml")
    assert params.train.model.blocks == (1, 1, 1)
    assert set(params.rounds) == {"r000", "r001"}


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
        ({"clean": {"policy": "burn"}}, "clean.policy: 'burn' is not one of drop, relabel, flag"),
        ({"train": {"model": {"blocks": [1, -1]}}}, "train.model.blocks[1]: -1 is out of range"),
        ({"augment": {"crop": {"scale": [1.0, 0.5]}}}, "augment.crop.scale: expected [low, high]"),
        ({"augment": {"twirl": {"p": 0.5}}}, "unknown key 'augment.twirl'"),
        ({"augment": {"exclude": {"6": ["spin"]}}}, "augment.exclude.6: unknown transform 'spin'"),
        ({"augment": {"hsv": {"p": 0.5}}}, "augment.hsv.p: HSV shifts need colour images"),
        ({"pseudolabel": {"balance": "yes"}}, "pseudolabel.balance: expected true or false"),
        ({"train": {"epochs": 2.5}}, "train.epochs: expected an integer"),
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
