"""augment stage: the albumentations policy from params, saved so training loads exactly it.

Reads   the cleaned training table and the packed images
Writes  <out>/transforms/default.json     A.save of the full policy
        <out>/transforms/class_NNN.json   the policy minus a class's `augment.exclude`
        <out>/transforms/variants.json    class name -> file
        <out>/preview.png                 rows of originals beside augmented copies
        <out>/offline/{images.npy,table.csv}  augmented copies (augment.offline_copies > 0)
Params  base, augment

The policy itself is built by pipeline/data/transforms.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.config import Params, with_image_shape
from pipeline.core.io import (
    atomic_dir,
    read_array,
    read_json,
    read_table,
    write_array,
    write_json,
    write_table,
)
from pipeline.core.typed import to_dict
from pipeline.data.transforms import (
    apply_policy,
    build_policies,
    load_transforms,
    reseed,
    save_transforms,
)
from pipeline.reports import report

log = logging.getLogger(__name__)


def render_preview(
    path: Path,
    images: np.ndarray,
    labels: list[str],
    policies: dict,
    label_ids: list[int],
    copies: int,
) -> None:
    """One row per sample: the original, then `copies` augmented versions."""
    plt = report.pyplot()

    rows = len(images)
    fig, axes = plt.subplots(
        rows, copies + 1, figsize=(1.2 * (copies + 1), 1.25 * rows), squeeze=False
    )
    cmap = "gray" if images.shape[-1] == 1 else None
    for r in range(rows):
        shown = [images[r]] + [
            apply_policy(policies, images[r], label_ids[r]) for _ in range(copies)
        ]
        for c, image in enumerate(shown):
            ax = axes[r, c]
            ax.imshow(image.squeeze(-1) if cmap else image, cmap=cmap, vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(str(labels[r])[:12], fontsize=8)
        axes[0, 0].set_title("original", fontsize=8)
        for c in range(1, copies + 1):
            axes[0, c].set_title(f"augmented {c}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run(
    table_path: Path, images_path: Path, classes_path: Path, out_dir: Path, params: Params
) -> dict:
    table = read_table(table_path)
    images = read_array(images_path)
    params = with_image_shape(params, images.shape)
    classes = read_json(classes_path)
    aug = params.augment
    rng = np.random.default_rng(params.base.seed)
    with atomic_dir(out_dir) as tmp:
        save_transforms(tmp / "transforms", build_policies(aug, params.base, classes), classes)
        policies = load_transforms(tmp / "transforms", classes)  # preview what training will load
        reseed(policies, params.base.seed)
        shown = rng.choice(len(table), size=min(aug.preview_rows, len(table)), replace=False)
        shown_rows = table.iloc[np.sort(shown)]
        label_ids = [classes.index(lbl) for lbl in shown_rows["label"]]
        render_preview(
            tmp / "preview.png",
            images[shown_rows["row"].astype(int).to_numpy()],
            list(shown_rows["label"]),
            policies,
            label_ids,
            aug.preview_copies,
        )
        n_offline = write_offline_copies(
            tmp / "offline", table, images, classes, policies, aug.offline_copies
        )
        write_json(tmp / "params.json", {"base": to_dict(params.base), "augment": to_dict(aug)})
    summary = {
        "transforms": [t.__class__.__name__ for t in policies[-1].transforms],
        "class_variants": len(policies) - 1,
        "offline_copies": n_offline,
    }
    log.info(
        "augment: %s; %d offline copies",
        ", ".join(summary["transforms"]) or "no transforms",
        n_offline,
    )
    return summary


def write_offline_copies(
    folder: Path,
    table: pd.DataFrame,
    images: np.ndarray,
    classes: list[str],
    policies: dict,
    copies: int,
) -> int:
    """Materialize `copies` augmented versions of each row; each keeps its source id."""
    folder.mkdir(parents=True, exist_ok=True)
    records, arrays = [], []
    for copy in range(copies):
        for row in table.itertuples():
            label_id = classes.index(row.label)
            arrays.append(apply_policy(policies, images[int(row.row)], label_id))
            records.append({"id": f"{row.id}-aug{copy}", "source_id": row.id, "label": row.label})
    out = pd.DataFrame(records, columns=["id", "source_id", "label"])
    out["row"] = np.arange(len(out))
    shape = (0, *images.shape[1:])
    write_array(folder / "images.npy", np.stack(arrays) if arrays else np.zeros(shape, np.uint8))
    write_table(folder / "table.csv", out)
    return len(out)
