"""The fast ingest path gives what the slow one gave: JPEG draft decoding (images.decode) and
decoding in worker processes (pack.pack). Nothing here is timed: bench/ingest.py --photos
measures the speed."""

import hashlib
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.datasets import load_sample_image

from pipeline.core.config import load_params
from pipeline.core.io import read_array
from pipeline.data import images, near_copies, pack, scan

from .conftest import write_digits

# Measured over the photos below at image_size 16, 64 and 128, pad and stretch: mean 0.56 and
# max 10 grey levels, shape cosine 3.7e-4, colour and contrast 0.002 (near_copies.copies_of accepts
# 0.03). A draft anchored in the wrong corner after an EXIF turn gives means of 1.8-3 and maxima
# of 29-52, so these bounds catch it; the max allows a sharp edge one step of resampling apart.
MEAN_GREY = 1.0
MAX_GREY = 16
SHAPE_COSINE = 2e-3
COLOUR = 0.01


def _photo(name: str, size: tuple[int, int], *, crop=None, orientation: int = 1) -> bytes:
    """A real photograph shipped with scikit-learn, resized to `size`, as a quality-90 JPEG
    whose EXIF orientation tag is `orientation`."""
    image = Image.fromarray(load_sample_image(name))
    image = (image.crop(crop) if crop else image).resize(size, Image.Resampling.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


def _photos() -> dict[str, bytes]:
    """Landscape, portrait, and an odd-sized photo (a drafted side then ends in a partial
    pixel) under every EXIF orientation (each turns that partial pixel to another corner)."""
    photos = {
        "landscape": _photo("china.jpg", (1600, 1200)),
        "portrait": _photo("flower.jpg", (1200, 1600), crop=(180, 0, 500, 427)),
    }
    for orientation in range(2, 9):
        photos[f"orientation {orientation}"] = _photo(
            "china.jpg", (1603, 1197), orientation=orientation
        )
    return photos


def test_draft_decoding_gives_a_full_decodes_pixels_and_signature_within_a_grey_level():
    for name, data in _photos().items():
        stored = Image.open(io.BytesIO(data)).size
        for image_size in (16, 64, 128):
            for resize in ("pad", "stretch"):
                options = dict(image_size=image_size, channels=3, resize=resize, max_pixels=10**8)
                where = f"{name}, {image_size} px, {resize}"
                probe = Image.open(io.BytesIO(data))
                assert images._draft(probe, image_size, resize) is not None, where  # a real draft
                full = images.decode(data, draft=False, **options)
                fast = images.decode(data, **options)
                diff = np.abs(full.pixels.astype(np.int16) - fast.pixels.astype(np.int16))
                assert fast.pixels.shape == (image_size, image_size, 3), where
                assert diff.mean() < MEAN_GREY and diff.max() <= MAX_GREY, (where, diff.mean())
                shape = 1.0 - float(full.signature[:256] @ fast.signature[:256])
                colour = np.abs(full.signature[256:] - fast.signature[256:]).max()
                assert shape < SHAPE_COSINE and colour < COLOUR, (where, shape, colour)
                assert (fast.width, fast.height) == (full.width, full.height) == stored, where
                assert fast.sha256 == full.sha256 == hashlib.sha256(data).hexdigest()
                assert (fast.mode, fast.note) == (full.mode, full.note) == ("RGB", "")


def test_draft_decoding_keeps_exif_orientation_and_the_original_size():
    # Stored 1600 wide and 800 tall, displayed turned: 800 wide and 1600 tall, its top half
    # bright. Padded to 32 px it fills the middle 16 columns, bright above and dark below.
    stored = np.zeros((800, 1600), np.uint8)
    stored[:, 800:] = 255  # the stored right half becomes the displayed top under orientation 8
    exif = Image.Exif()
    exif[0x0112] = 8
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    decoded = images.decode(
        buffer.getvalue(), image_size=32, channels=1, resize="pad", max_pixels=10**7
    )
    pixels = decoded.pixels[..., 0].astype(int)
    assert (decoded.width, decoded.height) == (1600, 800)  # the file's own, as stored
    assert pixels[:, :8].max() < 10 and pixels[:, 24:].max() < 10  # the pad
    assert pixels[2:14, 9:23].min() > 240 and pixels[18:30, 9:23].max() < 15


def test_draft_leaves_other_formats_and_small_jpegs_unchanged():
    china = Image.fromarray(load_sample_image("china.jpg"))
    png = io.BytesIO()
    china.resize((1600, 1200)).save(png, format="PNG", compress_level=1)
    small = io.BytesIO()
    china.resize((200, 150)).save(small, format="JPEG", quality=90)  # under 128 px a side: kept
    for data in (png.getvalue(), small.getvalue()):
        options = dict(image_size=64, channels=3, resize="pad", max_pixels=10**8)
        full = images.decode(data, draft=False, **options)
        fast = images.decode(data, **options)
        assert np.array_equal(full.pixels, fast.pixels)
        assert np.array_equal(full.signature, fast.signature)


def test_a_decompression_bomb_is_refused_by_its_full_size_before_any_draft():
    with pytest.raises(images.Rejected, match="decompression bomb: 1600x1200"):
        images.decode(
            _photo("china.jpg", (1600, 1200)),
            image_size=16,
            channels=3,
            resize="pad",
            max_pixels=1600 * 1200 - 1,
        )


@pytest.fixture
def mixed_folder(project):
    """Digits, large photos and files ingest quarantines, in one labeled folder."""
    data = project / "data"
    write_digits(data, {0: "zero", 1: "one"}, 30)
    for i, data_bytes in enumerate(_photos().values()):
        (data / "labeled" / ("zero", "one")[i % 2] / f"photo_{i}.jpg").write_bytes(data_bytes)
    good = (data / "labeled" / "zero" / "img_0000.png").read_bytes()
    (data / "labeled" / "zero" / "truncated.png").write_bytes(good[: len(good) // 2])
    (data / "labeled" / "one" / "empty.jpg").write_bytes(b"")
    (data / "labeled" / "one" / "text.png").write_text("not an image")
    return data


def test_parallel_pack_gives_the_inline_table_arrays_and_quarantine(mixed_folder, project):
    candidates, _ = scan.scan_folder(mixed_folder, "labeled", by_class=True, split="train")
    # A file gone between the scan and the decode: its read fails in the worker. First, beside
    # one/empty.jpg: 73 files on 2 workers make tasks of 2, and that task decodes nothing.
    candidates.insert(0, scan.Candidate("labeled/zero/vanished.png", "zero"))
    assert candidates[1].path == "labeled/one/empty.jpg"
    base = load_params(project / "params.yaml", {"base.channels": 3}).base
    packed = {}
    for workers in (1, 2):
        out = project / f"packed{workers}"
        packed[workers] = pack.pack(
            candidates,
            mixed_folder,
            out,
            base,
            10**8,
            split="train",
            shard_mib=0.01,
            workers=workers,
        )
    (table, quarantine), (parallel_table, parallel_quarantine) = packed[1], packed[2]
    pd.testing.assert_frame_equal(table, parallel_table)
    assert quarantine == parallel_quarantine
    reasons = {row["path"]: row["reason"] for row in quarantine}
    assert reasons["labeled/zero/vanished.png"] == "unreadable: No such file or directory"
    assert reasons["labeled/zero/truncated.png"].startswith("corrupt or truncated image")
    assert reasons["labeled/one/empty.jpg"] == "empty file (0 bytes)"
    assert reasons["labeled/one/text.png"].startswith("not an image")
    assert len(table) == len(candidates) - 4 == 69
    arrays = [np.asarray(read_array(project / f"packed{w}")) for w in (1, 2)]
    assert len(read_array(project / "packed2").files) > 1  # the images cross shard borders
    assert arrays[0].shape == (69, 8, 8, 3) and np.array_equal(*arrays)
    looks = [np.load(project / f"packed{w}" / near_copies.SIGNATURES) for w in (1, 2)]
    assert np.array_equal(*looks)


def test_decoding_runs_inline_for_small_sets_and_on_the_usable_cores_for_large_ones():
    assert pack.decode_workers(0) == pack.decode_workers(pack.PARALLEL_FROM - 1) == 1
    many = pack.decode_workers(10_000)
    assert 1 <= many <= pack.MAX_WORKERS
    assert pack.decode_workers(pack.PARALLEL_FROM) == min(many, pack.PARALLEL_FROM)
