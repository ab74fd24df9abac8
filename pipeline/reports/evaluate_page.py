"""The evaluate stage's pictures and page: the confusion matrix and reliability diagram, and the
misclassified-sample report (report.html) with its galleries, linked confusion table and slices.
The numbers they show are computed in pipeline/stages/evaluate.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.data.images import thumbnail
from pipeline.reports import report

# --------------------------------------------------------------------------------------------
# 1) Pictures


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
# 2) The page


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
