"""export: the improved dataset as a labels table and an ImageFolder tree you can take away.

    python -m pipeline export DEST [--test] [--force]

`dataset_table` reads what the stages decided, from the workspace's artifacts, into one row per
labeled, pool (and, with --test, test) file:
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

`run` writes DEST/labels.csv and DEST/<label>/<file> for every row with a label (hard links where
the file system allows, copies otherwise; test images under DEST/test/<label>/ with --test).
File names are the data/ path with `/` as `__`, so they stay unique and say where they came from.
DEST is written in a staging folder and renamed at the end: an interrupted export leaves no half
tree. A DEST inside data/ is refused; an existing, non-empty DEST only with --force.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from pipeline.core.errors import PipelineError
from pipeline.core.io import read_table, write_table

log = logging.getLogger(__name__)

COLUMNS = ["path", "split", "label", "source", "original", "round", "confidence", "set_aside"]
ANSWERED = "/added/"  # add-labels copies answers to labeled/<label>/added/<pool>/...


def dataset_table(artifacts: Path, *, include_test: bool = False) -> pd.DataFrame:
    """One row per file the stages saw (COLUMNS); see the module docstring."""
    artifacts = Path(artifacts)
    rows = [_labeled_rows(read_table(artifacts / "clean" / "issues.csv"))]
    quarantine = read_table(artifacts / "ingest" / "quarantine.csv")
    if not include_test:
        quarantine = quarantine[quarantine["split"] != "test"]
    rows.append(_set_aside(quarantine, "quarantined at ingest"))
    last = _last_round(artifacts / "rounds")
    if last is not None:
        rows.append(_pool_rows(read_table(last / "pseudo" / "table.csv")))
    for path in sorted((artifacts / "reports").glob("r[0-9][0-9][0-9]/pseudolabel/quarantine.csv")):
        rows.append(
            _set_aside(read_table(path), f"quarantined by pseudolabel@{path.parents[1].name}")
        )
    if include_test:
        manifest = read_table(artifacts / "ingest" / "manifest.csv")
        test = manifest[manifest["split"] == "test"]
        rows.append(
            pd.DataFrame(
                {
                    "path": test["path"],
                    "split": "test",
                    "label": test["label"],
                    "source": "human",
                    "original": test["label"],
                }
            )  # fmt: skip
        )
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
    why = "not accepted: confidence " + table["confidence"].astype(float).map("{:.3f}".format)
    why += " under the threshold " + table["threshold"].astype(float).map("{:.3f}".format)
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


def run(
    dest: Path,
    *,
    artifacts: Path = Path("artifacts"),
    data_dir: Path = Path("data"),
    include_test: bool = False,
    force: bool = False,
) -> dict:
    """Write DEST/labels.csv and the ImageFolder tree; returns images per label."""
    dest, data_dir = Path(dest), Path(data_dir)
    inside = dest.resolve() == data_dir.resolve() or data_dir.resolve() in dest.resolve().parents
    if inside:
        raise PipelineError(f"{dest} is inside {data_dir}/: export somewhere else")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())) and not force:
        raise PipelineError(f"{dest} exists and is not empty: --force replaces it")
    table = dataset_table(artifacts, include_test=include_test)
    labeled = table[table["label"] != ""]
    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        for path, split, label in zip(labeled["path"], labeled["split"], labeled["label"]):
            folder = stage / "test" / label if split == "test" else stage / label
            folder.mkdir(parents=True, exist_ok=True)
            _place(data_dir / path, folder / path.replace("/", "__"))
        write_table(stage / "labels.csv", table)
        old = dest.with_name(f".{dest.name}.old")
        if dest.exists():
            os.replace(dest, old)
        os.replace(stage, dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    counts = labeled["label"].value_counts().sort_index()
    log.info("export: %d images in %d classes -> %s (labels.csv beside)", len(labeled),
             len(counts), dest)  # fmt: skip
    return {str(k): int(v) for k, v in counts.items()}


def _place(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed: a copy
        try:
            shutil.copy2(source, target)
        except OSError as exc:
            raise PipelineError(
                f"cannot copy {source} to {target}: {exc.strerror or exc}"
            ) from None
