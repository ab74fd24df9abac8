"""What a set of image files looks like, and the image size and channels that fit it.

`init` writes the choice into params.yaml; `ingest` makes it when params.yaml says
`base.image_size: auto` or `base.channels: auto` (the committed default), so a user who swaps
their own photos into data/ without running `init` still trains in colour at a sensible size.
Only headers are read for the sizes, and a seeded sample is decoded small for colour. Files
are opened as ingest opens them (images.open_image: DECODE_FORMATS only, so no Ghostscript).
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from pipeline.core.names import printable
from pipeline.data.images import Rejected, open_image

SIZE_RANGE = (16, 32)  # px; larger trains slowly on a CPU (raise base.image_size on a GPU)
SIZE_STEP = 4  # px: the model halves the resolution twice
COLOUR_SAMPLE = 200  # images decoded to decide base.channels
COLOUR_SPREAD = 8.0  # mean |R-G|, |G-B| above this (0-255) makes an image colourful
COLOUR_SHARE = 0.1  # this share of colourful images makes a colour dataset


def inspect(files: list[Path], max_pixels: int) -> dict:
    """Header figures over every file, colour over a seeded sample."""
    short, formats, unreadable, too_large = [], Counter(), [], []
    readable = []  # what the colour sample may decode: read, and within the pixel limit
    for path in files:
        try:
            with warnings.catch_warnings(), open_image(path) as image:
                warnings.simplefilter("ignore")
                width, height = image.size
                formats[image.format or path.suffix.lower()] += 1
        except Exception as exc:  # noqa: BLE001 - any decoder failure means ingest quarantines it
            why = str(exc) if isinstance(exc, Rejected) else type(exc).__name__
            unreadable.append(f"{printable(str(path))}: {why}")
            continue
        if width * height > max_pixels:
            too_large.append(f"{printable(str(path))}: {width}x{height} px")
        else:
            readable.append(path)
        short.append(min(width, height))
    rng = np.random.default_rng(0)
    sample = rng.permutation(len(readable))[:COLOUR_SAMPLE]
    colourful = [is_colourful(readable[i]) for i in sample]
    colourful = [c for c in colourful if c is not None]
    return {
        "short_side": {
            "min": int(min(short, default=0)),
            "median": float(np.median(short)) if short else 0.0,
            "max": int(max(short, default=0)),
        },
        "formats": dict(formats.most_common()),
        "unreadable": unreadable,
        "too_large": too_large,
        "colour_share": float(np.mean(colourful)) if colourful else 0.0,
    }


def is_colourful(path: Path) -> bool | None:
    try:
        with warnings.catch_warnings(), open_image(path) as image:
            warnings.simplefilter("ignore")
            image.draft("RGB", (64, 64))  # JPEG: decode at a reduced scale
            pixels = np.asarray(image.convert("RGB").resize((32, 32)), dtype=np.float32)
    except Exception:  # noqa: BLE001 - reported by inspect() / quarantined by ingest
        return None
    spread = np.abs(pixels[..., 0] - pixels[..., 1]) + np.abs(pixels[..., 1] - pixels[..., 2])
    return bool(spread.mean() / 2 > COLOUR_SPREAD)


def fitting_shape(stats: dict) -> dict:
    """base.image_size and base.channels for images with these `inspect` figures, each with
    the reason in plain words."""
    median = stats["short_side"]["median"]
    size = int(np.clip(SIZE_STEP * int(median / SIZE_STEP + 0.5), *SIZE_RANGE))
    colour = stats["colour_share"] >= COLOUR_SHARE
    return {
        "image_size": size,
        "channels": 3 if colour else 1,
        "why": {
            "image_size": f"median short side {median:.0f} px, rounded to a multiple of "
            f"{SIZE_STEP} (halves up) within {SIZE_RANGE[0]}-{SIZE_RANGE[1]} px (larger trains "
            f"slowly on a CPU)",
            "channels": f"{stats['colour_share']:.0%} of a sample of images are in colour",
        },
    }
