"""Decoding one image file into a fixed-size uint8 array.

Policy (documented in docs/input-contract.md):
1) EXIF orientation is applied; animated images use their first frame.
2) Modes are normalized: 16-bit and float images are scaled to 0..255, palette images go
   through RGB(A), CMYK is converted to RGB, alpha is composited over black; then the image
   becomes L (channels 1) or RGB (channels 3).
3) `pad` keeps the aspect ratio: the longer side becomes image_size and the rest is black;
   `stretch` resizes both sides to image_size.

A JPEG much larger than image_size is decoded at 1/2, 1/4 or 1/8 scale by libjpeg itself (its
draft mode), never below what the resize and the signature need with a margin (DRAFT_MARGIN,
SIGNATURE_DRAFT): a 12-MP photo costs about 9x less CPU, and the packed pixels move by under a
grey level on average (tests/test_ingest_speed.py). The manifest's width and height stay the
file's own; the decompression-bomb check reads them before any draft.

Files are untrusted: Pillow only ever opens them with the plugins of DECODE_FORMATS (it picks a
format from the bytes, not the name, and some plugins run external programs: EPS starts
Ghostscript), and any failure, whatever its kind, becomes a quarantine reason (Rejected).
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"})
SYSTEM_FILES = frozenset({"thumbs.db", "desktop.ini", "ehthumbs.db"})
# The only Pillow plugins that may read a user's file (every Image.open passes formats=): the
# formats of IMAGE_EXTENSIONS, none of which starts an external program.
DECODE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")
# Most bytes a file of DECODE_FORMATS stores per pixel uncompressed (16-bit RGBA in PNG or
# TIFF), and room for headers, metadata and an embedded preview: see max_file_bytes. (Only a
# many-page TIFF or a long animation can be larger and fine; ingest uses the first frame.)
BYTES_PER_PIXEL = 8
HEADER_BYTES = 2**20


class Rejected(Exception):
    """The file cannot become a training image; the message is the quarantine reason."""


@dataclass(frozen=True)
class Decoded:
    pixels: np.ndarray  # (image_size, image_size, channels) uint8
    sha256: str  # of the file's bytes
    width: int
    height: int
    mode: str
    note: str  # what normalization did, for the manifest ("" when nothing notable)
    signature: np.ndarray  # (SIGNATURE_SIZE,) float32: see signature()


SIGNATURE_SIDE = 16
SHAPE_SIZE = SIGNATURE_SIDE * SIGNATURE_SIDE  # the first values: the shape of the picture
SIGNATURE_SIZE = SHAPE_SIZE + 4  # then its colour and contrast

Box = tuple[float, float, float, float]  # (left, top, right, bottom), as resize(box=...) takes


def signature(image: Image.Image, box: Box | None = None) -> np.ndarray:
    """The image's look, whatever its bytes and size: its shape, grayscale at 16x16
    (box-averaged), mean-free and unit-norm, then its mean red, green and blue and its
    grayscale contrast (std), in 0..1. Re-encoded, resized, slightly cropped and re-saved copies
    lie within a small cosine distance of the original's shape, with about its colour and
    contrast (near_copies.copies_of); a flat image has a zero shape, which is near nothing."""
    small = image.convert("RGB").resize((SIGNATURE_SIDE, SIGNATURE_SIDE), Image.Resampling.BOX)
    rgb = np.asarray(small, dtype=np.float32) / 255.0
    gray = np.asarray(small.convert("L"), dtype=np.float32).ravel() / 255.0
    contrast = float(gray.std())
    shape = gray - gray.mean()
    norm = float(np.linalg.norm(shape))
    shape = shape / norm if norm > 1e-3 else np.zeros_like(shape)
    return np.concatenate([shape, rgb.reshape(-1, 3).mean(0), [contrast]]).astype(np.float32)


def max_file_bytes(max_pixels: int) -> int:
    """The largest file worth reading for an image of at most max_pixels: stored uncompressed
    at BYTES_PER_PIXEL, plus HEADER_BYTES. A larger file is refused before it is read."""
    return max_pixels * BYTES_PER_PIXEL + HEADER_BYTES


def open_image(source: Path | io.BytesIO) -> Image.Image:
    """Image.open restricted to DECODE_FORMATS; a file of another format raises Rejected with
    the reason (naming the format when its first bytes tell). Only the header is read.

    Pillow's own pixel limit is off while it opens: every caller checks the size against its
    own (ingest.max_image_pixels, THUMBNAIL_MAX_PIXELS) before it decodes, and reports it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        old_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(source, formats=DECODE_FORMATS)
        except UnidentifiedImageError:
            if isinstance(source, io.BytesIO):
                prefix = source.getvalue()[:16]
            else:
                with open(source, "rb") as f:
                    prefix = f.read(16)
            raise Rejected(unaccepted(prefix)) from None
        finally:
            Image.MAX_IMAGE_PIXELS = old_limit


