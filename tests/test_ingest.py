import io
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.core.config import load_params
from pipeline.core.errors import PipelineError
from pipeline.core.io import read_array, read_json, write_packed
from pipeline.data.images import decode, thumbnail
from pipeline.stages import ingest

from .conftest import tree_hash, write_digits, write_params


def _png(mode="L", size=(8, 8), color=128, **save) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format=save.pop("format", "PNG"), **save)
    return buffer.getvalue()


@pytest.fixture
def bad_corpus(project):
    """Real digits in two classes plus one file or folder for every bad case."""
    data = project / "data"
    write_digits(data, {0: "zero", 1: "one"}, 10, test_per_class=4)
    lab = data / "labeled"
    good = (lab / "zero" / "img_0000.png").read_bytes()
    (lab / "zero" / "truncated.png").write_bytes(good[: len(good) // 2])
    (lab / "zero" / "random.png").write_bytes(os.urandom(300))
    (lab / "zero" / "empty.jpg").write_bytes(b"")
    (lab / "zero" / "text.png").write_text("definitely not an image")
    (lab / "zero" / "README.txt").write_text("notes")
    (lab / "zero" / "bomb.png").write_bytes(_png(size=(1200, 1200)))
    (lab / "zero" / ".DS_Store").write_bytes(b"\0\0")
    (lab / "one" / "Thumbs.db").write_bytes(b"\0\0")
    (lab / "one" / "ñandú con espacios.png").write_bytes(_png(color=77))  # unicode + spaces: fine
    (lab / "one" / "sixteen.png").write_bytes(_png("I;16", color=40000))
    (lab / "one" / "cmyk.jpg").write_bytes(_png("CMYK", color=(0, 0, 0, 0), format="JPEG"))
    (lab / "one" / "palette.png").write_bytes(_png("P", color=3, transparency=3))
    (lab / "one" / "alpha.png").write_bytes(_png("RGBA", color=(255, 255, 255, 128)))
    (lab / "one" / "la.png").write_bytes(_png("LA", color=(200, 255)))
    frames = [Image.new("L", (8, 8), v) for v in (10, 200)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    (lab / "one" / "animated.gif").write_bytes(gif.getvalue())
    outside = project / "outside.png"
    outside.write_bytes(good)
    (lab / "one" / "escape.png").symlink_to(outside)
    (lab / "one" / "dangling.png").symlink_to(lab / "one" / "missing.png")
    os.mkfifo(lab / "one" / "pipe.png")
    (lab / "nothing").mkdir()
    (lab / "lonely").mkdir()
    (lab / "lonely" / "only.png").write_bytes(_png(color=3))
    (lab / "stray.png").write_bytes(good)
    write_params(project, {"ingest": {"max_image_pixels": 1_000_000}})
    return data


EXPECTED = {
    "labeled/zero/truncated.png": "corrupt or truncated",
    "labeled/zero/random.png": "not an image",
    "labeled/zero/empty.jpg": "empty file (0 bytes)",
    "labeled/zero/text.png": "not an image",
    "labeled/zero/README.txt": "unsupported extension",
    "labeled/zero/bomb.png": "decompression bomb: 1200x1200",
    "labeled/zero/.DS_Store": "hidden or system file",
    "labeled/one/Thumbs.db": "hidden or system file",
    "labeled/one/escape.png": "symlink pointing outside data/",
    "labeled/one/dangling.png": "broken symlink",
    "labeled/one/pipe.png": "not a regular file",
    "labeled/nothing": "empty class folder",
    "labeled/lonely/only.png": "class 'lonely' has 1 image(s)",
    "labeled/stray.png": "not inside a class folder",
}


def test_quarantines_every_bad_case_with_a_reason(bad_corpus, project, record):
    before = tree_hash(bad_corpus)
    metrics = ingest.run(bad_corpus, project / "out", load_params(project / "params.yaml"))
    quarantine = pd.read_csv(project / "out" / "quarantine.csv", keep_default_na=False)
    reasons = dict(zip(quarantine["path"], quarantine["reason"]))
    for path, reason in EXPECTED.items():
        assert path in reasons, f"{path} not quarantined"
        assert reason in reasons[path], f"{path}: {reasons[path]!r}"
    # one split name for the labeled files, whichever check refused them
    assert set(quarantine.loc[quarantine["path"].str.startswith("labeled/"), "split"]) == {"train"}
    manifest = pd.read_csv(project / "out" / "manifest.csv", keep_default_na=False)
    accepted = set(manifest["path"])
    for name in (
        "ñandú con espacios.png",
        "sixteen.png",
        "cmyk.jpg",
        "palette.png",
        "alpha.png",
        "la.png",
        "animated.gif",
    ):
        assert f"labeled/one/{name}" in accepted
    notes = dict(zip(manifest["path"], manifest["note"]))
    for name, note in {
        "animated.gif": "first frame",
        "sixteen.png": "scaled to 8 bits",
        "cmyk.jpg": "CMYK converted",
        "palette.png": "palette converted",
        "alpha.png": "alpha composited",
        "la.png": "alpha composited",
    }.items():
        assert note in notes[f"labeled/one/{name}"], name
    assert notes["labeled/one/ñandú con espacios.png"] == ""  # nothing to convert
    assert metrics["quarantined"] == len(quarantine)
    assert read_json(project / "out" / "classes.json") == ["one", "zero"]
    images = read_array(project / "out" / "images")
    assert images.shape == (len(manifest), 8, 8, 1) and images.dtype == np.uint8
    assert tree_hash(bad_corpus) == before  # raw data untouched
    for path, reason in EXPECTED.items():
        kind = "security" if "symlink" in reason or "bomb" in reason else "input"
        record(kind, f"{reason}: `{path.split('/')[-1]}`", "quarantined with its reason")
    record("input", "16-bit, CMYK, palette, alpha, LA, animated, unicode-named images",
           "decoded, with a note where converted", cases=7)  # fmt: skip


def test_test_copies_win_over_labeled_duplicates_and_conflicts_are_set_aside(project, record):
    data = project / "data"
    write_digits(data, {0: "zero", 1: "one"}, 6, test_per_class=3)
    test_image = (data / "test" / "zero").iterdir().__next__()
    (data / "labeled" / "zero" / "leak.png").write_bytes(test_image.read_bytes())
    first = data / "labeled" / "zero" / "img_0000.png"
    (data / "labeled" / "one" / "conflict.png").write_bytes(first.read_bytes())
    (data / "labeled" / "zero" / "copy.png").write_bytes(
        (data / "labeled" / "zero" / "img_0010.png").read_bytes()
    )
    metrics = ingest.run(data, project / "out", load_params(project / "params.yaml"))
    manifest = pd.read_csv(project / "out" / "manifest.csv", keep_default_na=False)
    reasons = dict(pd.read_csv(project / "out" / "quarantine.csv").set_index("path")["reason"])
    assert "labeled/zero/leak.png" not in set(manifest["path"])
    assert "kept out of training" in reasons["labeled/zero/leak.png"]
    assert "same image under labels one, zero" in reasons["labeled/one/conflict.png"]
    assert (
        "exact duplicate" in reasons["labeled/zero/img_0010.png"]
        or "exact duplicate" in reasons["labeled/zero/copy.png"]
    )
    assert metrics["test_leakage"] == 1 and metrics["label_conflicts"] == 1
    train_hashes = set(manifest.loc[manifest["split"] == "train", "sha256"])
    assert not train_hashes & set(manifest.loc[manifest["split"] == "test", "sha256"])
    record("input", "test image copied into the labeled set", "kept out of training")
    record("input", "one image under two labels", "both set aside with the reason")
    record("input", "exact duplicate within a class", "one copy kept, the other quarantined")


def test_csv_manifest_paths_are_confined_to_data(project, record):
    data = project / "data"
    write_digits(data, {0: "zero", 1: "one"}, 5)
    rows = ["path,label"]
    for folder in ("zero", "one"):
        for image in sorted((data / "labeled" / folder).iterdir()):
            rows.append(f"labeled/{folder}/{image.name},{folder}")
    rows += [
        "../secret.png,zero",
        "/etc/passwd,zero",
        "labeled/../../x.png,one",
        "labeled/missing.png,one",
        ",one",
    ]
    (data / "labeled" / "labels.csv").write_text("\n".join(rows) + "\n")
    ingest.run(data, project / "out", load_params(project / "params.yaml"))
    reasons = pd.read_csv(project / "out" / "quarantine.csv", keep_default_na=False)
    text = " | ".join(reasons["path"] + ": " + reasons["reason"])
    assert "../secret.png: path escapes data/" in text
    assert "/etc/passwd: absolute path refused" in text
    assert "labeled/../../x.png: path escapes data/" in text
    assert "no such file" in text and "row without a path or a label" in text
    manifest = pd.read_csv(project / "out" / "manifest.csv")
    assert len(manifest) == 10
    record(
        "security",
        "manifest paths with `..` or absolute paths",
        "quarantined: path escapes data/",
        cases=3,
    )
    record(
        "input",
        "manifest rows naming missing files or no path",
        "quarantined with the reason",
        cases=2,
    )


def test_carves_a_stratified_test_split_without_test_folder(project):
    data = project / "data"
    write_digits(data, {0: "zero", 1: "one", 2: "two"}, 20)
    metrics = ingest.run(data, project / "out", load_params(project / "params.yaml"))
    assert metrics["per_class"]["test"] == {"one": 4, "two": 4, "zero": 4}


def test_no_usable_images_is_one_clear_error(project, record):
    data = project / "data"
    (data / "labeled" / "a").mkdir(parents=True)
    (data / "labeled" / "a" / "x.png").write_bytes(b"junk")
    with pytest.raises(PipelineError, match="need at least 2 classes"):
        ingest.run(data, project / "out", load_params(project / "params.yaml"))
    record("input", "a data folder with no usable images", "one error line")


def test_exif_orientation_is_applied():
    image = Image.new("L", (4, 2), 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes(), quality=100)
    pixels = decode(
        buffer.getvalue(), image_size=4, channels=1, resize="pad", max_pixels=100
    ).pixels[..., 0]
    # Displayed upright it is 2 wide and 4 tall: bright columns in the middle, black at the sides.
    assert pixels[:, 1:3].min() > 200 and pixels[:, [0, 3]].max() < 50


def test_report_thumbnails_show_the_file_upright_in_colour_and_skip_what_cannot_be_read(tmp_path):
    photo = Image.new("RGB", (400, 200), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated: 200 wide, 400 tall
    photo.save(tmp_path / "photo.jpg", exif=exif.tobytes(), quality=95)
    pixels = thumbnail(tmp_path / "photo.jpg")
    assert pixels.shape == (96, 48, 3) and pixels[..., 0].mean() > 150 > pixels[..., 1].mean()
    deep = np.full((20, 30), 30000, np.uint16)  # a 16-bit scan: mid-grey, not white
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert 100 < thumbnail(tmp_path / "deep.png").mean() < 150
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    Image.new("L", (12000, 12000)).save(tmp_path / "huge.png")  # over the reports' limit
    for name in ("broken.png", "huge.png", "missing.png"):
        assert thumbnail(tmp_path / name) is None, name


def test_a_test_class_absent_from_training_is_quarantined(project, record):
    data = project / "data"
    write_digits(data, {0: "zero", 1: "one"}, 6, test_per_class=2)
    write_digits(data / "extra", {2: "two"}, 0, test_per_class=2)
    (data / "extra" / "test" / "two").rename(data / "test" / "two")
    metrics = ingest.run(data, project / "out", load_params(project / "params.yaml"))
    reasons = pd.read_csv(project / "out" / "quarantine.csv")
    unknown = reasons[reasons["path"].str.startswith("test/two/")]
    assert len(unknown) == 2 and unknown["reason"].str.contains("no labeled training images").all()
    assert metrics["per_class"]["test"] == {"one": 2, "zero": 2}
    record(
        "input", "a test class absent from training", "its test images quarantined with the reason"
    )


def test_packed_images_read_like_one_array_across_shards(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (1000, 8, 8, 1), dtype=np.uint8)
    write_packed(tmp_path / "packed", images, np.arange(1000), shard_mib=0.02)  # 327 per shard
    packed = read_array(tmp_path / "packed")
    assert len(packed.files) == 4 and packed.shape == images.shape
    picks = rng.integers(-1000, 1000, 300)
    assert np.array_equal(packed[picks], images[picks])
    assert np.array_equal(packed[320:700:3], images[320:700:3])
    assert np.array_equal(packed[images[:, 0, 0, 0] > 128], images[images[:, 0, 0, 0] > 128])
    assert np.array_equal(packed[-1], images[-1]) and np.array_equal(np.asarray(packed), images)
    with pytest.raises(IndexError):
        packed[1000]


def test_ingest_shards_give_the_same_images_as_one_shard(project):
    data = project / "data"
    write_digits(data, {0: "zero", 1: "one", 2: "two"}, 30, test_per_class=5)
    one = ingest.run(data, project / "one", load_params(project / "params.yaml"))
    many = ingest.run(
        data, project / "many", load_params(project / "params.yaml", {"ingest.shard_mib": 0.001})
    )
    assert one == many
    small = read_array(project / "many" / "images")
    assert len(small.files) == len(small) // 16 + (len(small) % 16 > 0)  # 1 KiB: 16 images
    assert np.array_equal(np.asarray(small), np.asarray(read_array(project / "one" / "images")))
