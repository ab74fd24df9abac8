"""Which pool images join the pseudo-label set, and which are worth a human label: pure
functions over an ensemble's pred_probs (N, K).

curriculum_share       the share of each predicted class the curriculum admits in a round
class_thresholds       per-class confidence bars (fixed, flexmatch, curriculum)
select                 the rows accepted, with agreement, per-class caps and class balance
read_pseudo_overrides  data/pseudo_overrides.csv: a person's reject or class per pool image
labeling_queue         the rows most worth a human label: uncertain first, then spread out
provenance             the joined / left columns: which rows join and leave the set this round
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.config import PseudolabelConfig
from pipeline.core.errors import PipelineError
from pipeline.data.inputs import read_pairs


def curriculum_share(cfg: PseudolabelConfig, round_index: int) -> float:
    """Share of each predicted class the curriculum admits in round `round_index` (0-based)."""
    return min(cfg.share_max, cfg.share_start + cfg.share_step * round_index)


def class_thresholds(
    pred_probs: np.ndarray, cfg: PseudolabelConfig, round_index: int = 0
) -> np.ndarray:
    """Per-class confidence thresholds (K,).

    fixed: tau for every class. flexmatch: tau scaled by how well each class is learned,
    beta_c = sigma_c / max(max_c sigma_c, unused) with sigma_c the confident predictions of
    class c, mapped through x / (2 - x) so poorly learned classes get a lower bar.
    curriculum: the confidence of the last of the top share of each predicted class, and never
    below min_confidence (a class nobody is predicted as gets a bar above 1).
    """
    k = pred_probs.shape[1]
    predicted, confidence = pred_probs.argmax(1), pred_probs.max(1)
    if cfg.policy == "curriculum":
        share = curriculum_share(cfg, round_index)
        bars = np.full(k, np.inf)
        for c in range(k):
            ranked = np.sort(confidence[predicted == c])[::-1]
            take = math.floor(share * len(ranked))
            if take:
                bars[c] = max(ranked[take - 1], cfg.min_confidence)
        return bars
    tau = cfg.threshold
    if cfg.policy == "fixed":
        return np.full(k, tau)
    confident = confidence >= tau
    sigma = np.bincount(predicted[confident], minlength=k).astype(float)
    unused = float((~confident).sum())
    beta = sigma / max(sigma.max(), unused, 1.0)
    return tau * beta / (2.0 - beta)


def select(
    pred_probs: np.ndarray,
    member_probs: np.ndarray,
    cfg: PseudolabelConfig,
    labeled_share: np.ndarray,
    round_index: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which rows to accept: (accepted (N,) bool, predicted (N,), threshold used (N,))."""
    predicted = pred_probs.argmax(1)
    confidence = pred_probs.max(1)
    thresholds = class_thresholds(pred_probs, cfg, round_index)[predicted]
    accepted = confidence >= thresholds
    if cfg.agreement and len(member_probs):
        accepted &= (member_probs.argmax(2) == predicted[None, :]).all(0)
    k = pred_probs.shape[1]
    caps = np.full(k, np.iinfo(np.int64).max)
    if cfg.per_class_cap > 0:
        caps[:] = cfg.per_class_cap
    if cfg.balance:
        counts = np.bincount(predicted[accepted], minlength=k)
        # The largest total whose class split follows the labeled distribution.
        share = np.maximum(labeled_share, 1e-12)
        total = np.min(np.where(labeled_share > 0, counts / share, np.inf))
        caps = np.minimum(caps, np.floor(total * labeled_share).astype(np.int64))
    for c in range(k):
        members = np.flatnonzero(accepted & (predicted == c))
        if len(members) > caps[c]:
            ranked = members[np.argsort(-confidence[members], kind="stable")]
            accepted[ranked[caps[c] :]] = False
    return accepted, predicted, thresholds


def read_pseudo_overrides(path: Path, classes: list[str]) -> dict[str, str]:
    """data/pseudo_overrides.csv (path,label) as {path: "reject" or a class}; absent: {}."""
    decisions = read_pairs(path, "label")
    for rel, label in decisions.items():
        if label != "reject" and label not in classes:
            raise PipelineError(
                f"{path}: {rel}: {label!r} is not reject or a class ({', '.join(classes)})"
            )
    return decisions


def labeling_queue(
    pred_probs: np.ndarray, embeddings: np.ndarray, accepted: np.ndarray, size: int
) -> np.ndarray:
    """Rows most worth a human label, in order: uncertain first, then spread out.

    Among the rows not accepted, the 4 * size with the smallest margin between the calibrated
    top two classes are candidates; greedy k-center in embedding space (cosine) then picks,
    from the most uncertain one on, each next row farthest from those already picked, so the
    queue does not spend a human's time on many near-identical images.
    """
    candidates = np.flatnonzero(~accepted)
    if size <= 0 or not len(candidates):
        return np.zeros(0, np.int64)
    top2 = np.sort(pred_probs[candidates], axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    shortlist = candidates[np.argsort(margin, kind="stable")[: 4 * size]]
    feats = embeddings[shortlist].astype(np.float64)
    feats /= np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    picked = [0]
    distance = 1.0 - feats @ feats[0]
    while len(picked) < min(size, len(shortlist)):
        distance[picked] = -np.inf
        nxt = int(np.argmax(distance))
        picked.append(nxt)
        distance = np.minimum(distance, 1.0 - feats @ feats[nxt])
    return shortlist[picked]


def provenance(
    previous: pd.DataFrame, accepted: np.ndarray, labels: list[str], round_name: str
) -> pd.DataFrame:
    """joined / left columns for this round's decision over rows that start with `previous`'s
    (N_prev rows, then new ones). A row whose label changes leaves and joins again."""
    n = len(accepted)
    was = np.zeros(n, bool)
    was[: len(previous)] = previous["accepted"].to_numpy() == "True"
    old_label = np.array([""] * n, dtype=object)
    old_label[: len(previous)] = previous["label"].to_numpy()
    joined = np.array([""] * n, dtype=object)
    left = np.array([""] * n, dtype=object)
    joined[: len(previous)] = previous["joined"].to_numpy()
    left[: len(previous)] = previous["left"].to_numpy()
    labels = np.asarray(labels, dtype=object)
    stays = was & accepted & (old_label == labels)
    leaves = was & ~stays
    joins = accepted & ~stays
    left[leaves] = round_name
    joined[joins] = round_name
    return pd.DataFrame(
        {
            "joined": joined,
            "left": left,
            "previous_label": old_label,
            "stayed": stays,
            "joins": joins,
            "leaves": leaves,
        }
    )
