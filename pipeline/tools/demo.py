"""demo-data: scikit-learn's bundled handwritten digits, written into the input contract.

Writes  data/labeled/<class>/   with a known share of flipped labels (demo.flip_fraction)
        data/test/<class>/      true labels
        data/unlabeled/pool_NNN/
        data/truth.csv          path,true_label for every image written
Params  base.seed, demo; writes `rounds` (one round per pool written) and the demo's
        training budgets: train.min_steps, clean.min_steps and clean.embedding_steps become
        demo.train_min_steps, demo.clean_min_steps and demo.clean_embedding_steps (comments
        kept), so the quick start's rounds run in minutes
        while the committed general defaults stay as they are for data a user brings

The digits are real 8x8 scans with 17 grey levels shipped inside scikit-learn; nothing is
downloaded. Written folders are registered with `dvc add` when data/ is inside a DVC repo.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.datasets import load_digits

from pipeline.core.config import DemoConfig, Params
from pipeline.core.errors import PipelineError
from pipeline.core.io import dvc_add, edit_yaml, write_table
from pipeline.tools.pools import write_rounds

log = logging.getLogger(__name__)


def split_indices(labels: np.ndarray, params: Params) -> dict[str, np.ndarray]:
    """Stratified, seeded split into test, labeled and pools: name -> indices."""
    rng = np.random.default_rng(params.base.seed)
    parts: dict[str, list[int]] = {"test": [], "labeled": []}
    pools = [f"pool_{i + 1:03d}" for i in range(params.demo.pools)]
    parts.update({pool: [] for pool in pools})
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_test = int(round(len(idx) * params.demo.test_fraction))
        rest = idx[n_test:]
        n_labeled = int(round(len(rest) * params.demo.labeled_fraction))
        parts["test"] += idx[:n_test].tolist()
        parts["labeled"] += rest[:n_labeled].tolist()
        for pool, chunk in zip(pools, np.array_split(rest[n_labeled:], len(pools))):
            parts[pool] += chunk.tolist()
    return {name: np.array(sorted(idx), dtype=np.int64) for name, idx in parts.items()}


def flip_labels(labels: np.ndarray, fraction: float, n_classes: int, seed: int) -> np.ndarray:
    """Copy of labels where exactly round(fraction * N) entries get another, random class."""
    rng = np.random.default_rng(seed + 1)
    noisy = labels.copy()
    flipped = rng.choice(len(labels), size=int(round(fraction * len(labels))), replace=False)
    offsets = rng.integers(1, n_classes, size=len(flipped))
    noisy[flipped] = (labels[flipped] + offsets) % n_classes
    return noisy


def budgets(demo: DemoConfig) -> dict[str, Any]:
    """The demo's training budgets as dotted params keys: what demo-data writes into
    params.yaml, and what bench/outcome.py's demo regime trains with."""
    return {
        "train.min_steps": demo.train_min_steps,
        "clean.min_steps": list(demo.clean_min_steps),
        "clean.embedding_steps": demo.clean_embedding_steps,
    }


def write_budgets(params_path: Path, demo: DemoConfig) -> None:
    """Set params.yaml's keys of `budgets` to the demo's values (comments, order and a list's
    flow style kept; a key already at its value is left as written)."""
    from ruamel.yaml.comments import CommentedSeq

    def replace(doc) -> None:
        for dotted, value in budgets(demo).items():
            section, key = dotted.split(".")
            if doc.get(section) is None:
                doc[section] = {}
            current = doc[section].get(key)
            if not isinstance(value, list):
                if current != value:
                    doc[section][key] = value
            elif isinstance(current, list):
                if list(current) != value:
                    current[:] = value  # in place: the list keeps its style and comment
            elif len(value) == 1:  # one budget may be written as a number, as it was
                if current != value[0]:
                    doc[section][key] = value[0]
            else:
                seq = CommentedSeq(value)
                seq.fa.set_flow_style()
                doc[section][key] = seq

    edit_yaml(params_path, replace)


def run(
    data_dir: Path, params: Params, *, register: bool = True, params_path: Path | None = None
) -> dict:
    """Write the demo dataset into data_dir; returns counts. Refuses to touch existing data.

    With params_path, its `rounds` become one round per pool written and the keys of
    `budgets` the demo's values (each only when it differs).
    """
    data_dir = Path(data_dir)
    existing = [p for p in ("labeled", "test", "unlabeled", "truth.csv") if (data_dir / p).exists()]
    if existing:
        raise PipelineError(
            f"{data_dir} already holds {', '.join(existing)}; demo-data never overwrites data "
            f"(remove them yourself to regenerate)"
        )
    digits = load_digits()
    images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)  # 0..16 -> 0..255
    labels = digits.target.astype(np.int64)
    parts = split_indices(labels, params)
    noisy = flip_labels(labels[parts["labeled"]], params.demo.flip_fraction, 10, params.base.seed)

    px = params.demo.image_px
    truth = []
    for name, idx in parts.items():
        given = noisy if name == "labeled" else labels[idx]
        for i, label in zip(idx, given):
            if name in ("labeled", "test"):
                rel = f"{name}/{label}/digit_{i:04d}.png"
            else:
                rel = f"unlabeled/{name}/digit_{i:04d}.png"
            path = data_dir / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(images[i], mode="L")
            if px != image.width:
                image = image.resize((px, px), Image.Resampling.BILINEAR)
            image.save(path)
            truth.append({"path": rel, "true_label": str(labels[i])})
    write_table(data_dir / "truth.csv", pd.DataFrame(truth))

    counts = {name: len(idx) for name, idx in parts.items()}
    counts["flipped"] = int((noisy != labels[parts["labeled"]]).sum())
    log.info("demo-data: %s", ", ".join(f"{k} {v}" for k, v in counts.items()))
    pools = [p for p in parts if p.startswith("pool")]
    if params_path is not None:
        write_budgets(params_path, params.demo)
        write_rounds(params_path, pools)
        log.info(
            "demo-data: %s in %s",
            ", ".join(f"{k} {v}" for k, v in budgets(params.demo).items()),
            params_path,
        )
    if register:
        dvc_add(data_dir, ["labeled", "test", "truth.csv"] + [f"unlabeled/{p}" for p in pools])
    return counts
