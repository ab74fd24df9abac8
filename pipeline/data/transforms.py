"""The albumentations policy built from `augment` params: `build_transforms(params, train)`,
one variant per class with exclusions, saved with `A.save` and loaded back exactly.

Shared by the augment stage (builds and saves it), training (loads it) and clean's K-fold.
"""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import cv2
import numpy as np

from pipeline.core.config import AugmentConfig, BaseConfig, transform_names
from pipeline.core.errors import PipelineError
from pipeline.core.io import read_json, write_json


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
