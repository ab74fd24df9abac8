"""Decoding one image file into a fixed-size uint8 array.

Policy (documented in the README):
1) EXIF orientation is applied; animated images use their first frame.
2) Modes are normalized: 16-bit and float images are scaled to 0..255, palette images go
   through RGB(A), CMYK is converted to RGB, alpha is composited over black; then the image
   becomes L (channels 1) or RGB (channels 3).
3) `pad` keeps the aspect ratio: the longer side becomes image_size and the rest is black;
   `stretch` resizes both sides to image_size.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"})
SYSTEM_FILES = frozenset({"thumbs.db", "desktop.ini", "ehthumbs.db"})


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


def signature(image: Image.Image) -> np.ndarray:
    """The image's look, whatever its bytes and size: its shape, grayscale at 16x16
    (box-averaged), mean-free and unit-norm, then its mean red, green and blue and its
    grayscale contrast (std), in 0..1. Re-encoded, resized, slightly cropped and re-saved copies
    lie within a small cosine distance of the original's shape, with about its colour and
    contrast (inputs.copies_of); a flat image has a zero shape, which is near nothing."""
    small = image.convert("RGB").resize((SIGNATURE_SIDE, SIGNATURE_SIDE), Image.Resampling.BOX)
    rgb = np.asarray(small, dtype=np.float32) / 255.0
    gray = np.asarray(small.convert("L"), dtype=np.float32).ravel() / 255.0
    contrast = float(gray.std())
    shape = gray - gray.mean()
    norm = float(np.linalg.norm(shape))
    shape = shape / norm if norm > 1e-3 else np.zeros_like(shape)
    return np.concatenate([shape, rgb.reshape(-1, 3).mean(0), [contrast]]).astype(np.float32)


def decode(data: bytes, *, image_size: int, channels: int, resize: str, max_pixels: int) -> Decoded:
    """Decode file bytes into a normalized array, or raise Rejected with the reason."""
    if not data:
        raise Rejected("empty file (0 bytes)")
    sha256 = hashlib.sha256(data).hexdigest()
    notes = []
    with warnings.catch_warnings():
        # Pillow warns (and errors at 2x) above its own global limit; ours is checked below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        old_limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            image = Image.open(io.BytesIO(data))
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
            image.load()
            image = ImageOps.exif_transpose(image)
        except Rejected:
            raise
        except UnidentifiedImageError:
            raise Rejected("not an image: Pillow cannot identify the file format") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise Rejected(f"corrupt or truncated image: {exc}") from None
        except Image.DecompressionBombError as exc:  # pragma: no cover - limit disabled above
            raise Rejected(f"decompression bomb: {exc}") from None
        finally:
            Image.MAX_IMAGE_PIXELS = old_limit
    image, note = _normalize_mode(image, channels)
    if note:
        notes.append(note)
    look = signature(image)
    image = _resize(image, image_size, resize)
    pixels = np.asarray(image, dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return Decoded(pixels, sha256, width, height, mode, "; ".join(notes), look)


THUMBNAIL_MAX_PIXELS = 100_000_000  # reports never decode a larger file


def thumbnail(path: Path, max_side: int = 96) -> np.ndarray | None:
    """The file as a person knows it, for reports: EXIF orientation applied, colour kept, at
    most max_side px (aspect kept). None when it cannot be read (reports then show only the
    model input). JPEGs are decoded at a reduced scale."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with Image.open(path) as image:
                width, height = image.size
                if not 0 < width * height <= THUMBNAIL_MAX_PIXELS:
                    return None
                image.draft("RGB", (max_side, max_side))
                image = ImageOps.exif_transpose(image)
                gray = image.mode in ("1", "L", "LA", "I", "F") or image.mode.startswith("I;16")
                image, _ = _normalize_mode(image, 1 if gray else 3)  # as ingest: 16-bit scaled
                image.thumbnail((max_side, max_side))
                return np.asarray(image, dtype=np.uint8)
        except Exception:  # noqa: BLE001 - a missing or broken file only costs the picture
            return None


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


def _resize(image: Image.Image, size: int, policy: str) -> Image.Image:
    if policy == "stretch":
        return image.resize((size, size), Image.Resampling.LANCZOS)
    width, height = image.size
    scale = size / max(width, height)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling.LANCZOS)
    if new_size == (size, size):
        return image
    canvas = Image.new(image.mode, (size, size), 0)
    canvas.paste(image, ((size - new_size[0]) // 2, (size - new_size[1]) // 2))
    return canvas
