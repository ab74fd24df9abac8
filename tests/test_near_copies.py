"""Near copies across labeled, test and pool images: planted re-encodes, resizes, crops and
re-saves of real photos are caught at ingest and at pool decoding, and named in the leakage
tables; distinct photos are left alone."""

import io

import pandas as pd
import pytest
from PIL import Image, PngImagePlugin
from sklearn.datasets import load_sample_images

from pipeline.core.config import load_params
from pipeline.data.pool_images import decode_pool
from pipeline.stages import ingest

from .conftest import write_params

TILE = 96


def _tiles() -> dict[str, list[Image.Image]]:
    """Distinct 96-px crops of the two photos scikit-learn ships, one class per photo."""
    out = {}
    for name, photo in zip(("china", "flower"), load_sample_images().images):
        h, w, _ = photo.shape
        out[name] = [
            Image.fromarray(photo[y : y + TILE, x : x + TILE])
            for y in range(0, h - TILE + 1, TILE)
            for x in range(0, w - TILE + 1, TILE)
        ]
    return out


def _copies(image: Image.Image) -> dict[str, bytes]:
    """The same picture under other bytes: the ways a copy slips past a file hash."""
    out = {}
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=75)
    out["jpeg.jpg"] = buffer.getvalue()
    buffer = io.BytesIO()
    image.resize((TILE * 3 // 2, TILE * 3 // 2), Image.Resampling.BICUBIC).save(buffer, "PNG")
    out["resized.png"] = buffer.getvalue()
    cut = round(TILE * (1 - 0.95**0.5) / 2)  # 5% of the area off the borders
    buffer = io.BytesIO()
    image.crop((cut, cut, TILE - cut, TILE - cut)).save(buffer, "PNG")
    out["cropped.png"] = buffer.getvalue()
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "re-saved with metadata")
    buffer = io.BytesIO()
    image.save(buffer, "PNG", pnginfo=info)
    out["metadata.png"] = buffer.getvalue()
    return out


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("near")
    write_params(root, {"base": {"image_size": 32, "channels": 3}})
    data = root / "data"
    plants = {"labeled-test": {}, "pool-test": {}, "pool-labeled": {}}  # copy path -> original
    for name, tiles in _tiles().items():
        (data / "labeled" / name).mkdir(parents=True)
        (data / "test" / name).mkdir(parents=True)
        pool = data / "unlabeled" / "pool_001"
        pool.mkdir(parents=True, exist_ok=True)
        test, labeled = tiles[:6], tiles[6:]
        for i, tile in enumerate(test):
            tile.save(data / "test" / name / f"t{i}.png")
        for i, tile in enumerate(labeled):
            tile.save(data / "labeled" / name / f"l{i}.png")
        for i, tile in enumerate(test[:2]):
            for kind, blob in _copies(tile).items():
                copy = f"labeled/{name}/copy_of_t{i}_{kind}"
                (data / copy).write_bytes(blob)
                plants["labeled-test"][copy] = f"test/{name}/t{i}.png"
        for i, tile in enumerate(test[2:4], start=2):
            for kind, blob in _copies(tile).items():
                copy = f"unlabeled/pool_001/{name}_t{i}_{kind}"
                (data / copy).write_bytes(blob)
                plants["pool-test"][copy] = f"test/{name}/t{i}.png"
        for i, tile in enumerate(labeled[:2]):
            for kind, blob in _copies(tile).items():
                copy = f"unlabeled/pool_001/{name}_l{i}_{kind}"
                (data / copy).write_bytes(blob)
                plants["pool-labeled"][copy] = f"labeled/{name}/l{i}.png"
        for i, tile in enumerate(labeled[2:6]):  # distinct pool photos: mirrored tiles
            tile.transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(pool / f"{name}_new{i}.png")
    params = load_params(root / "params.yaml")
    metrics = ingest.run(data, root / "ingest", params)
    table, eligible, quarantine, leaks = decode_pool(
        data, "pool_001", root / "pool_scratch", params, {}, root / "ingest"
    )
    return root, plants, metrics, table.assign(eligible=eligible), pd.DataFrame(leaks)


def test_copies_of_test_images_never_train_and_are_named_with_their_pair(planted, record):
    root, plants, metrics, _, _ = planted
    manifest = pd.read_csv(root / "ingest" / "manifest.csv", dtype=str)
    leakage = pd.read_csv(root / "ingest" / "leakage.csv", dtype=str)
    copies = plants["labeled-test"]
    trained = set(manifest.loc[manifest["split"] == "train", "path"])
    caught = {path for path in copies if path not in trained}
    assert len(caught) >= 0.95 * len(copies), sorted(set(copies) - caught)
    assert set(copies) - caught == set()  # all 16 here; the bound is the issue's
    pairs = dict(zip(leakage["path"], leakage["copy_of"]))
    assert {path: pairs.get(path) for path in copies} == copies
    assert metrics["near_test_leakage"] == len(copies)
    assert 0 < metrics["near_copy_cutoff"] <= 0.1
    # every distinct photo stays where it was put
    photos = {
        path.relative_to(root / "data").as_posix()
        for split in ("labeled", "test")
        for path in (root / "data" / split).rglob("*")
        if path.is_file() and not path.name.startswith("copy_of")
    }
    assert set(manifest["path"]) == photos
    record(
        "input",
        "JPEG re-encodes, 1.5x resizes, 5% crops and metadata-only re-saves of test photos "
        "among the labeled images",
        "each left out of training, named with its test image in leakage.csv",
        len(copies),
    )


def test_pool_copies_of_test_and_labeled_images_are_never_pseudo_labeled(planted, record):
    _, plants, _, table, leaks = planted
    eligible = dict(zip(table["path"], table["eligible"]))
    for pair in ("pool-test", "pool-labeled"):
        copies = plants[pair]
        missed = [path for path in copies if eligible[path]]
        assert len(missed) <= 0.05 * len(copies) and not missed, (pair, missed)
    test_pairs = dict(zip(leaks["path"], leaks["copy_of"]))
    assert test_pairs == plants["pool-test"]  # the leakage table lists exactly the test copies
    distinct = [path for path in eligible if "_new" in path]
    assert distinct and all(eligible[path] for path in distinct)
    record(
        "input",
        "re-encoded, resized, cropped and re-saved copies of test and labeled photos in a pool",
        "not eligible for pseudo-labels; test copies named with their pair in leakage.csv",
        len(plants["pool-test"]) + len(plants["pool-labeled"]),
    )
