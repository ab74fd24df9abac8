"""predict: new images classified by a round's ensemble, as the evaluate stage scores them."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import load_params
from pipeline.core.errors import PipelineError
from pipeline.stages import evaluate
from pipeline.tools import predict

from .conftest import ROOT, augment_and_train, ingest_digits, train_table, write_params


@pytest.fixture(scope="module")
def round0(tmp_path_factory):
    """A trained round r000 on 3 digit classes and its evaluate stage's predictions."""
    root = tmp_path_factory.mktemp("predict")
    params = load_params(write_params(root))
    ingest_dir = ingest_digits(root)
    model = augment_and_train(root, ingest_dir, train_table(ingest_dir), params)
    evaluate.run(model, ingest_dir, None, root / "evaluate", params, "r000", root / "data")
    return root, params


def test_predicts_what_evaluate_scored_and_gives_bad_files_a_reason(round0, tmp_path, record):
    root, params = round0
    folder = tmp_path / "new"
    shutil.copytree(root / "data" / "test", folder)
    good = sorted(folder.rglob("*.png"))
    (folder / "truncated.png").write_bytes(good[0].read_bytes()[:40])
    (folder / "notes.png").write_text("not an image")

    counts = predict.run([folder], model_dir=root / "model", out=tmp_path / "p.csv", params=params)

    rows = pd.read_csv(tmp_path / "p.csv", dtype=str, keep_default_na=False)
    assert counts == {"files": len(good) + 2, "classified": len(good), "refused": 2}
    assert len(rows) == len(good) + 2
    refused = rows[rows["reason"] != ""]
    assert sorted(refused["path"].str.rsplit("/", n=1).str[-1]) == ["notes.png", "truncated.png"]
    assert refused["predicted"].eq("").all()
    scored = pd.read_csv(root / "evaluate" / "predictions.csv", dtype=str)
    scored["key"] = scored["path"].str.removeprefix("test/")
    rows["key"] = rows["path"].str.removeprefix(f"{folder}/")
    both = scored.merge(rows, on="key", suffixes=("_eval", ""))
    assert len(both) == len(good)
    assert (both["predicted_eval"] == both["predicted"]).all()
    assert (
        both["confidence_eval"].astype(float) - both["confidence"].astype(float)
    ).abs().max() < 1e-5
    assert rows.loc[rows["reason"] == "", "top_k"].str.count(";").eq(2).all()  # 3 classes
    record("input", "predict: a truncated PNG and a text file named .png among new images",
           "a row each with the reason; the others as evaluate scores them", 2)  # fmt: skip


def test_a_csv_of_paths_and_a_missing_path(round0, tmp_path):
    root, params = round0
    image = next((root / "data" / "test").rglob("*.png"))
    listing = tmp_path / "list.csv"
    listing.write_text(f"path\n{image}\n")
    predict.run([listing], model_dir=root / "model", out=tmp_path / "p.csv", params=params)
    assert len(pd.read_csv(tmp_path / "p.csv")) == 1
    with pytest.raises(PipelineError, match="no such file or folder"):
        predict.run([tmp_path / "nope"], model_dir=root / "model", out=tmp_path / "q.csv",
                    params=params)  # fmt: skip


def test_the_command_writes_the_csv(round0, tmp_path):
    root, _ = round0
    image = next((root / "data" / "test").rglob("*.png"))
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "predict", str(image), "--model", str(root / "model"),
         "--out", str(tmp_path / "p.csv"), "--params", str(root / "params.yaml")],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(pd.read_csv(tmp_path / "p.csv")) == 1


def test_the_last_trained_round_predicts_unless_one_is_named(tmp_path):
    for name in ("r000", "r002", "r001"):
        (tmp_path / name / "model").mkdir(parents=True)
        (tmp_path / name / "model" / "ensemble.json").write_text("{}")
    (tmp_path / "r003" / "model").mkdir(parents=True)  # not trained yet: no ensemble.json
    assert predict.round_model(tmp_path, None) == tmp_path / "r002" / "model"
    assert predict.round_model(tmp_path, "r001") == tmp_path / "r001" / "model"
    with pytest.raises(PipelineError, match="round key"):
        predict.round_model(tmp_path, "../x")
    with pytest.raises(PipelineError, match="no trained round"):
        predict.round_model(tmp_path / "none", None)


def test_the_onnx_model_gives_the_ensembles_calibrated_probabilities(round0, tmp_path):
    import onnxruntime

    from pipeline.core.io import read_array
    from pipeline.tools import export_model
    from pipeline.training.ensemble import load_ensemble

    root, params = round0
    info = export_model.run(root / "model", tmp_path, params, "r000")
    images = np.asarray(read_array(root / "artifacts" / "ingest" / "images"))
    expected = load_ensemble(root / "model").predict(images)
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"))
    got = session.run(["probabilities"], {"images": images})[0]
    assert got.shape == expected.shape and np.abs(got - expected).max() <= 1e-4
    classes = (root / "artifacts" / "ingest" / "classes.json").read_text()
    assert info["classes"] == json.loads(classes) and info["temperature"] > 0
    assert (tmp_path / "model.json").is_file() and info["input"]["dtype"] == "uint8"
