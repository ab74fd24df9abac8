"""The human training rows checked by a model that never saw them (train stage, rounds r001 on).

The clean stage finds wrong labels with K-fold models trained on the other folds of the human
rows: a few hundred images, some of them wrong. From round r001 on there is a better judge. The
round's pseudo-label set (the previous round's model's confident predictions on the pools) is
often larger than the human set and nearly all right, and a model trained on it alone never saw a
human label, so its predictions on the human rows are out of sample. Where it leaves a row's label
a calibrated probability of at most `train.crosscheck` and gives another class at least half, the
round trains on that class.

Why the label's own probability, not the new class's: a human label is usually right, so only a
label the checker finds next to impossible is overturned. (A noisy-channel reading: with 5% of the
labels wrong and ten classes, the odds favour the checker's class c only where it leaves the label
under about 0.006 of c's probability.) On the benchmark's training rows (bench/RESULTS.md, stop
31), a 0.7 threshold on the new class was right on every digit relabel but on 9 of 24 colour-photo
ones; at 0.01 on the label, 86 of 95 relabels were right and 3 made a right label wrong. Off by
default all the same: the last round's validation accuracy fell on colour photos and the demo.

Never changed: rows a person decided (data/overrides.csv), and rows whose class or whose new class
has fewer than MIN_PER_CLASS pseudo-labels (the checker barely knows such a class). The checker
is trained as the round's model is (`train`, early-stopped on validation, top-k checkpoints), and
its averaged probabilities are temperature-scaled on the validation rows before the threshold.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.calibration import apply_temperature, fit_temperature
from pipeline.config import BaseConfig, TrainConfig
from pipeline.ensemble import load_checkpoint, predict_proba
from pipeline.feed import Samples, current_shard
from pipeline.loop import fit, from_lead
from pipeline.model import build_model

log = logging.getLogger(__name__)

MIN_PER_CLASS = 10  # pseudo-labels a class needs before its human rows are checked, or joined
MAJORITY = 0.5  # the checker's class must hold at least this calibrated probability
COLUMNS = ["id", "path", "given_label", "cleaned_label", "label", "confidence", "label_probability"]


def crosscheck(
    human: pd.DataFrame,
    human_images: np.ndarray,
    pseudo: Samples,
    val: Samples,
    classes: list[str],
    cfg: TrainConfig,
    base: BaseConfig,
    *,
    device: torch.device,
    augmentation,
    state_dir: Path,
    fingerprint: str,
) -> tuple[pd.DataFrame, dict]:
    """The rows of `human` (the clean stage's train.csv) the checker relabels, as COLUMNS
    (`label` the checker's class), and a summary for the train report."""
    counts = np.bincount(pseudo.labels, minlength=len(classes))
    known = counts >= MIN_PER_CLASS
    summary = {"threshold": cfg.crosscheck, "pseudo": len(pseudo), "relabeled": 0}
    if known.sum() < 2:
        summary["skipped"] = f"fewer than two classes with {MIN_PER_CLASS} pseudo-labels"
        log.info("crosscheck: skipped, %s", summary["skipped"])
        return pd.DataFrame(columns=COLUMNS), summary
    torch.manual_seed(base.seed)
    model = build_model(cfg.model, base.channels, len(classes))
    result = fit(
        model,
        pseudo,
        val,
        cfg,
        seed=base.seed,
        device=device,
        augmentation=augmentation,
        state_dir=state_dir,
        fingerprint=fingerprint,
        desc="crosscheck",
    )
    shard = current_shard()
    if not from_lead(bool(result.kept), shard):  # the first process keeps the checkpoints
        summary["skipped"] = "no checkpoint kept: the validation split is empty"
        return pd.DataFrame(columns=COLUMNS), summary
    relabeled = None
    if shard.rank == 0:
        members = []
        for entry in result.kept:
            member = build_model(cfg.model, base.channels, len(classes))
            member.load_state_dict(load_checkpoint(state_dir / entry["file"])["state_dict"])
            members.append(member.to(device))
        raw_val = predict_proba(members, val.images, device)
        temperature = fit_temperature(val.labels, raw_val)
        probs = apply_temperature(predict_proba(members, human_images, device), temperature)
        relabeled = decide(human, probs, classes, known, cfg.crosscheck)
        summary |= {
            "val_acc": float((raw_val.argmax(1) == val.labels).mean()),
            "temperature": temperature,
            "agrees": float((probs.argmax(1) == human["label"].map(classes.index)).mean()),
            "relabeled": len(relabeled),
        }
    relabeled, summary = from_lead((relabeled, summary), shard)
    if shard.rank > 0:
        return relabeled, summary  # the first process reports
    log.info(
        "crosscheck: a model of the %d pseudo-labels alone (validation accuracy %.3f) relabels "
        "%d of %d human training rows",
        len(pseudo),
        summary["val_acc"],
        summary["relabeled"],
        len(human),
    )
    return relabeled, summary


def decide(
    human: pd.DataFrame, probs: np.ndarray, classes: list[str], known: np.ndarray, threshold: float
) -> pd.DataFrame:
    """COLUMNS for the rows whose label the checker gives at most `threshold` (and another class
    at least MAJORITY); `confidence` is the new class's probability."""
    current = human["label"].map(classes.index).to_numpy()
    predicted, confidence = probs.argmax(1), probs.max(1)
    by_person = human.get("reason", pd.Series("", index=human.index)).str.startswith("override")
    change = (
        (predicted != current)
        & (probs[np.arange(len(probs)), current] <= threshold)
        & (confidence >= MAJORITY)
        & known[current]
        & known[predicted]
        & ~by_person.to_numpy()
    )
    rows = human[change]
    return pd.DataFrame(
        {
            "id": rows["id"],
            "path": rows["path"],
            "given_label": rows.get("given_label", rows["label"]),
            "cleaned_label": rows["label"],
            "label": np.asarray(classes)[predicted[change]],
            "confidence": confidence[change].round(4),
            "label_probability": probs[np.arange(len(probs)), current][change].round(6),
        }
    ).reset_index(drop=True)
