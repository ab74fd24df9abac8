"""`init`: a user's own folder or CSV into data/, params chosen from the images, refusals."""

import shutil
import sys

import pytest
import yaml
from PIL import Image

from pipeline.core.config import load_params
from pipeline.core.errors import PipelineError
from pipeline.tools.init import run

from .conftest import (
    REGIONS,
    ROOT,
    dvc,
    new_project,
    sh,
    stages_ran,
    write_digits,
    write_photos,
)


@pytest.fixture
def project(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "overrides.csv").write_text("path,label\n")  # as a fresh clone has
    return tmp_path


def init(project, source, **kwargs):
    return run(
        source,
        data_dir=project / "data",
        params_path=project / "params.yaml",
        register=False,
        **kwargs,
    )


def test_a_folder_of_colour_photos_gets_colour_params_and_one_round_per_pool(project, tmp_path):
    photos = tmp_path / "photos"
    write_photos(photos, 6)
    write_photos(photos / "test", 2, seed=1)
    write_photos(photos / "unlabeled" / "batch_a", 3, seed=2, flat=True)
    (photos / "notes.txt").write_text("not an image")
    summary = init(project, photos)
    assert summary["classes"] == {name: 6 for name in sorted(REGIONS)}
    assert summary["test"] == 8 and summary["pools"] == {"batch_a": 12}
    assert summary["formats"].keys() == {"JPEG", "PNG"}
    assert any("notes.txt" in s for s in summary["skipped"])
    params = load_params(project / "params.yaml")
    assert (params.base.channels, params.base.image_size, params.augment.hsv.p) == (3, 32, 0.5)
    assert params.clean.quality.low_information == 0.3  # photos: CleanVision's own
    assert {k: (r.pool, r.previous) for k, r in params.rounds.items()} == {
        "r001": ("batch_a", "r000")
    }
    assert "# Every knob of the pipeline" in (project / "params.yaml").read_text()
    copied = project / "data" / "labeled" / "roof" / "0.png"
    assert copied.read_bytes() == (photos / "roof" / "0.png").read_bytes()
    assert len(list((project / "data" / "unlabeled" / "batch_a").iterdir())) == 12
    assert not (project / "data" / "test" / "notes.txt").exists()


def test_grayscale_digits_get_grayscale_params_and_no_pool_gives_no_round(project, tmp_path):
    write_digits(tmp_path / "digits", {0: "zero", 1: "one", 2: "two"}, 5)
    summary = init(project, tmp_path / "digits")  # the labeled/ layout: SRC/labeled/<class>/
    assert summary["classes"] == {"one": 5, "two": 5, "zero": 5} and summary["test"] == 0
    params = load_params(project / "params.yaml")
    assert (params.base.channels, params.base.image_size, params.augment.hsv.p) == (1, 16, 0.0)
    assert params.clean.quality.low_information == 0.15  # tiny digits
    assert params.rounds == {}


def test_a_csv_with_splits_is_read_relative_to_its_folder(project, tmp_path):
    paths = write_photos(tmp_path / "shots", 4, flat=True)
    rows = ["path,label,split"] + [
        f"shots/{p.name},{p.name.split('_')[0]},{'test' if i % 4 == 0 else 'train'}"
        for i, p in enumerate(paths)
    ]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    summary = init(project, tmp_path / "labels.csv", pools=[f"extra={tmp_path / 'shots'}"])
    assert sum(summary["classes"].values()) == 12 and summary["test"] == 4
    assert summary["pools"] == {"extra": 16}
    assert (project / "data" / "labeled" / "roof").is_dir()


def test_refusals_name_the_problem_and_leave_data_alone(project, tmp_path, record):
    (tmp_path / "empty").mkdir()
    write_digits(tmp_path / "one", {0: "zero"}, 3)
    outside = tmp_path / "outside.png"
    Image.new("RGB", (40, 40)).save(outside)
    (tmp_path / "csvs").mkdir()
    escaping = tmp_path / "csvs" / "escape.csv"
    escaping.write_text("path,label\n../outside.png,a\n")
    binary = tmp_path / "csvs" / "binary.csv"
    binary.write_bytes(b"\xff\xfe\x00garbage\x00")
    headerless = tmp_path / "csvs" / "columns.csv"
    headerless.write_text("file,class\nx.png,a\n")
    cases = {
        tmp_path / "empty": "no labeled image found",
        tmp_path / "one": "only one class",
        escaping: "escapes",
        binary: "not a readable CSV|needs a header",
        headerless: "needs a header with path,label",
        tmp_path / "missing": "neither a folder of class folders nor a CSV",
    }
    for source, message in cases.items():
        with pytest.raises(PipelineError, match=message):
            init(project, source)
        assert sorted(p.name for p in (project / "data").iterdir()) == ["overrides.csv"]
    record("input", "init: no class, one class, a path escaping SRC, unreadable CSVs", "refused", 6)


def test_a_second_init_is_refused_and_force_moves_the_old_dataset_aside(project, tmp_path):
    write_photos(tmp_path / "first", 3)
    write_photos(tmp_path / "second", 4, seed=5)
    init(project, tmp_path / "first")
    with pytest.raises(PipelineError, match="already holds a dataset .*--force"):
        init(project, tmp_path / "second")
    summary = init(project, tmp_path / "second", force=True)
    aside = project / summary["moved_aside"].split("/")[-1]
    assert len(list((aside / "labeled").rglob("*.*"))) == 12  # nothing deleted
    assert len(list((project / "data" / "labeled").rglob("*.*"))) == 16


@pytest.mark.slow
def test_init_then_dvc_repro_on_colour_photos_without_truth_or_overrides(tmp_path):
    root = new_project(tmp_path / "project")
    photos = tmp_path / "photos"
    write_photos(photos, 12)
    write_photos(photos / "unlabeled" / "first", 4, seed=3, flat=True)
    out = sh(root, sys.executable, "-m", "pipeline", "init", str(photos)).stdout
    assert "base.channels: 3" in out and "dvc repro" in out
    refused = sh(root, sys.executable, "-m", "pipeline", "init", str(photos), check=False)
    assert refused.returncode == 1 and "--force" in refused.stderr
    assert "Traceback" not in refused.stderr

    uncommitted = tmp_path / "uncommitted"  # a user who skips the commit init asks for
    shutil.copytree(root, uncommitted, symlinks=True)
    before_commit = dvc(uncommitted, "repro", check=False)
    assert before_commit.returncode != 0
    assert "commit once before" in before_commit.stdout + before_commit.stderr
    assert "Traceback" not in before_commit.stdout + before_commit.stderr
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "my data")
    ran = stages_ran(dvc(root, "repro").stdout)
    assert {"ingest", "clean", "train", "evaluate", "pseudolabel@r001", "summarize"} <= ran
    ingest = yaml.safe_load((root / "artifacts/ingest/metrics.json").read_text())
    assert ingest["test_images"] > 0  # held out of labeled: no test folder was given
    assert (root / "artifacts/augment/preview.png").stat().st_size > 1000
    assert (root / "artifacts/reports/r001/evaluate/report.html").is_file()
