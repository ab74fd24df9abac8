"""augment stage: the albumentations policy from params, saved so training loads exactly it.

Reads   the cleaned training table and the packed images
Writes  <out>/transforms/default.json     A.save of the full policy
        <out>/transforms/class_NNN.json   the policy minus a class's `augment.exclude`
        <out>/transforms/variants.json    class name -> file
        <out>/preview.png                 rows of originals beside augmented copies
        <out>/offline/{images.npy,table.csv}  augmented copies (augment.offline_copies > 0)
Params  base, augment
"""

from __future__ import annotations

import logging
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pandas as pd

from pipeline import report
from pipeline.config import AugmentConfig, BaseConfig, Params, to_dict, transform_names
from pipeline.errors import PipelineError
from pipeline.io import (
    atomic_dir,
    read_array,
    read_json,
    read_table,
    write_array,
    write_json,
    write_table,
)

log = logging.getLogger(__name__)


def build_transforms(
    aug: AugmentConfig, base: BaseConfig, *, exclude: tuple[str, ...] = ()
) -> A.Compose:
    """The training-time policy as one A.Compose; transforms named in `exclude` are left out.

    Output images keep the input's shape and dtype (uint8, base.image_size, channels).
    """
    size = base.image_size
    border = {"border_mode": cv2.BORDER_CONSTANT, "fill": 0}
    makers = {
        "crop": lambda c: A.RandomResizedCrop(
            size=(size, size), scale=c.scale, ratio=c.ratio, p=c.p
        ),
        "rotate": lambda c: A.Rotate(limit=c.limit, p=c.p, **border),
        "shear": lambda c: A.Affine(shear=(-c.limit, c.limit), p=c.p, **border),
        "hflip": lambda c: A.HorizontalFlip(p=c.p),
        "vflip": lambda c: A.VerticalFlip(p=c.p),
        "hsv": lambda c: A.HueSaturationValue(
            hue_shift_limit=c.hue, sat_shift_limit=c.saturation, val_shift_limit=c.value, p=c.p
        ),
        "brightness_contrast": lambda c: A.RandomBrightnessContrast(
            brightness_limit=c.brightness, contrast_limit=c.contrast, p=c.p
        ),
        "noise": lambda c: A.GaussNoise(std_range=c.std, p=c.p),
        "blur": lambda c: A.Blur(blur_limit=(3, c.limit | 1), p=c.p),
    }
    transforms = []
    for name in transform_names():
        cfg = getattr(aug, name)
        if cfg.p > 0 and name not in exclude:
            transforms.append(makers[name](cfg))
    return A.Compose(transforms, seed=base.seed)


def build_policies(
    aug: AugmentConfig, base: BaseConfig, classes: list[str]
) -> dict[int, A.Compose]:
    """Class index -> policy; -1 is the default, other keys carry a class's exclusions."""
    unknown = sorted(set(aug.exclude) - set(classes))
    if unknown:
        raise PipelineError(
            f"augment.exclude names class {unknown[0]!r}, which is not in the data; "
            f"classes: {', '.join(classes)}"
        )
    policies = {-1: build_transforms(aug, base)}
    for class_name, excluded in aug.exclude.items():
        policies[classes.index(class_name)] = build_transforms(aug, base, exclude=excluded)
    return policies


def save_transforms(folder: Path, policies: dict[int, A.Compose], classes: list[str]) -> None:
    """default.json, one class_NNN.json per class with exclusions, and variants.json."""
    folder.mkdir(parents=True, exist_ok=True)
    variants = {}
    for index, policy in policies.items():
        file = "default.json" if index < 0 else f"class_{index:03d}.json"
        A.save(policy, str(folder / file), data_format="json")
        if index >= 0:
            variants[classes[index]] = file
    write_json(folder / "variants.json", variants)


def load_transforms(folder: Path, classes: list[str]) -> dict[int, A.BaseCompose]:
    """Class index -> policy, exactly as the augment stage saved it (-1: the default)."""
    folder = Path(folder)
    if not (folder / "default.json").is_file():
        raise PipelineError(f"missing input {folder / 'default.json'}: run the augment stage first")
    policies = {-1: A.load(str(folder / "default.json"), data_format="json")}
    for class_name, file in read_json(folder / "variants.json").items():
        if class_name in classes:
            policies[classes.index(class_name)] = A.load(str(folder / file), data_format="json")
    return policies


def apply_policy(policies: dict[int, A.BaseCompose], image: np.ndarray, label: int) -> np.ndarray:
    out = policies.get(label, policies[-1])(image=image)["image"]
    return out if out.ndim == 3 else out[:, :, None]


def reseed(policies: dict[int, A.BaseCompose], seed: int) -> None:
    for offset, policy in enumerate(policies.values()):
        policy.set_random_seed((seed + offset) % 2**32)


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
