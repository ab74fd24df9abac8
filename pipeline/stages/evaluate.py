"""evaluate stage: error analysis of a round's checkpoint ensemble on the test split.

Reads   <model>/ (the ensemble), <ingest>/manifest.csv, images/, <train report>/warnings.json,
        data/ (the original files, for the report's thumbnails)
Writes  <out>/metrics.json      accuracy, macro-F1, balanced accuracy, top-k, ECE
        <out>/per_class.csv     precision, recall, F1, support per class
        <out>/predictions.csv   one row per test image (actual, predicted: DVC's confusion plot),
                                with the test-label audit: label_issue, label_quality
        <out>/slices.csv        accuracy by image property bins and by quality flag
        <out>/confusion.png, reliability.png
        <out>/report.html       the misclassified-sample report
Params  base, clean (quality thresholds), evaluate (evaluate.nproc > 1: the test images are
        predicted by that many processes under torchrun, pipeline/training/ensemble.py: predict_packed)
The pictures and the page: pipeline/reports/evaluate_page.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from cleanlab.filter import find_label_issues
from cleanlab.rank import get_label_quality_scores
from sklearn.metrics import (
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from pipeline.core.config import Params, with_image_shape
from pipeline.core.errors import PipelineError
from pipeline.core.io import (
    Rows,
    atomic_dir,
    read_array,
    read_json,
    read_table,
    write_json,
    write_table,
    write_text,
)
from pipeline.core.typed import to_dict
from pipeline.data.quality import checks_for, image_issues
from pipeline.reports.evaluate_page import plot_confusion, plot_reliability, render
from pipeline.training.calibration import apply_temperature, expected_calibration_error
from pipeline.training.ensemble import load_ensemble, predict_packed

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# 1) Numbers (pure functions over labels (N,), pred_probs (N, K))


def summary_metrics(labels: np.ndarray, pred_probs: np.ndarray, bins: int) -> dict:
    predicted = pred_probs.argmax(1)
    k = pred_probs.shape[1]
    metrics = {
        "accuracy": float((predicted == labels).mean()),
        "macro_f1": float(
            f1_score(labels, predicted, average="macro", labels=range(k), zero_division=0)
        ),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
        "ece": expected_calibration_error(labels, pred_probs, bins)[0],
        "test_images": len(labels),
    }
    if k > 5:
        for top in (3, 5):
            metrics[f"top{top}_accuracy"] = float(
                top_k_accuracy_score(labels, pred_probs, k=top, labels=range(k))
            )
    return metrics


def per_class_table(labels: np.ndarray, predicted: np.ndarray, classes: list[str]) -> pd.DataFrame:
    p, r, f, s = precision_recall_fscore_support(
        labels, predicted, labels=range(len(classes)), zero_division=0
    )
    return pd.DataFrame({"class": classes, "precision": p, "recall": r, "f1": f, "support": s})


def most_confused(matrix: np.ndarray, classes: list[str], top: int = 10) -> list[dict]:
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    order = np.dstack(np.unravel_index(np.argsort(-off, axis=None), off.shape))[0]
    return [
        {"actual": classes[i], "predicted": classes[j], "count": int(off[i, j])}
        for i, j in order[:top]
        if off[i, j] > 0
    ]


def slice_accuracy(
    correct: np.ndarray, props: pd.DataFrame, flagged: np.ndarray, bins: int
) -> pd.DataFrame:
    """Accuracy per quantile bin of each image property, and for quality-flagged vs not."""
    rows = []
    for name in props:
        values = props[name].to_numpy(dtype=float)
        known = np.isfinite(values)  # a file gone since ingest has no score
        if not known.any():
            continue
        edges = np.unique(np.quantile(values[known], np.linspace(0, 1, bins + 1)))
        if len(edges) < 2:
            continue
        which = np.clip(np.digitize(values, edges[1:-1]), 0, len(edges) - 2)
        for b in range(len(edges) - 1):
            mask = (which == b) & known
            if mask.any():
                label = f"{edges[b]:.3g} to {edges[b + 1]:.3g}"
                rows.append((name, label, int(mask.sum()), float(correct[mask].mean())))
    for label, mask in (("flagged", flagged), ("not flagged", ~flagged)):
        if mask.any():
            rows.append(("quality flag", label, int(mask.sum()), float(correct[mask].mean())))
    return pd.DataFrame(rows, columns=["property", "bin", "count", "accuracy"])


# --------------------------------------------------------------------------------------------
# 2) The stage


def run(
    model_dir: Path,
    ingest_dir: Path,
    train_report: Path | None,
    out_dir: Path,
    params: Params,
    round_name: str,
    data_dir: Path = Path("data"),
) -> dict:
    params = with_image_shape(params, read_array(ingest_dir / "images").shape)
    ensemble = load_ensemble(model_dir)
    classes = read_json(ingest_dir / "classes.json")
    if classes != ensemble.classes:
        raise PipelineError(
            f"{model_dir} was trained on other classes than {ingest_dir}: rerun training"
        )
    manifest = read_table(ingest_dir / "manifest.csv")
    test = manifest[manifest["split"] == "test"].reset_index(drop=True)
    if test.empty:
        raise PipelineError(f"{ingest_dir}/manifest.csv has no test images to evaluate on")
    # a lazy view: prediction and image checks read it a chunk at a time (flat memory)
    rows = test["row"].astype(int).to_numpy()
    test_images = Rows(read_array(ingest_dir / "images"), rows)
    labels = test["label"].map(classes.index).to_numpy(np.int64)

    raw = predict_packed(
        ensemble,
        ingest_dir / "images",
        rows,
        nproc=params.evaluate.nproc,
        beside=out_dir,
        calibrated=False,
        cluster=params.cluster,
    )
    probs = apply_temperature(raw, ensemble.temperature)
    predicted = probs.argmax(1)
    order = np.argsort(-probs, axis=1)
    runner_up = np.where(order[:, 0] == predicted, order[:, 1], order[:, 0])
    metrics = summary_metrics(labels, probs, params.evaluate.calibration_bins)
    metrics["ece_uncalibrated"] = expected_calibration_error(
        labels, raw, params.evaluate.calibration_bins
    )[0]
    metrics["temperature"] = ensemble.temperature
    per_class = per_class_table(labels, predicted, classes)
    matrix = confusion_matrix(labels, predicted, labels=range(len(classes)))
    ece, reliability = expected_calibration_error(labels, probs, params.evaluate.calibration_bins)
    quality = image_issues(
        [Path(data_dir) / p for p in test["path"]], params.clean.quality, params.base.channels
    )
    checks = checks_for(params.base.channels)
    flagged = quality[[f"is_{c}_issue" for c in checks]].to_numpy(bool).any(axis=1)
    scores = quality[[f"{c}_score" for c in ("dark", "light", "blurry", "low_information")]]
    slices = slice_accuracy(predicted == labels, scores, flagged, params.evaluate.slice_bins)
    predictions = pd.DataFrame(
        {
            "id": test["id"],
            "path": test["path"],
            "row": test["row"],
            "actual": test["label"],
            "predicted": [classes[i] for i in predicted],
            "confidence": probs.max(1),
            "runner_up": [classes[i] for i in runner_up],
            "runner_up_prob": probs[np.arange(len(probs)), runner_up],
            "correct": predicted == labels,
        }
    )
    predictions["label_issue"], predictions["label_quality"] = audit_test_labels(labels, probs)
    metrics["test_label_issues"] = int(predictions["label_issue"].sum())
    warnings = (
        read_json(train_report / "warnings.json")
        if train_report and (train_report / "warnings.json").is_file()
        else []
    )
    confused = most_confused(matrix, classes)
    metrics["most_confused"] = confused[:5]
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "metrics.json", metrics)
        write_table(tmp / "per_class.csv", per_class)
        write_table(tmp / "predictions.csv", predictions)
        write_table(tmp / "slices.csv", slices)
        write_table(tmp / "calibration.csv", reliability)
        write_json(
            tmp / "params.json",
            {"base": to_dict(params.base), "evaluate": to_dict(params.evaluate)},
        )
        plot_confusion(tmp / "confusion.png", matrix, classes)
        plot_reliability(tmp / "reliability.png", reliability, ece)
        html = render(
            round_name,
            metrics,
            per_class,
            matrix,
            classes,
            confused,
            predictions,
            slices,
            warnings,
            test_images,
            tmp,
            params.evaluate.gallery_size,
            data_dir,
        )
        write_text(tmp / "report.html", html)
    log.info(
        "evaluate %s: test accuracy %.3f, macro-F1 %.3f, %d misclassified (report: %s)",
        round_name,
        metrics["accuracy"],
        metrics["macro_f1"],
        int((~predictions["correct"]).sum()),
        out_dir / "report.html",
    )
    return metrics


def audit_test_labels(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(likely mislabeled (N,) bool, label quality (N,)) for the test split: cleanlab on the
    round's predictions, which are out-of-sample since the test split is never trained on.
    Only reported: the test split is never changed."""
    quality = get_label_quality_scores(labels, probs)
    try:
        issues = find_label_issues(labels, probs, filter_by="prune_by_noise_rate")
    except ValueError as exc:  # e.g. a class absent from the test split's predictions
        log.warning("evaluate: test-label audit skipped: %s", exc)
        issues = np.zeros(len(labels), bool)
    return issues, quality


def show_errors(predictions_path: Path, top: int) -> pd.DataFrame:
    """The most confident mistakes of a round, for the terminal."""
    predictions = read_table(predictions_path)
    wrong = predictions[predictions["correct"] != "True"].copy()
    wrong["confidence"] = wrong["confidence"].astype(float)
    return wrong.sort_values("confidence", ascending=False).head(top)[
        ["path", "actual", "predicted", "confidence", "runner_up"]
    ]
