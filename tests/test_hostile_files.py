"""Files a user brings but did not make: every byte and name is untrusted. Each case is built for
real (Pillow, raw bytes, os-level names) and goes through the real code path; it must end as a
quarantine row with a one-line reason, never a crash, an external program or a changed file."""

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import EpsImagePlugin, Image, PngImagePlugin
from PIL.PngImagePlugin import PngInfo

from pipeline.core.config import load_params
from pipeline.data.image_stats import inspect
from pipeline.data.images import DECODE_FORMATS, Rejected, decode, max_file_bytes, thumbnail
from pipeline.data.pack import decode_file
from pipeline.data.scan import read_csv_manifest, scan_folder
from pipeline.stages import ingest

from .conftest import tree_hash, write_params

OPTIONS = {"image_size": 8, "channels": 1, "resize": "pad"}
ALLOWED = ", ".join(DECODE_FORMATS)  # as the reasons list them
EPS = (  # a minimal valid EPS: Pillow identifies it from these bytes, whatever the file's name
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
    b"newpath 0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n"
)
BOMB_SIDE = 30_000  # a 1-bit PNG this wide and tall: 900 M pixels in about 110 KB


def _png(size=(16, 16), seed=0, info: PngInfo | None = None) -> bytes:
    """A real noise PNG (distinct per seed, so no two are copies of one another)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0]), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _bomb_png() -> bytes:
    """A valid BOMB_SIDE x BOMB_SIDE 1-bit black PNG, compressed with zlib row by row. (Pillow
    holds mode "1" at a byte per pixel, so saving it from an Image would take 900 MB.)"""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    row = b"\0" * (1 + BOMB_SIDE // 8)  # filter byte, then 8 pixels a byte
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row * 1000) for _ in range(BOMB_SIDE // 1000))
    header = struct.pack(">IIBBBBB", BOMB_SIDE, BOMB_SIDE, 1, 0, 0, 0, 0)  # 1 bit, grayscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", idat + packer.flush())
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def fake_gs(tmp_path, monkeypatch) -> Path:
    """A `gs` first on PATH that leaves a marker file when anything starts it (and fails, as a
    broken Ghostscript does); returns the marker's path. Pillow forgets whether it found gs."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    marker = tmp_path / "gs-was-started"
    (bin_dir / "gs").write_text(f"#!/bin/sh\ntouch '{marker}'\nexit 1\n")
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)
    return marker


def test_an_eps_named_png_is_rejected_without_starting_ghostscript(tmp_path, fake_gs, record):
    path = tmp_path / "x.png"
    path.write_bytes(EPS)
    # The hazard is real: Pillow unrestricted starts gs for these bytes, and its error escapes.
    with pytest.raises(subprocess.CalledProcessError), Image.open(path) as image:
        image.load()
    assert fake_gs.exists()
    fake_gs.unlink()
    EpsImagePlugin.gs_binary = None

    with pytest.raises(Rejected) as rejected:
        decode(EPS, **OPTIONS, max_pixels=10**6)
    reason = str(rejected.value)
    assert f"format EPS (accepted: {ALLOWED})" in reason and "\n" not in reason
    stats = inspect([path], 10**6)  # init's and ingest's header inspection
    assert stats["unreadable"] == [f"{path}: {reason}"] and stats["formats"] == {}
    assert thumbnail(path) is None  # reports
    assert not fake_gs.exists(), "Ghostscript was started"
    record("security", "an EPS file named .png (Pillow would start Ghostscript)",
           "quarantined: format not accepted, no external program started")  # fmt: skip


