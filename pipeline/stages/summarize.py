"""summarize stage: one table, plot and index page over every round.

Reads   <reports>/<round>/{train,evaluate,pseudolabel}/ for every round found there,
        <clean>/metrics.json, <ingest>/metrics.json
Writes  <out>/rounds.csv    one row per round (a DVC plot), <out>/rounds.png,
        <out>/metrics.json  the last round's figures, <out>/index.html linking every report
Params  none (rounds are discovered from the reports folder, so adding one reruns only this)
The plot and the page: pipeline/reports/summary_page.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_dir, read_json, read_table, write_json, write_table, write_text
from pipeline.reports.summary_page import plot_rounds, render

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
        config = (
            read_json(folder / "train" / "config.json")
            if (folder / "train" / "config.json").is_file()
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
                # the network the round kept: train.model.backbone, or resnet when validation
                # preferred the CNN trained beside it (train.fallback)
                "model": config.get("train", {}).get("model", {}).get("backbone", ""),
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
        why = (
            f"the two rounds kept different networks ({best['model']} and {last['model']}, "
            f"train.fallback)"
            if best["model"] != last["model"]
            else "the pseudo-labels added since did not help on validation"
        )
        advice = (
            f"round {best['round']} scores higher on validation ({best['val_accuracy']:.3f}) "
            f"than the last round {last['round']} ({last['val_accuracy']:.3f}): {why}. Use "
            f"artifacts/rounds/{best['round']}/model, or look at the pseudo-labels "
            f"(`python -m pipeline review`)"
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
