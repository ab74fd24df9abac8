"""Near copies: how often each kind of copy is caught, how often distinct images are taken for
copies, and what the check costs, side by side for the signature rule ingest uses and for
imagehash's 64-bit phash (what CleanVision uses).

Real images only: crops of the two photos scikit-learn ships (96, 128 and 160 px tiles, no
overlap) and scikit-learn's 8x8 digits upscaled to 28 px. Per image, the copies are a JPEG
re-encode (quality 70), a half-size and a 1.5x resize, a 5% crop off the borders and a 5% crop off
one side. "Distinct flagged" is the share of distinct images whose nearest other image falls
under the cutoff.

    python bench/near_copies.py [--sizes 1000 10000]   # phash needs `pip install imagehash`
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits, load_sample_images

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.data.images import signature  # noqa: E402
from pipeline.data.near_copies import copies_of, near_copy_cutoff, nearest  # noqa: E402

RATIO, CAP, PHASH_BITS = 0.2, 0.1, 8  # ingest.near_copy_ratio / _max_distance; phash's usual 8


def tiles(size: int) -> list[Image.Image]:
    out = []
    for photo in load_sample_images().images:
        h, w, _ = photo.shape
        for y in range(0, h - size + 1, size):
            for x in range(0, w - size + 1, size):
                out.append(Image.fromarray(photo[y : y + size, x : x + size]))
    return out


def digits(n: int = 1500) -> list[Image.Image]:
    d = load_digits()
    return [
        Image.fromarray((d.images[i] * 16).clip(0, 255).astype(np.uint8)).resize(
            (28, 28), Image.Resampling.BILINEAR
        )
        for i in range(n)
    ]


def copies(image: Image.Image) -> dict[str, Image.Image]:
    w, h = image.size
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=70)
    side = (1 - 0.95**0.5) / 2
    return {
        "jpeg": Image.open(io.BytesIO(buffer.getvalue())),
        "half size": image.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.BILINEAR),
        "1.5x size": image.resize((w * 3 // 2, h * 3 // 2), Image.Resampling.BICUBIC),
        "5% crop": image.crop(
            (round(w * side), round(h * side), round(w * (1 - side)), round(h * (1 - side)))
        ),
        "5% crop, one side": image.crop((0, 0, round(w * 0.95), h)),
    }


def detection(name: str, images: list[Image.Image]) -> dict:
    looks = np.stack([signature(i) for i in images])
    cutoff = near_copy_cutoff(looks, RATIO, CAP, seed=0)
    partner, _ = copies_of(looks, looks, cutoff, exclude_self=True)
    result = {"set": name, "images": len(images), "cutoff": cutoff}
    result["signature"] = {"distinct flagged": float((partner >= 0).mean())}
    variants = [copies(i) for i in images[:300]]
    for kind in variants[0]:
        found = [
            copies_of(signature(v[kind])[None], s[None], cutoff)[0][0] == 0
            for v, s in zip(variants, looks)
        ]
        result["signature"][kind] = float(np.mean(found))
    try:
        import imagehash
    except ImportError:
        return result
    hashes = np.array([int(str(imagehash.phash(i)), 16) for i in images], dtype=np.uint64)
    bits = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    np.fill_diagonal(bits, 64)
    result["phash"] = {"distinct flagged": float((bits.min(1) <= PHASH_BITS).mean())}
    for kind in variants[0]:
        d = [
            bin(int(str(imagehash.phash(v[kind])), 16) ^ int(h)).count("1")
            for v, h in zip(variants, hashes)
        ]
        result["phash"][kind] = float(np.mean(np.array(d) <= PHASH_BITS))
    return result


def cost(n: int) -> dict:
    """Seconds for n signatures (from 96-px photo tiles) and for ingest's searches over them."""
    rng = np.random.default_rng(0)
    base = tiles(96)
    images = [base[i % len(base)].rotate(float(rng.uniform(0, 360))) for i in range(n)]
    start = time.perf_counter()
    looks = np.stack([signature(i) for i in images]).astype(np.float16)
    signing = time.perf_counter() - start
    start = time.perf_counter()
    near_copy_cutoff(looks, RATIO, CAP, seed=0)
    test = n // 5
    nearest(looks[test:], looks[:test])  # training rows against the test split
    nearest(looks[test:], looks[test:], exclude_self=True)  # label conflicts among training rows
    search = time.perf_counter() - start
    return {"images": n, "signatures_s": signing, "search_s": search}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "near_copies.json")
    args = parser.parse_args()
    sets = [(f"photo tiles {s} px", tiles(s)) for s in (160, 128, 96)] + [
        ("digits 28 px", digits())
    ]
    results = {"detection": [detection(name, images) for name, images in sets]}
    for row in results["detection"]:
        print(json.dumps(row), flush=True)
    results["cost"] = [cost(n) for n in args.sizes]
    for row in results["cost"]:
        print(json.dumps(row), flush=True)
    results["cores"] = os.cpu_count()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
