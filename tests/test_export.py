"""export: the improved dataset (every labeled and pool file once, with its final label and
where it came from) as labels.csv and an ImageFolder tree."""

import shutil

import pandas as pd
import pytest

from pipeline.core.config import load_params
from pipeline.core.errors import PipelineError
from pipeline.data.dataset_table import COLUMNS, dataset_table
from pipeline.stages import dataset
from pipeline.tools import export

from .conftest import run_pool_round, write_digits, write_params, write_pool, write_truth


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Real stages on digits with flipped labels: ingest, clean, r000, then one pool round."""
    root = tmp_path_factory.mktemp("export")
    # min_confidence 0.5: the tiny test model is rarely 90% sure, and the set must not be empty
    extra = {"train": {"epochs": 10}, "pseudolabel": {"min_confidence": 0.5}}
    params = load_params(write_params(root, extra))
    data, art = root / "data", root / "artifacts"
    write_truth(data, write_digits(data, {0: "zero", 1: "one", 2: "two"}, 30, flip=0.15,
                                   test_per_class=10))  # fmt: skip
    (data / "labeled" / "one" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    pool = data / "unlabeled" / "pool_001"
    write_pool(pool, 200, 240)
    (pool / "notes.png").write_text("not an image")
    run_pool_round(root, params, cleaned=True)
    dataset.run(art, art / "dataset")
    return root


def files_under(folder):
    return sorted(p.relative_to(folder.parent).as_posix() for p in folder.rglob("*") if p.is_file())


def test_every_labeled_and_pool_file_is_accounted_for_once(workspace):
    data = workspace / "data"
    table = dataset_table(workspace / "artifacts")
    written = pd.read_csv(
        workspace / "artifacts/dataset/labels.csv", dtype=str, keep_default_na=False
    )
    assert list(table.columns) == COLUMNS and written.equals(table)  # what the stage wrote
    expected = files_under(data / "labeled") + files_under(data / "unlabeled")
    assert sorted(table.loc[table["split"] != "test", "path"]) == sorted(expected)  # each once
    assert sorted(table.loc[table["split"] == "test", "path"]) == files_under(data / "test")
    kept, aside = table[table["label"] != ""], table[table["label"] == ""]
    assert (aside["set_aside"] != "").all() and (kept["set_aside"] == "").all()
    assert set(kept["source"]) <= {"human", "relabeled", "override", "pseudo", "answer"}
    assert {"pseudo", "human"} <= set(kept["source"]) and "validation" in set(table["split"])
    by_path = table.set_index("path")
    assert "quarantined at ingest" in by_path.loc["labeled/one/broken.png", "set_aside"]
    assert "pseudolabel@r001" in by_path.loc["unlabeled/pool_001/notes.png", "set_aside"]
    pseudo = kept[kept["source"] == "pseudo"]
    assert (pseudo["round"] == "r001").all() and pseudo["confidence"].astype(float).min() > 0
    issues = pd.read_csv(workspace / "artifacts/clean/issues.csv", dtype=str, keep_default_na=False)
    relabeled = issues[issues["decision"] == "relabel"]
    assert (by_path.loc[relabeled["path"], "source"] == "relabeled").all()


def test_export_writes_the_tree_the_table_describes_and_never_half_or_twice(workspace, tmp_path):
    dest = tmp_path / "improved"
    counts = export.run(dest, artifacts=workspace / "artifacts", data_dir=workspace / "data")
    table = pd.read_csv(dest / "labels.csv", dtype=str, keep_default_na=False)
    kept = table[table["label"] != ""]
    tree = {p.name: p.parent.name for p in dest.rglob("*.png")}
    assert counts == kept["label"].value_counts().sort_index().to_dict()
    assert tree == {p.replace("/", "__"): label for p, label in zip(kept["path"], kept["label"])}
    assert not list(tmp_path.glob(".*partial"))  # the staging folder is gone
    with pytest.raises(PipelineError, match="not empty: --force"):
        export.run(dest, artifacts=workspace / "artifacts", data_dir=workspace / "data")
    with pytest.raises(PipelineError, match="inside"):
        export.run(workspace / "data" / "out", artifacts=workspace / "artifacts",
                   data_dir=workspace / "data")  # fmt: skip
    export.run(dest, artifacts=workspace / "artifacts", data_dir=workspace / "data",
               include_test=True, force=True)  # fmt: skip
    assert len(list((dest / "test").rglob("*.png"))) == 30


def test_a_project_without_pools_has_a_dataset_of_its_labeled_images(workspace, tmp_path):
    """Before any pool round the last set is round r000's empty one."""
    art = tmp_path / "artifacts"
    for name in ("ingest", "clean", "rounds/r000"):
        shutil.copytree(workspace / "artifacts" / name, art / name)
    table = dataset_table(art)
    assert set(table["split"]) == {"train", "validation", "test"}
    assert (table.loc[table["label"] != "", "source"] != "pseudo").all()
