"""diff: which labels changed between two versions of the dataset.

    python -m pipeline diff REV_A REV_B [--out label_changes.csv]

Reads artifacts/dataset/labels.csv (the dataset stage's output, kept in git) at two git
revisions and lists every file whose final label or its source differs, one kind each:
    pseudo-labeled  a pool image that gained a pseudo-label
    unlabeled       a pool image whose pseudo-label left the set
    answered        a pool image a person labeled (add-labels)
    relabeled       a human-labeled image whose final label changed (clean, or an override)
    dropped         an image that had a label and is now set aside
    restored        an image set aside before that has a label again
    added, removed  a file in only one of the two versions
    changed         any other change of label or source
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pandas as pd

from pipeline.core.errors import PipelineError
from pipeline.core.io import write_table

LABELS = "artifacts/dataset/labels.csv"
COLUMNS = ["path", "kind", "label_a", "label_b", "source_a", "source_b", "split"]


def labels_at(rev: str, repo: Path = Path(".")) -> pd.DataFrame:
    """The dataset table at git revision `rev`."""
    if rev.startswith("-"):  # never an option to git
        raise PipelineError(f"{rev!r} is not a revision")
    result = subprocess.run(
        ["git", "show", f"{rev}:{LABELS}"], cwd=repo, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise PipelineError(
            f"{LABELS} at {rev}: {result.stderr.strip().splitlines()[-1:] or 'not found'} "
            f"(commit after `dvc repro`, which writes it)"
        )
    return pd.read_csv(io.StringIO(result.stdout), dtype=str, keep_default_na=False)


def label_changes(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """One row per path whose label or source differs between tables a and b (COLUMNS); a file
    in one table only counts when it has a label there (a new pool's images that joined no set
    are not a label change)."""
    both = a.merge(b, on="path", how="outer", suffixes=("_a", "_b"), indicator="presence")
    both = both.fillna("")
    differ = (both["label_a"] != both["label_b"]) | (both["source_a"] != both["source_b"])
    changed = both[differ].copy()
    changed["kind"] = [_kind(row) for row in changed.itertuples()]
    changed["split"] = changed["split_b"].where(changed["split_b"] != "", changed["split_a"])
    return changed[COLUMNS].sort_values(["kind", "path"]).reset_index(drop=True)


def _kind(row) -> str:
    if row.source_b == "answer" and row.source_a != "answer":
        return "answered"
    if row.source_b == "pseudo" and row.label_a == "":
        return "pseudo-labeled"
    if row.source_a == "pseudo" and row.label_b == "":
        return "unlabeled"
    if row.presence == "left_only":
        return "removed"
    if row.presence == "right_only":
        return "added"
    if row.label_a and not row.label_b:
        return "dropped"
    if row.label_b and not row.label_a:
        return "restored"
    if row.label_a != row.label_b and row.source_b in ("relabeled", "override", "human"):
        return "relabeled"
    return "changed"


def run(rev_a: str, rev_b: str, out: Path | None = None, repo: Path = Path(".")) -> pd.DataFrame:
    """The changes from rev_a to rev_b; written to `out` as CSV when given."""
    changes = label_changes(labels_at(rev_a, repo), labels_at(rev_b, repo))
    if out is not None:
        write_table(out, changes)
    return changes


def describe(changes: pd.DataFrame) -> str:
    """Counts per kind, each with its classes: what `diff` prints."""
    if changes.empty:
        return "no label changed"
    lines = []
    for kind, rows in changes.groupby("kind", sort=True):
        label = rows["label_b"].where(rows["label_b"] != "", rows["label_a"])
        per_class = ", ".join(
            f"{c or '-'} {n}" for c, n in label.value_counts().sort_index().items()
        )
        lines.append(f"{kind}: {len(rows)} ({per_class})")
    return "\n".join(lines)
