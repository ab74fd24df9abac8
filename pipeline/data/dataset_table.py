"""The improved dataset as one table: every labeled, pool and test file once, with its final
label and where the label came from, or why the file was set aside. Pure reading of what the
stages decided (artifacts/); the dataset stage writes it, export and diff read it.

Columns (COLUMNS):
    path        relative to data/
    split       train | validation | pool | test
    label       the final label ("" when the file is set aside)
    source      human | answer (add-labels) | relabeled (clean) | override (a person, in
                data/overrides.csv or data/pseudo_overrides.csv) | pseudo (the last round's set)
    original    the label a person gave ("" for pool images)
    round       for pseudo-labels, the round the label joined the set
    confidence  for pseudo-labels, the calibrated confidence
    set_aside   why a file is not in the dataset: dropped by clean, quarantined (with ingest's or
                the pool round's reason), a near copy, not confident enough, rejected by a person
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.core.io import read_table

COLUMNS = ["path", "split", "label", "source", "original", "round", "confidence", "set_aside"]
ANSWERED = "/added/"  # add-labels copies answers to labeled/<label>/added/<pool>/...


def dataset_table(artifacts: Path) -> pd.DataFrame:
    """One row per file the stages saw (COLUMNS), sorted by split and path."""
    artifacts = Path(artifacts)
    rows = [_labeled_rows(read_table(artifacts / "clean" / "issues.csv"))]
    quarantine = read_table(artifacts / "ingest" / "quarantine.csv")
    rows.append(_set_aside(quarantine, "quarantined at ingest"))
    last = _last_round(artifacts / "rounds")
    if last is not None:
        rows.append(_pool_rows(read_table(last / "pseudo" / "table.csv")))
    for path in sorted((artifacts / "reports").glob("r[0-9][0-9][0-9]/pseudolabel/quarantine.csv")):
        rows.append(
            _set_aside(read_table(path), f"quarantined by pseudolabel@{path.parents[1].name}")
        )
    manifest = read_table(artifacts / "ingest" / "manifest.csv")
    test = manifest[manifest["split"] == "test"]
    test_rows = {"path": test["path"], "split": "test", "label": test["label"]}
    rows.append(pd.DataFrame({**test_rows, "source": "human", "original": test["label"]}))
    table = pd.concat(rows, ignore_index=True).reindex(columns=COLUMNS).fillna("")
    return table.sort_values(["split", "path"], kind="stable").reset_index(drop=True)


def _labeled_rows(issues: pd.DataFrame) -> pd.DataFrame:
    """The clean stage's decision on every human-labeled row (validation rows included)."""
    dropped = issues["decision"] == "drop"
    override = issues["reason"].str.startswith("override:")
    source = pd.Series("human", index=issues.index)
    source[issues["path"].str.contains(ANSWERED, regex=False)] = "answer"
    source[issues["decision"] == "relabel"] = "relabeled"
    source[override] = "override"
    return pd.DataFrame(
        {
            "path": issues["path"],
            "split": issues["decision"]
            .isin(["validate", "unscored"])
            .map({True: "validation", False: "train"}),
            "label": issues["label"].where(~dropped, ""),
            "source": source.where(~dropped, ""),
            "original": issues["given_label"],
            "set_aside": issues["reason"].where(dropped, ""),
        }
    )


def _pool_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The last round's pseudo-label set over every pool so far: accepted rows with their
    label, the rest with why not."""
    accepted = table["accepted"] == "True"
    by_person = table["human"] != ""
    why = pd.Series(
        [
            f"not accepted: confidence {float(c):.3f} under the threshold {float(t):.3f}"
            for c, t in zip(table["confidence"], table["threshold"])
        ],
        index=table.index,
        dtype=str,
    )
    why = why.where(table["human"] != "reject", "rejected by a person (data/pseudo_overrides.csv)")
    return pd.DataFrame(
        {
            "path": table["path"],
            "split": "pool",
            "label": table["label"].where(accepted, ""),
            "source": pd.Series("pseudo", index=table.index)
            .where(~by_person, "override")
            .where(accepted, ""),
            "round": table["joined"].where(accepted, ""),
            "confidence": table["confidence"].where(accepted & ~by_person, ""),
            "set_aside": why.where(~accepted, ""),
        }
    )


def _set_aside(quarantine: pd.DataFrame, where: str) -> pd.DataFrame:
    split = quarantine["split"].replace({"labeled": "train"})
    return pd.DataFrame(
        {
            "path": quarantine["path"],
            "split": split,
            "set_aside": f"{where}: " + quarantine["reason"],
        }
    )


def _last_round(rounds: Path) -> Path | None:
    done = sorted(p.parents[1] for p in rounds.glob("r[0-9][0-9][0-9]/pseudo/table.csv"))
    return done[-1] if done else None
