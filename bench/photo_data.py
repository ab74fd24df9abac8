"""A "distinct objects" colour-photo set: each class is its own photo(s), shipped offline by pip packages.

    python bench/photo_data.py --out DATA_DIR [--seed 0] [--per-class 40] [--pool-per-class 40]
                               [--test-per-class 40] [--pools 2] [--flip 0.15]

Same command line and output layout as bench/colour_data.py (labeled/<class>/, test/<class>/,
unlabeled/pool_NNN/, truth.csv; --flip of the labeled images under a wrong class). There the
classes are regions of a few shared photos (a texture regime); here, the common case, every class
is a different photo or object, no two classes from one scene:

    astronaut   scikit-image astronaut (Eileen Collins in her orange suit; the shuttle model cut off)
    officer     matplotlib's sample grace_hopper.jpg (Grace Hopper in naval uniform)
    cat         scikit-image chelsea
    espresso    scikit-image coffee (cup and saucer)
    rocket      scikit-image rocket (the rocket on its pad, the middle of the photo)
    motorcycle  scikit-image stereo_motorcycle, both the left and the right view
    pagoda      scikit-learn china (the temple, without the lake side)
    dahlia      scikit-learn flower
    galaxies    scikit-image hubble_deep_field
    retina      scikit-image retina (fundus)

All are inside the installed wheels (scikit-image's data folder, scikit-learn's
`load_sample_images`, matplotlib's mpl-data/sample_data); nothing is downloaded. A sample is a
random crop of its class's region, 35-90% of the region's shorter side (so the object stays
recognisable; colour_data.py uses 10-60%), aspect 3:4 to 4:3, anywhere inside the region,
optionally mirrored, then colour_data.py's own photometric jitter (`jitter`), resize to a
longer side of 40-120 px and saving (`save`: PNG 1/3, JPEG quality 40-95 2/3, random names that
carry no class).

Needs scikit-image (`pip install scikit-image`, or the project's `bench` extra).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from colour_data import jitter, save  # noqa: E402

# class -> [(photo, (y0, y1, x0, x1) as fractions of the photo)]; one class may draw from several
CLASSES: dict[str, list[tuple[str, tuple[float, float, float, float]]]] = {
    "astronaut": [("astronaut", (0.0, 1.0, 0.08, 0.7))],
    "officer": [("grace_hopper", (0.0, 1.0, 0.15, 1.0))],
    "cat": [("chelsea", (0.0, 1.0, 0.1, 0.9))],
    "espresso": [("coffee", (0.0, 0.95, 0.1, 0.75))],
    "rocket": [("rocket", (0.1, 1.0, 0.35, 0.68))],
    "motorcycle": [
        ("motorcycle_left", (0.3, 0.98, 0.05, 0.95)),
        ("motorcycle_right", (0.3, 0.98, 0.05, 0.95)),
    ],
    "pagoda": [("china", (0.0, 1.0, 0.1, 0.58))],
    "dahlia": [("flower", (0.05, 0.85, 0.2, 0.75))],
    "galaxies": [("hubble_deep_field", (0.0, 1.0, 0.0, 1.0))],
    "retina": [("retina", (0.05, 0.95, 0.05, 0.95))],
}
CROP = (0.35, 0.9)  # crop side, as a share of the region's shorter side


def load_photos() -> dict[str, np.ndarray]:
    """name -> uint8 (H, W, 3); all shipped inside the wheels, nothing is downloaded."""
    try:
        import skimage.data as sk
    except ImportError as exc:  # pragma: no cover - a setup message
        raise SystemExit(f"needs scikit-image ({exc}); see this file's docstring") from exc
    from matplotlib import cbook
    from sklearn.datasets import load_sample_images

    photos = {n: getattr(sk, n)()[..., :3] for n in ("astronaut", "chelsea", "coffee", "rocket")}
    photos |= {n: getattr(sk, n)()[..., :3] for n in ("hubble_deep_field", "retina")}
    photos["motorcycle_left"], photos["motorcycle_right"], _ = sk.stereo_motorcycle()
    sample = load_sample_images()
    for path, image in zip(sample.filenames, sample.images):
        photos[Path(path).stem] = image  # china, flower
    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as im:
        photos["grace_hopper"] = np.asarray(im.convert("RGB"))
    return photos


def sample(photo: np.ndarray, box, rng: np.random.Generator) -> Image.Image:
    """colour_data.sample with a crop of CROP of the region's shorter side."""
    h, w = photo.shape[:2]
    y0, y1, x0, x1 = int(box[0] * h), int(box[1] * h), int(box[2] * w), int(box[3] * w)
    rh, rw = y1 - y0, x1 - x0
    side = rng.uniform(*CROP) * min(rh, rw)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    ch = int(min(rh, max(8, side / np.sqrt(aspect))))
    cw = int(min(rw, max(8, side * np.sqrt(aspect))))
    top, left = y0 + rng.integers(0, rh - ch + 1), x0 + rng.integers(0, rw - cw + 1)
    crop = Image.fromarray(np.ascontiguousarray(photo[top : top + ch, left : left + cw]))
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    longer = int(rng.integers(40, 121))
    scale = longer / max(ch, cw)
    size = (max(8, round(cw * scale)), max(8, round(ch * scale)))
    crop = crop.resize(size, Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.LANCZOS)
    return jitter(crop, rng)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-class", type=int, default=40, help="labeled images per class")
    ap.add_argument("--pool-per-class", type=int, default=40, help="per class, in each pool")
    ap.add_argument("--test-per-class", type=int, default=40)
    ap.add_argument("--pools", type=int, default=2)
    ap.add_argument("--flip", type=float, default=0.15, help="share of labeled images mislabeled")
    args = ap.parse_args(argv)

    out: Path = args.out
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty; remove it to regenerate")
    rng = np.random.default_rng(args.seed)
    photos = load_photos()
    names = list(CLASSES)
    truth: list[tuple[str, str]] = []

    def draw(cls: str) -> Image.Image:
        sources = CLASSES[cls]
        photo, box = sources[rng.integers(len(sources))]
        return sample(photos[photo], box, rng)

    # labeled: exactly round(flip * N) images get a wrong class, spread over classes at random
    labeled = [c for c in names for _ in range(args.per_class)]
    wrong = set(
        rng.choice(len(labeled), size=round(args.flip * len(labeled)), replace=False).tolist()
    )
    for i, cls in enumerate(labeled):
        given = cls
        if i in wrong:
            given = names[(names.index(cls) + rng.integers(1, len(names))) % len(names)]
        path = save(draw(cls), out / "labeled" / given, rng)
        truth.append((path.relative_to(out).as_posix(), cls))
    for cls in names:
        for _ in range(args.test_per_class):
            path = save(draw(cls), out / "test" / cls, rng)
            truth.append((path.relative_to(out).as_posix(), cls))
    for p in range(args.pools):
        pool = [c for c in names for _ in range(args.pool_per_class)]
        for cls in rng.permutation(pool):
            path = save(draw(str(cls)), out / "unlabeled" / f"pool_{p + 1:03d}", rng)
            truth.append((path.relative_to(out).as_posix(), str(cls)))
    with open(out / "truth.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "true_label"])
        w.writerows(truth)
    print(
        f"{out}: {len(labeled)} labeled ({len(wrong)} wrong), {len(names) * args.test_per_class} test, "
        f"{args.pools} pools x {len(names) * args.pool_per_class}; classes {', '.join(names)}"
    )


if __name__ == "__main__":
    main()
