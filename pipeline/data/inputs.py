"""The truth file, path,label CSV rows and stratified holdouts.

Shared by ingest (the test split), pseudolabel (truth of pool images), clean (overrides, the
validation split) and the tools that read user-written CSVs (init, answers).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.errors import PipelineError


def stratified_holdout(
    labels: pd.Series, fraction: float, seed: int, *, minimum: int = 0
) -> pd.Series:
    """Stratified, seeded choice of held-out rows: a boolean mask aligned with `labels`.

    Each class holds out round(fraction * n) rows, at least `minimum` of them; with a minimum,
    never more than half the class, and never the whole class in any case.
    """
    rng = np.random.default_rng(seed)
    held = pd.Series(False, index=labels.index)
    for _, idx in labels.groupby(labels).groups.items():
        idx = np.array(sorted(idx))
        n_held = int(round(len(idx) * fraction))
        if minimum:
            n_held = min(max(n_held, minimum), len(idx) // 2)
        n_held = min(n_held, len(idx) - 1)  # a class never loses all its training images
        held[rng.permutation(idx)[:n_held]] = True
    return held


def attach_truth(table: pd.DataFrame, truth_path: Path) -> tuple[pd.DataFrame, int]:
    """Add a `true_label` column from data/truth.csv ("" where unknown)."""
    truth = read_truth(truth_path)
    table = table.copy()
    table["true_label"] = [truth.get(path, "") for path in table["path"]]
    return table, len(truth)


def read_truth(path: Path) -> dict[str, str]:
    """path -> true label from a truth file (path,true_label); empty when there is none."""
    return read_pairs(path, "true_label")


def read_pairs(path: Path, column: str) -> dict[str, str]:
    """path -> `column` from an optional path,<column> CSV (values stripped); {} when absent."""
    if not path.is_file():
        return {}
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path} is not a readable CSV: {exc}") from None
    except pd.errors.EmptyDataError:
        return {}
    if not {"path", column} <= set(table.columns):
        raise PipelineError(
            f"{path} needs the columns path,{column}; it has {','.join(table.columns)}"
        )
    return dict(zip(table["path"].str.strip(), table[column].str.strip()))


def read_csv_rows(
    path: Path, columns_needed: tuple[str, ...] = ("path", "label")
) -> list[tuple[int, dict[str, str]]]:
    """(line number, row with stripped values) of a UTF-8 CSV with at least columns_needed."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = set(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise PipelineError(f"{path} is not a readable CSV: {exc}") from None
    if not set(columns_needed) <= columns:
        raise PipelineError(f"{path} needs a header with {','.join(columns_needed)}")
    return [
        (line, {k: (v or "").strip() for k, v in row.items() if k is not None})
        for line, row in enumerate(rows, start=2)
    ]
