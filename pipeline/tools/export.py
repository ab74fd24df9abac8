"""export: the improved dataset as labels.csv and an ImageFolder tree you can take away.

    python -m pipeline export DEST [--test] [--force]

Reads artifacts/dataset/labels.csv, which the dataset stage writes after the last round (its
columns: pipeline/data/dataset_table.py), and writes DEST/labels.csv and DEST/<label>/<file> for
every labeled and pool file with a final label (hard links where the file system allows, copies
otherwise; with --test the test split under DEST/test/<label>/). File names are the data/ path
with `/` as `__`, so they stay unique and say where they came from. DEST is written in a staging
folder and renamed at the end: an interrupted export leaves no half tree. A DEST inside data/ is
refused; an existing, non-empty DEST only with --force.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.core.io import read_table, write_table

log = logging.getLogger(__name__)


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
    table = read_table(Path(artifacts) / "dataset" / "labels.csv")
    if not include_test:
        table = table[table["split"] != "test"]
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
