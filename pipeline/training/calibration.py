"""Calibration of predicted probabilities: temperature scaling and the expected calibration error.

A round's checkpoint ensemble is over-confident after a long recipe on a small set; a single
temperature fitted on the validation split (Guo et al. 2017) makes its confidence mean what
it says before any pseudo-label threshold reads it. Shared by train, evaluate and pseudolabel.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

# Sharpening below T = 0.5 is never trusted: on a small validation split with no mistakes the
# likelihood keeps improving as T -> 0, which would make every prediction look certain.
TEMPERATURE_RANGE = (0.5, 20.0)


def apply_temperature(pred_probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(pred_probs) / T), row-wise: (N, K) -> (N, K). T = 1 changes nothing."""
    if temperature == 1.0:
        return pred_probs
    logits = np.log(np.clip(pred_probs, 1e-12, None)) / temperature
    logits -= logits.max(1, keepdims=True)
    scaled = np.exp(logits)
    return (scaled / scaled.sum(1, keepdims=True)).astype(pred_probs.dtype, copy=False)


def nll(labels: np.ndarray, pred_probs: np.ndarray) -> float:
    return float(-np.log(np.clip(pred_probs[np.arange(len(labels)), labels], 1e-12, None)).mean())


def fit_temperature(labels: np.ndarray, pred_probs: np.ndarray) -> float:
    """The temperature that minimizes the negative log-likelihood of `labels` (N,) under
    `pred_probs` (N, K): a golden-section search over log T (the NLL is unimodal in it)."""
    if len(labels) == 0 or (pred_probs.argmax(1) == labels).all():
        return 1.0  # nothing to learn a temperature from: no mistake to be humble about
    lo, hi = np.log(TEMPERATURE_RANGE[0]), np.log(TEMPERATURE_RANGE[1])
    ratio = (np.sqrt(5) - 1) / 2

    def loss(log_t: float) -> float:
        return nll(labels, apply_temperature(pred_probs, float(np.exp(log_t))))

    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    best = float(np.exp((lo + hi) / 2))
    # Never worse than leaving the probabilities alone.
    return best if loss(np.log(best)) <= nll(labels, pred_probs) else 1.0


def expected_calibration_error(
    labels: np.ndarray, pred_probs: np.ndarray, bins: int = 10
) -> tuple[float, pd.DataFrame]:
    """ECE over equal-width confidence bins, and the per-bin table for the reliability diagram."""
    confidence = pred_probs.max(1)
    correct = pred_probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            gap = abs(correct[mask].mean() - confidence[mask].mean())
            ece += mask.mean() * gap
            rows.append(
                (
                    edges[b],
                    edges[b + 1],
                    int(mask.sum()),
                    confidence[mask].mean(),
                    correct[mask].mean(),
                )
            )
    table = pd.DataFrame(rows, columns=["low", "high", "count", "confidence", "accuracy"])
    return float(ece), table