@pytest.mark.parametrize(
    "error",
    [
        subprocess.CalledProcessError(1, ["gs"]),
        MemoryError(),
        Image.DecompressionBombError("too many\npixels"),
        RuntimeError("a decoder bug"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_any_decoder_failure_is_a_reason_not_a_crash(monkeypatch, error):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", fail)
    with pytest.raises(Rejected) as rejected:
        decode(_png(), **OPTIONS, max_pixels=10**6)
    reason = str(rejected.value)
    assert reason.startswith(("cannot decode: " + type(error).__name__, "decompression bomb"))
    assert "\n" not in reason


def test_a_file_over_the_byte_cap_is_refused_before_it_is_read(tmp_path, monkeypatch, record):
    max_pixels = 1000
    cap = max_file_bytes(max_pixels)
    assert cap == max_pixels * 8 + 2**20  # 8 bytes per pixel (16-bit RGBA) + 1 MiB of headers
    padded = PngInfo()
    padded.add_text("padding", "x" * cap)  # a valid 16x16 PNG of more bytes than the cap
    big = tmp_path / "big.png"
    big.write_bytes(_png(info=padded))
    options = {**OPTIONS, "max_pixels": max_pixels, "draft": True}

    def no_read(*args, **kwargs):
        raise AssertionError("the file was read and decoded")

    monkeypatch.setattr("pipeline.data.pack.decode", no_read)
    reason = decode_file(big, options)
    size = big.stat().st_size
    assert reason.startswith(f"file too large: {size:,} bytes is over the {cap:,} bytes")
    monkeypatch.undo()
    within = PngInfo()
    within.add_text("padding", "x" * (cap - 10_000))  # under the cap: decoded as usual
    (tmp_path / "within.png").write_bytes(_png(info=within))
    assert decode_file(tmp_path / "within.png", options).width == 16
    record("security", "a file larger than any image within ingest.max_image_pixels",
           "quarantined unread, with both sizes")  # fmt: skip


def test_a_pixel_bomb_is_refused_from_its_header_without_allocating_it(
    tmp_path, monkeypatch, record
):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_bomb_png())
    assert bomb.stat().st_size < 200_000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # Pillow's own check would stop this
    with Image.open(bomb) as image:  # a real PNG as Pillow reads it
        assert (image.format, image.mode, image.size) == ("PNG", "1", (BOMB_SIDE, BOMB_SIDE))
    # In a fresh process, so its peak memory is this check's alone (decoded: 900 MB). VmHWM, as
    # ru_maxrss keeps the forking process's peak across exec.
    script = (
        "import sys; from pathlib import Path\n"
        "from pipeline.data.images import thumbnail; from pipeline.data.image_stats import inspect\n"
        "from pipeline.data.pack import decode_file\n"
        "path = Path(sys.argv[1])\n"
        "print(decode_file(path, dict(image_size=8, channels=1, resize='pad', "
        "max_pixels=20_000_000, draft=True)))\n"
        "print(inspect([path], 20_000_000)['too_large'][0]); print(thumbnail(path))\n"
        "status = Path('/proc/self/status').read_text().split('VmHWM:')[1]\n"
        "print(int(status.split()[0]) // 1024)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(bomb)], capture_output=True, text=True, check=True
    )
    reason, too_large, thumb, peak_mib = run.stdout.splitlines()
    assert reason == (
        f"decompression bomb: {BOMB_SIDE}x{BOMB_SIDE} = {BOMB_SIDE**2} pixels is over "
        "ingest.max_image_pixels (20000000)"
    )
    assert too_large.endswith(f"{BOMB_SIDE}x{BOMB_SIDE} px") and thumb == "None"
    assert int(peak_mib) < 400, f"peak {peak_mib} MiB: the pixels were allocated"
    record("security", "a 30000x30000 PNG of 110 KB (900 M pixels)",
           "quarantined from its header, pixels never allocated")  # fmt: skip


def _os_name(folder: Path, name: bytes) -> Path:
    """folder/name created with raw bytes, as Python then sees it (os.fsdecode)."""
    return Path(os.fsdecode(os.path.join(os.fsencode(folder), name)))


def test_names_that_are_not_utf8_or_hold_control_characters_are_quarantined(tmp_path, record):
    data = tmp_path / "data"
    good = _png()
    for inner in ("labeled/cat", "unlabeled/pool"):
        folder = data / inner
        folder.mkdir(parents=True)
        (folder / "ok.png").write_bytes(good)
        _os_name(folder, b"bad\xff.png").write_bytes(_png(seed=1))
        (folder / "new\nline.png").write_bytes(_png(seed=2))
        _os_name(folder, b"sub\xfd").mkdir()
        (_os_name(folder, b"sub\xfd") / "inside.png").write_bytes(_png(seed=3))
    _os_name(data / "labeled", b"class\xfe").mkdir()
    (_os_name(data / "labeled", b"class\xfe") / "a.png").write_bytes(_png(seed=4))

    for sub, by_class, split, inner in (
        ("labeled", True, "train", "labeled/cat"),
        ("unlabeled/pool", False, "pool", "unlabeled/pool"),
    ):
        candidates, quarantine = scan_folder(data, sub, by_class=by_class, split=split)
        assert [c.path for c in candidates] == [f"{inner}/ok.png"]
        reasons = {row["path"]: row["reason"] for row in quarantine}
        expected = {
            f"{inner}/bad\\xff.png": "file name is not valid UTF-8 (rename it to use it)",
            f"{inner}/new\\x0aline.png": "file name contains a control character (rename it",
            f"{inner}/sub\\xfd": "folder name is not valid UTF-8 (rename it to use it)",
        }
        if by_class:
            expected["labeled/class\\xfe"] = "folder name is not valid UTF-8"
        assert set(reasons) == set(expected), reasons
        for path, reason in expected.items():
            assert reasons[path].startswith(reason)
            path.encode("utf-8")  # printable: writes to a UTF-8 CSV
    record("input", "file and folder names that are not UTF-8 or hold control characters",
           "quarantined with the name escaped", cases=4)  # fmt: skip


def test_a_folder_that_cannot_be_listed_is_quarantined_not_skipped(tmp_path, monkeypatch):
    data = tmp_path / "data"
    for rel in ("labeled/cat/ok.png", "labeled/cat/locked/a.png", "labeled/dog/a.png"):
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_bytes(_png())
    locked = {str(data / "labeled" / "cat" / "locked"), str(data / "labeled" / "dog")}
    listing = os.scandir

    def scandir(path="."):  # as chmod 000 would (tests may run as root, whom it does not stop)
        if os.fspath(path) in locked:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return listing(path)

    monkeypatch.setattr(os, "scandir", scandir)
    candidates, quarantine = scan_folder(data, "labeled", by_class=True, split="train")
    assert [c.path for c in candidates] == ["labeled/cat/ok.png"]
    assert quarantine == [  # once each: the unreadable class folder is not also "empty"
        {
            "path": "labeled/cat/locked",
            "split": "train",
            "reason": "unreadable folder: Permission denied",
        },
        {"path": "labeled/dog", "split": "train", "reason": "unreadable folder: Permission denied"},
    ]


def test_manifest_rows_with_control_characters_are_quarantined(project, record):
    data = project / "data"
    rows = ["path,label"]
    for c, label in enumerate(("cat", "dog")):
        (data / "labeled" / label).mkdir(parents=True)
        for i in range(3):
            (data / "labeled" / label / f"{i}.png").write_bytes(_png(seed=10 * c + i))
            rows.append(f"labeled/{label}/{i}.png,{label}")
    rows += [
        "labeled/cat/0\x00.png,cat",  # NUL: every os call refuses it with ValueError
        "labeled/cat/1.png,c\x00at",
        "labeled/dog/1.png,do\x1bg",  # an escape character
        f"labeled/{'x' * 300}.png,dog",  # a name too long for the system
        "labeled/dog/2.png,=cmd",  # a formula in a spreadsheet
        "labeled/dog/0.png,drop",  # a word overrides.csv uses
    ]
    (data / "labeled" / "labels.csv").write_text("\n".join(rows) + "\n")
    candidates, quarantine = read_csv_manifest(data, data / "labeled" / "labels.csv", "train")
    assert len(candidates) == 6
    reasons = [(row["path"], row["reason"]) for row in quarantine]
    assert reasons[0] == (
        "labeled/cat/0\\x00.png",
        "path contains a control character (labeled/labels.csv:8)",
    )
    assert reasons[3] == (
        f"labeled/{'x' * 300}.png",
        "unreadable path: File name too long (labeled/labels.csv:11)",
    )
    for (_path, reason), label, line in zip(
        reasons[1:3] + reasons[4:], ["c\\x00at", "do\\x1bg", "=cmd", "drop"], [9, 10, 12, 13]
    ):
        assert (
            reason.startswith(f"label '{label}' is refused: ") and f"labels.csv:{line})" in reason
        )
    metrics = ingest.run(data, project / "out", load_params(project / "params.yaml"))
    assert metrics["quarantined"] == 6 and metrics["train_images"] + metrics["test_images"] == 6
    record("input", "manifest paths or labels with a NUL or another control character, "
           "labels `=cmd` and `drop`", "quarantined with the reason", cases=5)  # fmt: skip


def test_ingest_command_on_a_hostile_folder_quarantines_each_file_once(project, fake_gs, record):
    data = project / "data"
    write_params(project, {"ingest": {"max_image_pixels": 100_000}})  # byte cap 1.8 MB
    for c, label in enumerate(("cat", "dog")):
        (data / "labeled" / label).mkdir(parents=True)
        for i in range(5):
            (data / "labeled" / label / f"{i}.png").write_bytes(_png(seed=10 * c + i))
    cat, dog = data / "labeled" / "cat", data / "labeled" / "dog"
    (cat / "renamed.png").write_bytes(EPS)
    (cat / "bomb.png").write_bytes(_bomb_png())
    padded = PngInfo()
    padded.add_text("padding", "x" * 2_000_000)
    (cat / "heavy.png").write_bytes(_png(seed=50, info=padded))
    _os_name(cat, b"bad\xff.png").write_bytes(_png(seed=51))
    (dog / "new\nline.png").write_bytes(_png(seed=52))
    _os_name(dog, b"sub\xfd").mkdir()
    (_os_name(dog, b"sub\xfd") / "inside.png").write_bytes(_png(seed=53))
    _os_name(data / "labeled", b"class\xfe").mkdir()
    (_os_name(data / "labeled", b"class\xfe") / "a.png").write_bytes(_png(seed=54))
    before = tree_hash(data)

    run = subprocess.run(
        [sys.executable, "-m", "pipeline", "ingest"]
        + ["--data-dir", "data", "--out", "out", "--params", "params.yaml"],
        cwd=project,
        capture_output=True,
        text=True,
        errors="backslashreplace",
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    quarantine = pd.read_csv(project / "out" / "quarantine.csv", keep_default_na=False)
    expected = {
        "labeled/cat/renamed.png": f"not an image ingest accepts: format EPS (accepted: {ALLOWED})",
        "labeled/cat/bomb.png": f"decompression bomb: {BOMB_SIDE}x{BOMB_SIDE} = 900000000 pixels",
        "labeled/cat/heavy.png": "file too large: ",
        "labeled/cat/bad\\xff.png": "file name is not valid UTF-8 (rename it to use it)",
        "labeled/dog/new\\x0aline.png": "file name contains a control character",
        "labeled/dog/sub\\xfd": "folder name is not valid UTF-8",
        "labeled/class\\xfe": "folder name is not valid UTF-8",
    }
    assert sorted(quarantine["path"]) == sorted(expected)  # each exactly once, nothing else
    for path, reason in zip(quarantine["path"], quarantine["reason"]):
        assert reason.startswith(expected[path]), (path, reason)
    size = (cat / "heavy.png").stat().st_size
    heavy = quarantine.set_index("path").loc["labeled/cat/heavy.png", "reason"]
    assert f"{size:,} bytes is over the {max_file_bytes(100_000):,} bytes" in heavy
    manifest = pd.read_csv(project / "out" / "manifest.csv", keep_default_na=False)
    assert sorted(manifest["path"]) == sorted(
        f"labeled/{label}/{i}.png" for label in ("cat", "dog") for i in range(5)
    )
    assert not fake_gs.exists(), "Ghostscript was started"
    assert tree_hash(data) == before  # raw files untouched
    record("security", "`ingest` on a folder of hostile files (EPS as .png, pixel bomb, "
           "oversized file, names not UTF-8)", "exit 0, each file quarantined once")  # fmt: skip
