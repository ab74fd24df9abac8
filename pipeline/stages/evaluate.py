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

from pipeline.core.config import Params, to_dict, with_image_shape
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
from pipeline.data.images import thumbnail
from pipeline.data.quality import checks_for, image_issues
from pipeline.reports import report
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
# 2) Pictures


def plot_confusion(path: Path, matrix: np.ndarray, classes: list[str]) -> None:
    plt = report.pyplot()

    size = max(4.0, 0.5 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    names = [c[:12] for c in classes]
    ax.set_xticks(range(len(classes)), names, rotation=90)
    ax.set_yticks(range(len(classes)), names)
    ax.set(xlabel="predicted", ylabel="actual", title="confusion matrix (test)")
    for (i, j), v in np.ndenumerate(matrix):
        if v:
            ax.text(
                j,
                i,
                str(v),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if v > matrix.max() / 2 else "black",
            )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_reliability(path: Path, table: pd.DataFrame, ece: float) -> None:
    plt = report.pyplot()

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    centers = (table["low"] + table["high"]) / 2
    ax.bar(
        centers,
        table["accuracy"],
        width=table["high"] - table["low"],
        edgecolor="k",
        alpha=0.7,
        label="accuracy",
    )
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set(
        xlabel="confidence",
        ylabel="accuracy",
        title=f"reliability (ECE {ece:.3f})",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# 3) The stage


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


def _tile(row, image: np.ndarray, original: np.ndarray | None) -> str:
    return (
        "<div class='tile'>"
        + report.pictures(image, original)
        + f"<div>true <b>{report.esc(row.actual)}</b> &middot; predicted <b class='bad'>{report.esc(row.predicted)}</b></div>"
        f"<div>confidence {row.confidence:.2f} &middot; runner-up {report.esc(row.runner_up)} ({row.runner_up_prob:.2f})</div>"
        f"<div class='path'>{report.esc(row.path)}</div></div>"
    )


def render(
    round_name,
    metrics,
    per_class,
    matrix,
    classes,
    confused,
    predictions,
    slices,
    warnings,
    images,
    folder,
    limit,
    data_dir,
) -> str:
    wrong = predictions[~predictions["correct"].astype(bool)].sort_values(
        "confidence", ascending=False
    )
    audit = predictions[predictions["label_issue"].astype(bool)].sort_values("label_quality")
    audit = audit.head(limit)
    # the files as people know them, for the galleries (most confident mistakes, audit)
    shown = pd.concat([wrong.head(limit), audit])
    originals = {r.Index: thumbnail(data_dir / r.path) for r in shown.itertuples()}
    tiles = {
        r.Index: _tile(r, images[r.Index], originals.get(r.Index))
        for r in pd.concat([wrong, audit]).itertuples()
    }
    cells = []
    index = {c: i for i, c in enumerate(classes)}
    for (actual, predicted), group in wrong.groupby(["actual", "predicted"], sort=False):
        anchor = f"cell-{index[actual]}-{index[predicted]}"
        cells.append(
            f"<h3 id='{anchor}'>true {report.esc(actual)} &rarr; predicted {report.esc(predicted)} ({len(group)})</h3>"
            f"<div class='gallery'>{''.join(tiles[i] for i in group.index)}</div>"
        )
    # The confusion matrix as a table whose off-diagonal cells link to their samples.
    head = "".join(f"<th>{report.esc(c)}</th>" for c in classes)
    body = []
    for i, actual in enumerate(classes):
        row = []
        for j, _ in enumerate(classes):
            v = int(matrix[i, j])
            cell = f"<a href='#cell-{i}-{j}'>{v}</a>" if v and i != j else str(v)
            style = " style='background:#e8f1fb'" if i == j else ""
            row.append(f"<td class='num'{style}>{cell}</td>")
        body.append(f"<tr><th>{report.esc(actual)}</th>{''.join(row)}</tr>")
    matrix_html = (
        "<table><thead><tr><th>actual \\ predicted</th>"
        + head
        + "</tr></thead><tbody>"
        + "".join(body)
        + "</tbody></table>"
    )
    summary = [
        ("test accuracy", f"{metrics['accuracy']:.1%}"),
        ("macro-F1", f"{metrics['macro_f1']:.3f}"),
        ("balanced accuracy", f"{metrics['balanced_accuracy']:.1%}"),
        ("ECE (calibrated on validation)", f"{metrics['ece']:.3f}"),
        ("ECE before calibration", f"{metrics['ece_uncalibrated']:.3f}"),
        ("test images", metrics["test_images"]),
        ("misclassified", len(wrong)),
    ]
    summary += [
        (k.replace("_", " "), f"{v:.1%}") for k, v in metrics.items() if k.startswith("top")
    ]
    shown = wrong.head(limit)
    body_html = (
        f"<h1>Misclassified samples &middot; round {report.esc(round_name)}</h1>"
        "<p class='muted'>Test split, predicted by the round's checkpoint ensemble. Start with the "
        "most confident mistakes: they are often wrong labels or a missing kind of image.</p>"
        + report.cards(summary)
        + (f"<h2>Warnings from training</h2>{report.warnings_html(warnings)}" if warnings else "")
        + f"<h2>Most confident mistakes ({len(shown)} of {len(wrong)})</h2>"
        + f"<div class='gallery' id='gallery'>{''.join(tiles[i] for i in shown.index)}</div>"
        + f"<h2>Test labels that look wrong ({metrics['test_label_issues']})</h2>"
        "<p class='muted'>cleanlab on this round's test predictions (out-of-sample: the test split "
        "is never trained on), least likely label first. Only an audit: the test split is never "
        "changed; if a label is wrong, fix the file's folder under data/test/ yourself. Column "
        "<code>label_issue</code> of predictions.csv lists them all.</p>"
        + f"<div class='gallery' id='audit'>{''.join(tiles[i] for i in audit.index)}</div>"
        + "<h2>Per class</h2>"
        + report.table(
            ["class", "precision", "recall", "F1", "support"], per_class.itertuples(index=False)
        )
        + "<h2>Confusion matrix</h2><p class='muted'>Click a count to see its samples.</p>"
        + matrix_html
        + f"<p><img class='plot' alt='confusion matrix' src='{report.file_uri(folder / 'confusion.png')}'></p>"
        + "<h2>Most confused pairs</h2>"
        + report.table(
            ["actual", "predicted", "count"],
            [(c["actual"], c["predicted"], c["count"]) for c in confused],
        )
        + "<h2>Calibration</h2>"
        + f"<p><img class='plot' alt='reliability diagram' src='{report.file_uri(folder / 'reliability.png')}'></p>"
        + "<h2>Accuracy by slice</h2><p class='muted'>Which kinds of image fail: quantile bins of each property.</p>"
        + report.table(["property", "bin", "count", "accuracy"], slices.itertuples(index=False))
        + "<h2>Mistakes by confusion cell</h2>"
        + "".join(cells)
    )
    return report.page(f"Misclassified samples - {round_name}", body_html)


def show_errors(predictions_path: Path, top: int) -> pd.DataFrame:
    """The most confident mistakes of a round, for the terminal."""
    predictions = read_table(predictions_path)
    wrong = predictions[predictions["correct"] != "True"].copy()
    wrong["confidence"] = wrong["confidence"].astype(float)
    return wrong.sort_values("confidence", ascending=False).head(top)[
        ["path", "actual", "predicted", "confidence", "runner_up"]
    ]
