"""summarize stage: one table, plot and index page over every round.

Reads   <reports>/<round>/{train,evaluate,pseudolabel}/ for every round found there,
        <clean>/metrics.json, <ingest>/metrics.json
Writes  <out>/rounds.csv    one row per round (a DVC plot), <out>/rounds.png,
        <out>/metrics.json  the last round's figures, <out>/index.html linking every report
Params  none (rounds are discovered from the reports folder, so adding one reruns only this)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_dir, read_json, read_table, write_json, write_table, write_text
from pipeline.reports import report

log = logging.getLogger(__name__)


def collect_rounds(reports: Path) -> pd.DataFrame:
    """One row per round that has been evaluated, in round order."""
    rows = []
    for folder in sorted(
        p for p in reports.iterdir() if (p / "evaluate" / "metrics.json").is_file()
    ):
        evaluation = read_json(folder / "evaluate" / "metrics.json")
        train = (
            read_json(folder / "train" / "diagnostics.json")["summary"]
            if (folder / "train" / "diagnostics.json").is_file()
            else {}
        )
        pseudo = (
            read_json(folder / "pseudolabel" / "metrics.json")
            if (folder / "pseudolabel" / "metrics.json").is_file()
            else {}
        )
        rows.append(
            {
                "round": folder.name,
                "train_human": train.get("train_size_human", np.nan),
                "train_pseudo": train.get("train_size_pseudo", np.nan),
                "val_accuracy": train.get("ensemble_val_acc", np.nan),
                "test_accuracy": evaluation["accuracy"],
                "macro_f1": evaluation["macro_f1"],
                "pseudo_accepted": pseudo.get("accepted", np.nan),
                "pseudo_accuracy": pseudo.get("pseudo_label_accuracy", np.nan),
            }
        )
    return pd.DataFrame(rows)


def changes(reports: Path, rounds: list[str]) -> list[dict]:
    """For consecutive rounds: test images that became right and that became wrong."""
    out = []
    for before, after in zip(rounds, rounds[1:]):
        a = read_table(reports / before / "evaluate" / "predictions.csv").set_index("id")
        b = read_table(reports / after / "evaluate" / "predictions.csv").set_index("id")
        common = a.index.intersection(b.index)
        was, now = a.loc[common, "correct"] == "True", b.loc[common, "correct"] == "True"
        out.append(
            {
                "from": before,
                "to": after,
                "fixed": sorted(b.loc[common[~was & now], "path"]),
                "broken": sorted(b.loc[common[was & ~now], "path"]),
            }
        )
    return out


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


def run(reports: Path, clean_dir: Path, ingest_dir: Path, out_dir: Path) -> dict:
    if not reports.is_dir():
        raise PipelineError(f"no reports under {reports}: run the earlier stages first")
    table = collect_rounds(reports)
    if table.empty:
        raise PipelineError(f"no evaluated round under {reports}")
    diffs = changes(reports, list(table["round"]))
    last = table.iloc[-1]
    best = best_round(table)
    metrics = {
        "rounds": len(table),
        "last_round": last["round"],
        "test_accuracy": float(last["test_accuracy"]),
        "macro_f1": float(last["macro_f1"]),
        "gain_over_first_round": float(last["test_accuracy"] - table.iloc[0]["test_accuracy"]),
        "best_round_by_validation": best["round"],
    }
    advice = ""
    if best["round"] != last["round"]:
        advice = (
            f"round {best['round']} scores higher on validation ({best['val_accuracy']:.3f}) "
            f"than the last round {last['round']} ({last['val_accuracy']:.3f}): the pseudo-labels "
            f"added since did not help on validation. Use artifacts/rounds/{best['round']}/model, "
            f"or look at the pseudo-labels (`python -m pipeline review`)"
        )
        log.warning("summarize: WARNING %s", advice)
    with atomic_dir(out_dir) as tmp:
        write_table(tmp / "rounds.csv", table)
        write_json(tmp / "metrics.json", metrics)
        write_json(tmp / "changes.json", diffs)
        plot_rounds(tmp / "rounds.png", table)
        write_text(
            tmp / "index.html",
            render(table, diffs, reports, clean_dir, ingest_dir, out_dir, tmp, advice),
        )
    log.info(
        "summarize: %d rounds; last %s test accuracy %.3f (%+.3f since the first)",
        len(table),
        last["round"],
        last["test_accuracy"],
        metrics["gain_over_first_round"],
    )
    return metrics


def best_round(table: pd.DataFrame) -> pd.Series:
    """The round with the highest validation accuracy, the later one on ties (test never
    chooses); the last round when no round has a validation figure."""
    val = table["val_accuracy"].astype(float)
    if val.isna().all():
        return table.iloc[-1]
    return table[val == val.max()].iloc[-1]


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