def unaccepted(prefix: bytes) -> str:
    """Why a file whose first bytes are `prefix` is not opened: the format they show, when
    Pillow knows one outside DECODE_FORMATS, else that there is none it can identify.

    Only the plugins' signature checks run (pure tests of the first 16 bytes, as Image.open
    makes them); no plugin outside DECODE_FORMATS ever reads the file."""
    accepted = f"(accepted: {', '.join(DECODE_FORMATS)})"
    Image.init()  # registers every plugin's signature check
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        try:
            known = accept is not None and bool(accept(prefix[:16]))
        except Exception:  # noqa: BLE001 - a check that fails on odd bytes tells nothing
            known = False
        if known and name not in DECODE_FORMATS:
            return f"not an image ingest accepts: format {name} {accepted}"
    return f"not an image: Pillow cannot identify the file format {accepted}"


def one_line(text: object) -> str:
    """text on one line (an exception's message can hold newlines)."""
    return re.sub(r"\s+", " ", str(text)).strip()


def decode(
    data: bytes,
    *,
    image_size: int,
    channels: int,
    resize: str,
    max_pixels: int,
    draft: bool = True,
) -> Decoded:
    """Decode file bytes into a normalized array, or raise Rejected with the reason.

    Any failure is a reason, whatever its kind (a decoder's own error, memory): one hostile
    file must not stop an ingest. draft=False decodes a JPEG at full size (the old path, for
    comparison)."""
    try:
        return _decode(data, image_size, channels, resize, max_pixels, draft)
    except Rejected:
        raise
    except Exception as exc:  # noqa: BLE001 - see above; MemoryError is an Exception too
        message = one_line(exc)
        kind = type(exc).__name__
        raise Rejected(f"cannot decode: {kind}{': ' if message else ''}{message}") from None


