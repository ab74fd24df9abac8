"""Shared fixtures: a tiny real image set (scikit-learn digits) with known flipped labels."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from sklearn.datasets import load_digits

from pipeline.config import load_params

ROOT = Path(__file__).resolve().parents[1]

# Small and fast, but the same code paths as the demo.
FAST = {
    "base": {"image_size": 8},
    "clean": {"folds": 3, "epochs": 8},
    "train": {"epochs": 4, "batch_size": 32, "model": {"width": 8, "blocks": [1, 1]}, "top_k": 2},
    "augment": {"preview_rows": 3, "preview_copies": 2},
}


def deep_update(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = deep_update(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def write_params(folder: Path, extra: dict | None = None) -> Path:
    """params.yaml = the project's, made fast, plus `extra`."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw = deep_update(deep_update(raw, FAST), extra or {})
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def write_digits(
    data_dir: Path,
    names: dict[int, str],
    per_class: int,
    *,
    flip: float = 0.0,
    test_per_class: int = 0,
    seed: int = 0,
) -> dict[str, str]:
    """Write digits as data/labeled/<name>/ (+ data/test/); returns {path: true class name}.

    `names` maps a digit to its class name, so tests can use names whose orders differ.
    A `flip` share of labeled images is written under a wrong class.
    """
    digits = load_digits()
    rng = np.random.default_rng(seed)
    digit_ids = sorted(names)
    truth = {}
    for split, count in (("labeled", per_class), ("test", test_per_class)):
        for digit in digit_ids:
            pool = np.flatnonzero(digits.target == digit)
            start = 0 if split == "labeled" else per_class
            for i in pool[start : start + count]:
                given = digit
                if split == "labeled" and rng.random() < flip:
                    given = rng.choice([d for d in digit_ids if d != digit])
                rel = f"{split}/{names[given]}/img_{i:04d}.png"
                path = data_dir / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.clip(digits.images[i] * 16, 0, 255).astype(np.uint8)).save(path)
                truth[rel] = names[digit]
    return truth


def write_truth(data_dir: Path, truth: dict[str, str]) -> None:
    lines = ["path,true_label"] + [f"{p},{t}" for p, t in truth.items()]
    (data_dir / "truth.csv").write_text("\n".join(lines) + "\n")


def tree_hash(root: Path) -> dict[str, str]:
    """Content hash of every file (and link target) under root."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                out[key] = "link:" + os.readlink(path)
            elif not path.is_file():  # a FIFO would block a read
                out[key] = f"special:{path.stat().st_mode}"
            else:
                out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A work folder with fast params.yaml; tests chdir into it."""
    write_params(tmp_path)
    old = Path.cwd()
    os.chdir(tmp_path)
    yield tmp_path
    os.chdir(old)


@pytest.fixture
def fast_params(project: Path):
    return load_params(project / "params.yaml")


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def ingested(project: Path) -> Path:
    """Ingest outputs for 3 digit classes (30 labeled, 10 test each) under project/artifacts."""
    from pipeline import ingest

    data = project / "data"
    truth = write_digits(data, {0: "zero", 1: "one", 2: "two"}, 30, test_per_class=10)
    write_truth(data, truth)
    ingest.run(data, project / "artifacts" / "ingest", load_params(project / "params.yaml"))
    return project / "artifacts" / "ingest"


def train_table(ingest_dir: Path) -> Path:
    """The ingest manifest's training rows as a training table (what clean would write)."""
    import pandas as pd

    manifest = pd.read_csv(ingest_dir / "manifest.csv", dtype=str, keep_default_na=False)
    path = ingest_dir.parent / "train.csv"
    manifest[manifest["split"] == "train"].to_csv(path, index=False)
    return path
