"""The clean stage's page, <clean>/report.html ("Label issues"): the summary figures (label
issues, estimated noise, label health, out-of-sample accuracy, the K-fold budget kept, precision
and recall vs truth), issues by type, estimated noise per class, the K-fold budgets tried, the
most overlapping classes, and a gallery of flagged samples, worst label quality first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.data.images import thumbnail
from pipeline.reports import report


def _chosen(metrics: dict) -> dict | None:
    return next((b for b in metrics.get("kfold_budgets", []) if b["chosen"]), None)


def _name(budget: dict) -> str:
    return budget.get("name", f"{budget['min_steps']} steps")


def render(
    decided: pd.DataFrame, images: np.ndarray, metrics: dict, limit: int, data_dir: Path
) -> str:
    flagged = decided[decided["issue_types"] != ""].sort_values("label_quality")
    truth = metrics.get("truth")
    summary = [
        ("training images", metrics["train_rows"]),
        ("label issues", metrics["label_issues"]),
        ("estimated noise", f"{metrics['estimated_noise_rate']:.1%}"),
        ("label health", f"{metrics['label_health_score']:.2f}"),
        ("out-of-sample accuracy", f"{metrics['out_of_sample_accuracy']:.1%}"),
        ("K-fold kept", _name(chosen) if (chosen := _chosen(metrics)) else "-"),
    ]
    if truth:
        summary += [
            ("precision vs truth", f"{truth['precision']:.2f}"),
            ("recall vs truth", f"{truth['recall']:.2f}"),
        ]
    tiles = []
    for row in flagged.head(limit).itertuples():
        verdict = ""
        if row.true_label:
            ok = row.true_label != row.given_label
            verdict = f"<div class='{'good' if ok == row.label_issue else 'bad'}'>truth: {report.esc(row.true_label)}</div>"
        tiles.append(
            "<div class='tile'>"
            + report.pictures(images[int(row.row)], thumbnail(data_dir / row.path))
            + f"<div>given <b>{report.esc(row.given_label)}</b> &rarr; suggested <b>{report.esc(row.suggested_label)}</b> "
            f"({row.suggested_prob:.2f})</div>"
            f"<div>quality {row.label_quality:.3f} &middot; {report.esc(row.issue_types.replace(';', ', '))}</div>"
            f"<div>decision: <b>{report.esc(row.decision)}</b></div>{verdict}"
            f"<div class='path'>{report.esc(row.path)}</div></div>"
        )
    by_type = report.table(["issue type", "count"], sorted(metrics["issues_by_type"].items()))
    budgets = report.table(
        ["fold models", "agreement with the given labels", "log loss", "kept"],
        [
            (
                _name(b),
                f"{b['accuracy']:.1%}",
                f"{b['log_loss']:.3f}",
                "yes" if b["chosen"] else "",
            )
            for b in metrics.get("kfold_budgets", [])
        ],
    )
    per_class = report.table(
        ["class", "estimated noise"], [(k, v) for k, v in metrics["noise_per_class"].items()]
    )
    pairs = report.table(
        ["classes", "joint probability"],
        [(" / ".join(p["classes"]), p["joint"]) for p in metrics["overlapping_classes"]],
    )
    body = (
        "<h1>Label issues and sample quality</h1>"
        "<p class='muted'>Out-of-sample probabilities from K-fold training; cleanlab finds the labels "
        "the models disagree with. Worst label quality first.</p>"
        + report.cards(summary)
        + f"<h2>Issues by type</h2>{by_type}<h2>Estimated noise per class</h2>{per_class}"
        + "<h2>K-fold budgets tried</h2><p class='muted'>The run whose held-out predictions "
        "agree best with the given labels is kept (clean.min_steps; with a pretrained "
        "backbone, a linear model on its frozen embeddings too).</p>"
        + budgets
        + f"<h2>Most overlapping classes</h2>{pairs}"
        + f"<h2>Flagged samples ({len(flagged)}, showing {min(limit, len(flagged))})</h2>"
        + f"<div class='gallery'>{''.join(tiles)}</div>"
    )
    return report.page("Label issues", body)