def _decode(
    data: bytes, image_size: int, channels: int, resize: str, max_pixels: int, draft: bool
) -> Decoded:
    if not data:
        raise Rejected("empty file (0 bytes)")
    if len(data) > max_file_bytes(max_pixels):
        raise Rejected(too_large(len(data), max_pixels))
    sha256 = hashlib.sha256(data).hexdigest()
    notes = []
    with warnings.catch_warnings():
        # Pillow warns (and errors at 2x) above its own global limit; ours is checked below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        old_limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            image = open_image(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise Rejected(
                    f"decompression bomb: {width}x{height} = {width * height} pixels is over "
                    f"ingest.max_image_pixels ({max_pixels})"
                )
            if width == 0 or height == 0:
                raise Rejected(f"image has no pixels ({width}x{height})")
            frames = getattr(image, "n_frames", 1)
            if frames > 1:
                image.seek(0)
                notes.append(f"animated ({frames} frames): first frame used")
            mode = image.mode
            # A JPEG decodes at a reduced scale where enough pixels remain (before load()).
            content = _draft(image, image_size, resize) if draft else None
            image.load()
            orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
            image = ImageOps.exif_transpose(image)
        except Rejected:
            raise
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise Rejected(f"corrupt or truncated image: {one_line(exc)}") from None
        except Image.DecompressionBombError as exc:  # pragma: no cover - limit disabled above
            raise Rejected(f"decompression bomb: {one_line(exc)}") from None
        finally:
            Image.MAX_IMAGE_PIXELS = old_limit
    image, note = _normalize_mode(image, channels)
    if note:
        notes.append(note)
    # A draft's last row or column can hold less than a pixel of picture: both resizes read
    # the picture's exact region, so the geometry stays the full decode's.
    box = _content_box(image.size, content, orientation) if content else None
    look = signature(image, box)
    image = _resize(image, image_size, resize, box)
    pixels = np.asarray(image, dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return Decoded(pixels, sha256, width, height, mode, "; ".join(notes), look)


def too_large(size: int, max_pixels: int) -> str:
    """The quarantine reason for a file of `size` bytes over max_file_bytes(max_pixels)."""
    return (
        f"file too large: {size:,} bytes is over the {max_file_bytes(max_pixels):,} bytes an "
        f"image of ingest.max_image_pixels ({max_pixels:,}) can take ({BYTES_PER_PIXEL} bytes "
        f"per pixel + {HEADER_BYTES // 2**20} MiB)"
    )


THUMBNAIL_MAX_PIXELS = 100_000_000  # reports never decode a larger file


def thumbnail(path: Path, max_side: int = 96) -> np.ndarray | None:
    """The file as a person knows it, for reports: EXIF orientation applied, colour kept, at
    most max_side px (aspect kept). None when it cannot be read (reports then show only the
    model input). JPEGs are decoded at a reduced scale."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with open_image(path) as image:
                width, height = image.size
                if not 0 < width * height <= THUMBNAIL_MAX_PIXELS:
                    return None
                image.draft("RGB", (max_side, max_side))
                image = as_decoded(ImageOps.exif_transpose(image))
                image.thumbnail((max_side, max_side))
                return np.asarray(image, dtype=np.uint8)
        except Exception:  # noqa: BLE001 - a missing or broken file only costs the picture
            return None


DRAFT_MARGIN = 2  # a draft keeps >= 2 px per model-input px, so the final LANCZOS still averages
SIGNATURE_DRAFT = 8 * SIGNATURE_SIDE  # and >= 8 px per signature cell on both sides: BOX counts
#   whole source pixels, so with few per cell its borders jitter (measured: cosine 4e-3 at 2 px)


def _draft(image: Image.Image, size: int, policy: str) -> tuple[float, float] | None:
    """Ask libjpeg for the smallest of 1/1, 1/2, 1/4, 1/8 scale that keeps DRAFT_MARGIN times
    the model input's pixels and SIGNATURE_DRAFT pixels for the signature; returns the
    picture's size in drafted pixels (fractional where a side is not a multiple of the scale),
    or None without a draft. The request is in the stored orientation and holds whichever way
    EXIF turns the picture: `stretch` needs both sides, `pad` scales both sides by one factor
    set by the long side (which stays the long side when turned), and the signature stretches
    both sides."""
    if not isinstance(image, JpegImagePlugin.JpegImageFile):
        return None  # other formats have no cheap reduced decode: unchanged
    both = SIGNATURE_DRAFT
    longest = max(DRAFT_MARGIN * size, SIGNATURE_DRAFT)
    width, height = image.size
    if policy == "stretch":
        request = (longest, longest)
    else:
        request = (longest, both) if width >= height else (both, longest)
    drafted = image.draft(image.mode, request)  # same mode: colour stays for the signature
    if drafted is None or image.size == (width, height):
        return None
    return drafted[1][2], drafted[1][3]


def _content_box(
    size: tuple[int, int], content: tuple[float, float], orientation: int
) -> Box | None:
    """Where the picture lies in an upright drafted image of `size`: libjpeg rounds a drafted
    side up, so the last row or column holds less than a pixel of picture. The stored top-left
    corner, where the picture starts, lands where EXIF orientation turned it (the transposes of
    ImageOps.exif_transpose)."""
    width, height = content if orientation not in (5, 6, 7, 8) else content[::-1]
    if (width, height) == size:
        return None
    left = size[0] - width if orientation in (2, 3, 6, 7) else 0
    top = size[1] - height if orientation in (3, 4, 7, 8) else 0
    return (left, top, left + width, top + height)


def as_decoded(image: Image.Image) -> Image.Image:
    """The image in L or RGB as ingest decodes it (16-bit scaled, palette expanded, alpha over
    black), at its own size; grayscale modes stay grayscale."""
    gray = image.mode in ("1", "L", "LA", "La", "I", "F") or image.mode.startswith("I;16")
    return _normalize_mode(image, 1 if gray else 3)[0]


def _normalize_mode(image: Image.Image, channels: int) -> tuple[Image.Image, str]:
    mode = image.mode
    note = ""
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") else max(float(values.max()), 1.0)
        image = Image.fromarray(np.clip(values / top * 255.0, 0, 255).round().astype(np.uint8))
        note = f"{mode} scaled to 8 bits"
    elif mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        note = "palette converted"
    elif mode == "CMYK":
        image = image.convert("RGB")
        note = "CMYK converted to RGB"
    elif mode not in ("1", "L", "LA", "RGB", "RGBA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
        note = f"{mode} converted"
    if image.mode in ("LA", "RGBA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
        note = (note + "; " if note else "") + "alpha composited over black"
    return image.convert("L" if channels == 1 else "RGB"), note


def _resize(image: Image.Image, size: int, policy: str, box: Box | None = None) -> Image.Image:
    if policy == "stretch":
        return image.resize((size, size), Image.Resampling.LANCZOS, box=box)
    width, height = (box[2] - box[0], box[3] - box[1]) if box else image.size
    scale = size / max(width, height)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if box or new_size != image.size:
        image = image.resize(new_size, Image.Resampling.LANCZOS, box=box)
    if new_size == (size, size):
        return image
    canvas = Image.new(image.mode, (size, size), 0)
    canvas.paste(image, ((size - new_size[0]) // 2, (size - new_size[1]) // 2))
    return canvas
