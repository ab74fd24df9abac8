"""Image-quality checks on packed images: brightness, contrast, sharpness, entropy and the
robust-z flags (dark, light, blurry, low information, odd size). Shared by clean (training
rows) and evaluate (accuracy by slice of the test split)."""

from __future__ import annotations

import numpy as np
import pandas as pd

QUALITY_CHECKS = ("dark", "light", "blurry", "low_information", "odd_size")


def image_properties(images: np.ndarray, chunk: int = 4096) -> pd.DataFrame:
    """Brightness, contrast, sharpness (Laplacian variance) and entropy of each image, a chunk
    of images at a time (the float copies of a whole set would not fit in memory)."""
    parts = [
        _image_properties(np.asarray(images[start : start + chunk]))
        for start in range(0, len(images), chunk)
    ]
    return pd.concat(parts, ignore_index=True) if parts else _image_properties(images[:0])


def _image_properties(images: np.ndarray) -> pd.DataFrame:
    gray = images.astype(np.float32).mean(axis=-1)
    lap = (
        -4 * gray[:, 1:-1, 1:-1]
        + gray[:, :-2, 1:-1]
        + gray[:, 2:, 1:-1]
        + gray[:, 1:-1, :-2]
        + gray[:, 1:-1, 2:]
    )
    hist = np.stack([np.bincount(g.astype(np.uint8).ravel() // 16, minlength=16) for g in gray])
    p = hist / hist.sum(1, keepdims=True)
    entropy = -(p * np.log2(np.where(p > 0, p, 1))).sum(1)
    return pd.DataFrame(
        {
            "brightness": gray.mean((1, 2)) / 255.0,
            "contrast": gray.std((1, 2)) / 255.0,
            "sharpness": np.log1p(lap.var((1, 2))),
            "entropy": entropy,
        }
    )


def quality_scores(props: pd.DataFrame, sizes: pd.DataFrame, z: float) -> pd.DataFrame:
    """Datalab-style scores per check in (0, 1], lower = more severe: z / (z + excess), where
    excess is the robust z-score in the check's bad direction. A score under 0.5 means
    |robust z| > z for this set: that is the flag."""
    rz = {name: _robust_z(props[name].to_numpy()) for name in props}
    area = _robust_z(np.log(sizes["width"].astype(float) * sizes["height"].astype(float)))
    aspect = _robust_z(np.log(sizes["width"].astype(float) / sizes["height"].astype(float)))
    excess = {
        "dark": -rz["brightness"],
        "light": rz["brightness"],
        "blurry": -rz["sharpness"],
        "low_information": -rz["entropy"],
        "odd_size": np.maximum(np.abs(area), np.abs(aspect)),
    }
    return pd.DataFrame({k: z / (z + np.maximum(np.asarray(v), 0.0)) for k, v in excess.items()})


def quality_flags(props: pd.DataFrame, sizes: pd.DataFrame, z: float) -> pd.DataFrame:
    """Image-quality flags where a property is a robust outlier (|robust z| > z) for this set."""
    return quality_scores(props, sizes, z) < 0.5


def _robust_z(values: np.ndarray) -> np.ndarray:
    median = np.median(values)
    mad = np.median(np.abs(values - median)) * 1.4826
    spread = mad if mad > 1e-9 else (values.std() or 1.0)
    return (values - median) / spread
