"""A colour-photo classification set built only from photos that pip packages ship offline.

    python bench/colour_data.py --out DATA_DIR [--seed 0] [--per-class 40] [--pool-per-class 40]
                                [--test-per-class 40] [--pools 2] [--flip 0.15]

Writes  DATA_DIR/labeled/<class>/*.{jpg,png}   --per-class images per class, --flip of them
                                                under a wrong (random other) class
        DATA_DIR/test/<class>/...               true labels
        DATA_DIR/unlabeled/pool_NNN/...         flat, --pool-per-class images per class per pool
        DATA_DIR/truth.csv                      path,true_label for every image written

Classes are regions of real photos: scikit-image's astronaut, chelsea, coffee, rocket,
immunohistochemistry, retina (inside the scikit-image wheel, no download) and scikit-learn's
china and flower (`load_sample_images`). Several classes share colours and textures on purpose
(orange suit / retina / dahlia, cat fur / wood table / stained tissue, pagoda and foliage from one
photo), so the task is not solved by mean colour alone. A sample is a random crop of its class's
region (10-60% of the region's shorter side, aspect 3:4 to 4:3, anywhere inside it), optionally
mirrored, jittered in brightness, contrast, saturation, hue and per-channel gain, sometimes
blurred or noised, resized so its longer side is 40-120 px, and saved as PNG (1/3) or JPEG of
quality 40-95 (2/3). File names are random and carry no class.

scikit-image is not a project dependency: `pip install scikit-image` (or
`pip install --target DIR --no-deps scikit-image lazy_loader imageio tifffile networkx` and
PYTHONPATH=DIR) before running this.
"""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

# class -> [(photo, (y0, y1, x0, x1) as fractions of the photo)]; one class may draw from several
CLASSES: dict[str, list[tuple[str, tuple[float, float, float, float]]]] = {
    "suit": [("astronaut", (0.45, 1.0, 0.03, 0.55))],  # orange suit, badges
    "cat": [("chelsea", (0.0, 1.0, 0.1, 0.9))],  # fur, eyes
    "espresso": [("coffee", (0.05, 0.95, 0.12, 0.72))],  # red cup and saucer, crema
    "table": [("coffee", (0.0, 1.0, 0.78, 1.0)), ("coffee", (0.0, 0.45, 0.0, 0.18))],  # wood
    "retina": [("retina", (0.15, 0.85, 0.15, 0.85))],  # orange-red fundus, vessels
    "tissue": [("immunohistochemistry", (0.0, 1.0, 0.0, 1.0))],  # brown cells, blue stroma
    "dahlia": [("flower", (0.2, 0.9, 0.35, 0.75))],  # orange petals
    "pagoda": [("china", (0.05, 0.85, 0.3, 0.6))],  # roofs, red pillars
    "foliage": [("china", (0.72, 1.0, 0.0, 1.0)), ("flower", (0.0, 1.0, 0.0, 0.3))],  # leaves
    "launchpad": [("rocket", (0.0, 1.0, 0.0, 1.0))],  # night sky, towers, lights
}


def load_photos() -> dict[str, np.ndarray]:
    """name -> uint8 (H, W, 3); all shipped inside the wheels, nothing is downloaded."""
    try:
        import skimage.data as sk
    except ImportError as exc:  # pragma: no cover - a setup message
        raise SystemExit(f"needs scikit-image ({exc}); see this file's docstring") from exc
    from sklearn.datasets import load_sample_images

    photos = {
        n: getattr(sk, n)()[..., :3]
        for n in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "retina")
    }
    sample = load_sample_images()
    for path, image in zip(sample.filenames, sample.images):
        photos[Path(path).stem] = image  # china, flower
    return photos


def jitter(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Photometric changes a second camera or a second day would bring."""
    a = np.asarray(image).astype(np.float32) / 255.0
    # hue rotation (small) and saturation, through HSV
    hsv = np.asarray(Image.fromarray((a * 255).astype(np.uint8)).convert("HSV")).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-10, 10)) % 256  # about +-14 degrees
    hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.7, 1.3), 0, 255)
    a = (
        np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")).astype(np.float32)
        / 255
    )
    a = a * rng.uniform(0.9, 1.1, size=3)  # white balance
    mean = a.mean()
    a = (a - mean) * rng.uniform(0.7, 1.3) + mean * rng.uniform(0.7, 1.3)  # contrast, brightness
    if rng.random() < 0.2:
        a = a + rng.normal(0, rng.uniform(0.01, 0.04), size=a.shape)
    out = Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8))
    if rng.random() < 0.2:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    return out


def sample(photo: np.ndarray, box, rng: np.random.Generator) -> Image.Image:
    h, w = photo.shape[:2]
    y0, y1, x0, x1 = int(box[0] * h), int(box[1] * h), int(box[2] * w), int(box[3] * w)
    rh, rw = y1 - y0, x1 - x0
    side = rng.uniform(0.1, 0.6) * min(rh, rw)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    ch, cw = (
        int(min(rh, max(8, side / np.sqrt(aspect)))),
        int(min(rw, max(8, side * np.sqrt(aspect)))),
    )
    top, left = y0 + rng.integers(0, rh - ch + 1), x0 + rng.integers(0, rw - cw + 1)
    crop = Image.fromarray(np.ascontiguousarray(photo[top : top + ch, left : left + cw]))
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    longer = int(rng.integers(40, 121))
    scale = longer / max(ch, cw)
    size = (max(8, round(cw * scale)), max(8, round(ch * scale)))
    crop = crop.resize(size, Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.LANCZOS)
    return jitter(crop, rng)


def save(image: Image.Image, folder: Path, rng: np.random.Generator) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    name = rng.bytes(6).hex()
    if rng.random() < 1 / 3:
        path = folder / f"{name}.png"
        image.save(path)
    else:
        path = folder / f"{name}.jpg"
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=int(rng.integers(40, 96)))
        path.write_bytes(buf.getvalue())
    return path


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
