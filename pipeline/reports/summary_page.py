"""The summarize stage's picture and page: the rounds plot (rounds.png) and the index page
(index.html) linking every round's reports. The table they show: pipeline/stages/summarize.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.reports import report


def plot_rounds(path: Path, table: pd.DataFrame) -> None:
    plt = report.pyplot()

    fig, ax1 = plt.subplots(figsize=(7, 4))
    x = np.arange(len(table))
    ax1.plot(x, table["test_accuracy"], "o-", label="test accuracy")
    ax1.plot(x, table["macro_f1"], "s--", label="test macro-F1")
    if table["pseudo_accuracy"].notna().any():
        ax1.plot(x, table["pseudo_accuracy"], "^:", label="pseudo-label accuracy")
    ax1.set(xticks=x, xticklabels=table["round"], xlabel="round", ylabel="score")
    ax2 = ax1.twinx()
    ax2.bar(
        x - 0.15, table["train_human"], width=0.3, alpha=0.25, color="C2", label="human-labeled"
    )
    ax2.bar(
        x + 0.15, table["train_pseudo"], width=0.3, alpha=0.25, color="C3", label="pseudo-labeled"
    )
    ax2.set_ylabel("training images")
    lines = ax1.get_legend_handles_labels()
    bars = ax2.get_legend_handles_labels()
    ax1.legend(lines[0] + bars[0], lines[1] + bars[1], loc="lower right", fontsize=8)
    ax1.set_title("rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def render(table, diffs, reports, clean_dir, ingest_dir, out_dir, folder, advice="") -> str:
    def link(target: Path, text: str) -> str:
        if not target.exists():
            return f"<span class='muted'>{report.esc(text)} (missing)</span>"
        href = os.path.relpath(target, out_dir).replace(os.sep, "/")
        return f"<a href='{report.esc(href)}'>{report.esc(text)}</a>"

    rows = []
    for r in table.itertuples():
        links = " &middot; ".join(
            link(reports / r.round / part / name, part)
            for part, name in (
                ("train", "diagnostics.png"),
                ("evaluate", "report.html"),
                ("pseudolabel", "report.html"),
            )
        )
        rows.append(
            [
                report.esc(r.round),
                report.esc("CNN" if r.model == "resnet" else r.model),
                _n(r.train_human),
                _n(r.train_pseudo),
                f"{r.val_accuracy:.3f}",
                f"{r.test_accuracy:.3f}",
                f"{r.macro_f1:.3f}",
                _n(r.pseudo_accepted),
                "" if np.isnan(r.pseudo_accuracy) else f"{r.pseudo_accuracy:.3f}",
                links,
            ]
        )
    change_rows = [
        [
            report.esc(d["from"]),
            report.esc(d["to"]),
            len(d["fixed"]),
            len(d["broken"]),
            report.esc(", ".join(d["broken"][:10]) + (" ..." if len(d["broken"]) > 10 else "")),
        ]
        for d in diffs
    ]
    body = (
        "<h1>Dataset improvement rounds</h1>"
        "<p class='muted'>Round r000 trains on the cleaned human labels. Each later round adds a "
        "pool: the round before it re-scores every pool so far, and the round trains on the human "
        "labels plus the images that model is confident about. Every round is tested on the same "
        "held-out test split.</p>"
        + (f"<p class='warn'>{report.esc(advice)}</p>" if advice else "")
        + f"<p><img class='plot' alt='rounds plot' src='{report.file_uri(folder / 'rounds.png')}'></p>"
        + report.table(
            [
                "round",
                "model",
                "human",
                "pseudo",
                "val acc",
                "test acc",
                "macro-F1",
                "pseudo-labeled images it trained on",
                "their accuracy",
                "reports",
            ],
            rows,
            raw=True,
        )
        + "<h2>What changed between rounds (test split)</h2>"
        + (
            report.table(
                ["from", "to", "became right", "became wrong", "became wrong (paths)"],
                change_rows,
                raw=True,
            )
            if diffs
            else "<p class='muted'>Only one round so far.</p>"
        )
        + "<h2>Data</h2><ul>"
        + f"<li>{link(clean_dir / 'report.html', 'label issues (clean stage)')}</li>"
        + f"<li>{link(ingest_dir / 'quarantine.csv', 'quarantined input files (ingest)')}</li>"
        + "</ul>"
    )
    return report.page("Rounds summary", body)


def _n(value) -> str:
    return (
        "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(int(value))
    )
