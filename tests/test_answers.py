"""add-labels: answered pool images join the labeled set, all together or not at all."""

import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from pipeline.core.errors import PipelineError
from pipeline.tools.answers import add_labels

from .conftest import tree_hash, write_digits


@pytest.fixture
def data(tmp_path):
    data = tmp_path / "data"
    write_digits(data, {0: "zero", 1: "one"}, 4, test_per_class=2)
    pool = data / "unlabeled" / "pool_001"
    pool.mkdir(parents=True)
    digits = load_digits()
    for i in np.flatnonzero(digits.target < 2)[100:108]:  # images data/ does not hold yet
        image = (digits.images[i] * 16).clip(0, 255).astype(np.uint8)
        Image.fromarray(image).save(pool / f"{['zero', 'one'][digits.target[i]]}_{i}.png")
    return data


def _answers(tmp_path, rows):
    path = tmp_path / "answers.csv"
    path.write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in rows))
    return path


def test_answers_join_the_labeled_set_with_their_provenance(data, tmp_path):
    pool_files = sorted((data / "unlabeled" / "pool_001").iterdir())
    rows = [(f"unlabeled/pool_001/{p.name}", p.name.split("_")[0]) for p in pool_files]
    rows.append((f"unlabeled/pool_001/{pool_files[0].name}", ""))  # unanswered: skipped
    before = len(list((data / "labeled").rglob("*.png")))
    result = add_labels(_answers(tmp_path, rows[:-1] + rows[-1:]), data_dir=data, register=False)
    assert result["added"] == len(pool_files)
    assert len(list((data / "labeled").rglob("*.png"))) == before + len(pool_files)
    added = data / "labeled" / "zero" / "added" / "pool_001"
    assert added.is_dir() and all(p.name.startswith("zero") for p in added.iterdir())
    log = pd.read_csv(data / "added_labels.csv")
    assert len(log) == len(pool_files) and log["source"].str.startswith("unlabeled/").all()
    assert (data / "unlabeled" / "pool_001" / pool_files[0].name).is_file()  # pool unchanged


def test_a_near_copy_of_a_test_image_is_refused_once_ingest_has_run(data, tmp_path, record):
    from pipeline.core.config import load_params
    from pipeline.stages import ingest

    from .conftest import write_params

    write_params(tmp_path)
    ingest.run(data, tmp_path / "ingest", load_params(tmp_path / "params.yaml"))
    test_image = Image.open(next((data / "test" / "zero").iterdir()))
    test_image.save(data / "unlabeled" / "pool_001" / "reencoded_test.jpg", quality=85)
    rows = [("unlabeled/pool_001/reencoded_test.jpg", "zero")]
    before = tree_hash(data)
    with pytest.raises(PipelineError, match="near copy of test image test/zero/"):
        add_labels(
            _answers(tmp_path, rows), data_dir=data, ingest_dir=tmp_path / "ingest", register=False
        )
    assert tree_hash(data) == before
    record(
        "input",
        "add-labels: a JPEG re-encode of a test image",
        "refused as a near copy, nothing written",
    )


def test_each_bad_answer_refuses_the_whole_file_and_writes_nothing(data, tmp_path, record):
    good = f"unlabeled/pool_001/{sorted((data / 'unlabeled' / 'pool_001').iterdir())[0].name}"
    test_image = next((data / "test" / "zero").iterdir())
    copy = data / "unlabeled" / "pool_001" / "copy_of_test.png"
    shutil.copy(test_image, copy)
    labeled_image = next((data / "labeled" / "one").iterdir())
    shutil.copy(labeled_image, data / "unlabeled" / "pool_001" / "copy_of_labeled.png")
    cases = {
        "unknown class": [(good, "seven")],
        "is not a pool image": [("labeled/one/" + labeled_image.name, "one")],
        "is not a pool image ": [("unlabeled/../test/zero/x.png", "zero")],
        "is not an image file": [("unlabeled/pool_001/missing.png", "zero")],
        "copy of test image": [(good, "zero"), ("unlabeled/pool_001/copy_of_test.png", "zero")],
        "already labeled": [("unlabeled/pool_001/copy_of_labeled.png", "one")],
        "same image as line 2": [(good, "zero"), (good, "one")],
    }
    before = tree_hash(data)
    for message, rows in cases.items():
        with pytest.raises(PipelineError, match=message.strip()):
            add_labels(_answers(tmp_path, rows), data_dir=data, register=False)
        assert tree_hash(data) == before, message
    record(
        "input",
        "add-labels: unknown class, non-pool path, test or labeled copy, twice",
        "refused, nothing written",
        len(cases),
    )
