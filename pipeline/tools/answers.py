"""add-labels: a human's answers to the labeling queue join the labeled set.

    python -m pipeline add-labels ANSWERS.csv        (path,label; e.g. a filled-in to_label.csv)

Each answered pool image (path relative to data/, under data/unlabeled/<pool>/) is copied to
data/labeled/<label>/added/<pool>/<file>, so ingest reads it as any labeled image and the path
says where it came from; data/added_labels.csv records every answer (labeled path, pool path,
label, time). `dvc add data/labeled` then leaves the next `dvc repro` to rerun from ingest. The
pool keeps its copy: ingest's duplicate rules keep a labeled image out of pseudo-labeling.

All answers are checked before anything is written; one problem refuses the whole file with
one line: an unknown class, a path outside the pools or missing, a byte copy or a near copy (a
re-encode, resize or crop: ingest's signatures and cutoff, when ingest has run) of a test image,
an image already in the labeled set, or one image answered twice. Rows with an empty label
(unanswered queue items) are skipped.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from pathlib import Path, PurePosixPath

import pandas as pd

from pipeline.core.config import IngestConfig
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_path, dvc_add, read_array, read_json, read_table, write_table
from pipeline.core.names import file_name_problem, printable
from pipeline.data.images import IMAGE_EXTENSIONS, Rejected, decode, max_file_bytes, too_large
from pipeline.data.inputs import read_csv_rows
from pipeline.data.intake import all_or_nothing
from pipeline.data.near_copies import SIGNATURES, copies_of

log = logging.getLogger(__name__)

LOG_COLUMNS = ["path", "source", "label", "added"]


def add_labels(
    answers: Path,
    *,
    data_dir: Path = Path("data"),
    ingest_dir: Path = Path("artifacts/ingest"),
    max_pixels: int | None = None,
    register: bool = True,
) -> dict:
    """Copy the answered pool images into the labeled set; all or nothing: an error or Ctrl-C
    at any copy leaves data/ as it was. Copies a kill left behind (not yet in
    added_labels.csv) are taken over by the rerun. max_pixels: ingest.max_image_pixels."""
    data_dir = Path(data_dir)
    max_pixels = max_pixels or IngestConfig().max_image_pixels
    rows = read_answers(Path(answers))
    labeled = data_dir / "labeled"
    if (labeled / "labels.csv").is_file():
        raise PipelineError(
            f"{labeled}/labels.csv lists the labeled images, so copies into class folders would "
            f"be ignored: append path,label rows to it yourself"
        )
    log_path = data_dir / "added_labels.csv"
    old_log = read_table(log_path) if log_path.is_file() else pd.DataFrame(columns=LOG_COLUMNS)
    if list(old_log.columns) != LOG_COLUMNS:
        raise PipelineError(f"{log_path} needs the columns {','.join(LOG_COLUMNS)}")
    recorded = set(old_log["path"])
    classes = {p.name for p in labeled.iterdir() if p.is_dir()} if labeled.is_dir() else set()
    test_hashes = _hashes(data_dir / "test")
    test_look = TestLook(Path(ingest_dir), max_pixels)
    labeled_hashes = _hashes(labeled)
    plan, seen = [], {}
    for line, rel, label in rows:
        where = f"{Path(answers).name}:{line}"
        if file_name_problem(rel):
            raise PipelineError(f"{where}: {printable(rel)}: {file_name_problem(rel)}")
        pure = PurePosixPath(rel.replace("\\", "/"))
        parts = pure.parts
        if pure.is_absolute() or ".." in parts or len(parts) < 3 or parts[0] != "unlabeled":
            raise PipelineError(f"{where}: {rel!r} is not a pool image (unlabeled/<pool>/...)")
        source = data_dir / pure
        if (
            source.is_symlink()
            or not source.is_file()
            or source.suffix.lower() not in IMAGE_EXTENSIONS
        ):
            raise PipelineError(f"{where}: {rel} is not an image file in data/")
        if label not in classes:
            raise PipelineError(
                f"{where}: unknown class {label!r} (classes: {', '.join(sorted(classes))})"
            )
        size = source.stat().st_size
        if size > max_file_bytes(max_pixels):  # never read a file no accepted image can fill
            raise PipelineError(f"{where}: {rel}: {too_large(size, max_pixels)}")
        data = source.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        target = labeled / label / "added" / Path(*parts[1:])
        target_rel = target.relative_to(data_dir).as_posix()
        leftover = target_rel not in recorded and labeled_hashes.get(digest) == target_rel
        if digest in test_hashes:
            raise PipelineError(f"{where}: {rel} is a copy of test image {test_hashes[digest]}")
        if digest in labeled_hashes and not leftover:
            raise PipelineError(f"{where}: {rel} is already labeled as {labeled_hashes[digest]}")
        if digest in seen:
            raise PipelineError(f"{where}: {rel} is the same image as line {seen[digest]}")
        seen[digest] = line
        near = test_look.copy_of(data)
        if near:
            raise PipelineError(f"{where}: {rel} is a near copy of test image {near}")
        if target.exists() and not leftover:
            raise PipelineError(f"{where}: {target} exists already (answered before?)")
        plan.append((source, target, label))

    if not plan:
        raise PipelineError(f"{answers} holds no answered row (path,label with a label)")
    touched = [log_path, data_dir / "labeled.dvc", data_dir / ".gitignore"]
    with all_or_nothing(touched) as changes:
        for source, target, _ in plan:
            changes.makedirs(target.parent)
            if not target.exists():  # a leftover of a killed run is already this file
                changes.created(target)
            with atomic_path(target) as tmp:
                shutil.copy2(source, tmp, follow_symlinks=False)
        record(log_path, old_log, plan, data_dir)
        if register:
            dvc_add(data_dir, ["labeled"])
    log.info("add-labels: %d images joined data/labeled/ (see data/added_labels.csv)", len(plan))
    return {"added": len(plan), "classes": sorted({label for _, _, label in plan})}


class TestLook:
    """Near copies of the test split as ingest saw it (its signatures and cutoff); finds none
    before ingest has run."""

    def __init__(self, ingest_dir: Path, max_pixels: int):
        self.paths, self.looks, self.cutoff = [], None, 0.0
        self.max_pixels = max_pixels
        if (ingest_dir / SIGNATURES).is_file() and (ingest_dir / "metrics.json").is_file():
            manifest = read_table(ingest_dir / "manifest.csv")
            rows = (manifest["split"] == "test").to_numpy()
            self.paths = list(manifest.loc[rows, "path"])
            self.looks = read_array(ingest_dir / SIGNATURES)[rows]
            self.cutoff = read_json(ingest_dir / "metrics.json").get("near_copy_cutoff", 0.0)

    def copy_of(self, data: bytes) -> str:
        """The test image a file with these bytes is a near copy of, or ""."""
        if self.looks is None or not len(self.paths) or self.cutoff <= 0:
            return ""
        try:
            look = decode(
                data, image_size=8, channels=3, resize="pad", max_pixels=self.max_pixels
            ).signature
        except Rejected:
            return ""  # unreadable: ingest quarantines it with the reason
        partner, _ = copies_of(look[None], self.looks, self.cutoff)
        return self.paths[partner[0]] if partner[0] >= 0 else ""


def read_answers(path: Path) -> list[tuple[int, str, str]]:
    """(line, path, label) of every answered row."""
    return [(line, row["path"], row["label"]) for line, row in read_csv_rows(path) if row["label"]]


def record(log_path: Path, old: pd.DataFrame, plan: list[tuple[Path, Path, str]], data_dir) -> None:
    """Append the answers to data/added_labels.csv (rewritten atomically)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    new = pd.DataFrame(
        [
            (t.relative_to(data_dir).as_posix(), s.relative_to(data_dir).as_posix(), label, stamp)
            for s, t, label in plan
        ],
        columns=LOG_COLUMNS,
    )
    write_table(log_path, pd.concat([old, new], ignore_index=True)[LOG_COLUMNS])


def _hashes(root: Path) -> dict[str, str]:
    """sha256 -> path (relative to root's parent) of every image file under root."""
    out = {}
    if root.is_dir():
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                out[hashlib.sha256(path.read_bytes()).hexdigest()] = path.relative_to(
                    root.parent
                ).as_posix()
    return out
