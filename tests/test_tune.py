import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline import tune
from pipeline.errors import PipelineError

from .conftest import ROOT, sh, write_digits, write_params, write_truth


def test_mesh_is_log_spaced_jittered_within_cells_and_seeded():
    ranges = [
        tune.parse_range("train.lr=1e-1:1e-4"),
        tune.parse_range("train.weight_decay=1e-6:1e-3"),
    ]
    mesh = tune.build_mesh(ranges, per_decade=1, jitter=0.5, seed=3)
    assert len(mesh) == 16
    for key, r in (("train.lr", ranges[0]), ("train.weight_decay", ranges[1])):
        logs = np.array(sorted({round(math.log10(p[key]), 6) for p in mesh}))
        assert r.low <= 10 ** logs.min() and 10 ** logs.max() <= r.high * 1.0001
        grid = np.linspace(math.log10(r.low), math.log10(r.high), 4)
        nearest = np.abs(logs[:, None] - grid[None, :]).min(1)
        assert (nearest <= 0.25 + 1e-6).all()  # within half a jittered cell of its grid value
    assert len({tuple(p.values()) for p in mesh}) == 16  # jitter makes every point distinct
    assert mesh == tune.build_mesh(ranges, per_decade=1, jitter=0.5, seed=3)
    assert mesh != tune.build_mesh(ranges, per_decade=1, jitter=0.5, seed=4)


def test_batch_size_is_locked_unless_unlocked():
    with pytest.raises(PipelineError, match="locked"):
        tune.parse_range("train.batch_size=16:256")
    assert tune.parse_range("train.batch_size=16:256", unlock_batch_size=True).high == 256
    with pytest.raises(PipelineError, match="KEY=LOW:HIGH"):
        tune.parse_range("train.lr=fast")


def test_refine_narrows_around_the_best_and_extends_past_a_border():
    results = pd.DataFrame(
        {
            "train.lr": [1e-3, 1e-3, 1e-2, 1e-2],
            "train.weight_decay": [1e-4, 1e-3, 1e-4, 1e-3],
            "acc": [0.5, 0.6, 0.9, 0.7],
        }
    )
    points, borders = tune.refine_mesh(results, ["train.lr", "train.weight_decay"], "acc")
    assert len(points) == 9
    assert borders == {"train.lr": "high", "train.weight_decay": "low"}
    lrs = sorted({p["train.lr"] for p in points})
    assert (
        lrs[0] == pytest.approx(1e-2) and lrs[-1] > 1e-2
    )  # past the upper border, 1/3-decade steps
    assert math.log10(lrs[1] / lrs[0]) == pytest.approx(1 / 3, abs=1e-3)
    wds = sorted({p["train.weight_decay"] for p in points})
    assert wds[-1] == pytest.approx(1e-4) and wds[0] < 1e-4


@pytest.mark.slow
def test_grid_runs_through_the_real_dvc_queue_and_refine_proposes_points_around_the_best(tmp_path):
    for name in ("pipeline", "dvc.yaml", ".gitignore"):
        sh(tmp_path, "cp", "-r", str(ROOT / name), str(tmp_path / name))
    data = tmp_path / "data"
    write_truth(data, write_digits(data, {0: "zero", 1: "one", 2: "two"}, 30, test_per_class=10))
    (data / "overrides.csv").write_text("path,label\n")
    write_params(tmp_path)
    dvc = [sys.executable, "-m", "dvc"]
    sh(tmp_path, "git", "init", "-q")
    sh(tmp_path, *dvc, "init", "-q")
    sh(tmp_path, *dvc, "add", "-q", "data/labeled", "data/test", "data/truth.csv")
    sh(tmp_path, "git", "add", "-A")
    sh(tmp_path, "git", "commit", "-qm", "project")
    sh(tmp_path, *dvc, "repro", "train")
    sh(tmp_path, "git", "add", "-A")
    sh(tmp_path, "git", "commit", "-qm", "round 0")
    params_before = (tmp_path / "params.yaml").read_text()

    cli = [sys.executable, "-m", "pipeline", "tune"]
    sh(
        tmp_path,
        *cli,
        "--param",
        "train.lr=1e-2:1e-3",
        "--param",
        "train.weight_decay=1e-3:1e-4",
        "--per-decade",
        "1",
        "--epochs",
        "1",
        "--run",
        "-j",
        "1",
    )
    results = tune_results(tmp_path)
    assert len(results) == 4
    assert len({(r["train.lr"], r["train.weight_decay"]) for r in results}) == 4
    assert all(r["train.epochs"] == 1 for r in results)
    assert (tmp_path / "params.yaml").read_text() == params_before  # workspace untouched

    report = sh(tmp_path, *cli, "--report")
    assert "ensemble_val_acc" in report.stdout
    assert (tmp_path / "artifacts/tune/report/heatmap.png").stat().st_size > 1000

    pair = [r["name"] for r in results[:2]]
    combined = sh(tmp_path, sys.executable, "-m", "pipeline", "ensemble", *pair).stdout
    assert "ensemble of all" in combined and all(name in combined for name in pair)
    assert len(list((tmp_path / "artifacts/tune/ensemble" / pair[0]).glob("epoch_*.pt"))) >= 1

    sh(tmp_path, *cli, "--refine")
    queued = sh(tmp_path, *dvc, "queue", "status").stdout
    assert queued.count("Queued") == 9
    best = max(results, key=lambda r: r["ensemble_val_acc"])
    proposed = json.loads((tmp_path / "artifacts/tune/proposed.json").read_text())
    for point in proposed:
        assert abs(math.log10(point["train.lr"] / best["train.lr"])) <= 2 / 3 + 1e-6
    sh(tmp_path, *dvc, "queue", "remove", "--all")

    applied = sh(tmp_path, *cli, "--apply", best["name"])
    assert "wrote train.lr=" in applied.stdout
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    assert params["train"]["lr"] == pytest.approx(best["train.lr"])


def tune_results(root):
    code = "from pipeline import tune; import json; print(tune.experiments().to_json(orient='records'))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)
