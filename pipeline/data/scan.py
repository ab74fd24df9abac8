"""Scanning data/: which files are candidate images, and why the others are not.

Walks a split folder (by class folder or a `path,label` manifest, labels.csv), confines
user-given paths to data/ (`confine`) and writes a quarantine row for everything refused.
Shared by ingest (labeled and test images), pseudolabel (pools) and clean (overrides).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipeline.core.errors import PipelineError
from pipeline.core.names import CONTROL, class_name_problem, file_name_problem, printable
from pipeline.data.images import IMAGE_EXTENSIONS, SYSTEM_FILES

MANIFEST_NAME = "labels.csv"


QUARANTINE_COLUMNS = ["path", "split", "reason"]


@dataclass(frozen=True)
class Candidate:
    path: str  # relative to data/, POSIX separators
    label: str  # "" for unlabeled pools


def scan_folder(
    data_dir: Path, sub: str, *, by_class: bool, split: str
) -> tuple[list[Candidate], list[dict]]:
    """Candidates under data/<sub>; with by_class, the first folder level is the label. The
    quarantine rows name `split`, as the rows of the files that fail to decode do."""
    root = data_dir / sub
    candidates: list[Candidate] = []
    quarantine: list[dict] = []
    if by_class and (root / MANIFEST_NAME).is_file():
        return read_csv_manifest(data_dir, root / MANIFEST_NAME, split)
    if by_class:
        try:
            entries = sorted(root.iterdir())
        except OSError as exc:
            raise PipelineError(f"cannot read {printable(str(root))}: {exc.strerror}") from None
        for entry in entries:
            rel = _rel(data_dir, entry)
            why = _why_not_class_folder(entry)
            if why:
                quarantine.append(quarantine_row(rel, split, why))
                continue
            files, rejected = _walk(data_dir, entry, split)
            quarantine += rejected
            candidates += [Candidate(path, entry.name) for path in files]
            # (an unreadable class folder has its own row)
            if not files and printable(rel) not in {row["path"] for row in rejected}:
                quarantine.append(
                    quarantine_row(rel, split, "empty class folder (no usable images)")
                )
    else:
        files, quarantine = _walk(data_dir, root, split)
        candidates = [Candidate(path, "") for path in files]
    return candidates, quarantine


def read_csv_manifest(
    data_dir: Path, csv_path: Path, split: str
) -> tuple[list[Candidate], list[dict]]:
    """Rows of a `path,label` CSV whose paths stay inside data/; the rest are quarantined."""
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = [c for c in reader.fieldnames or [] if c is not None]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise PipelineError(f"{_rel(data_dir, csv_path)} is not a readable CSV: {exc}") from None
    if not {"path", "label"} <= set(columns):
        raise PipelineError(
            f"{_rel(data_dir, csv_path)} needs a header with the columns path,label; "
            f"it has {','.join(columns) or 'none'}"
        )
    candidates, quarantine = [], []
    for line, row in enumerate(rows, start=2):
        path, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
        where = f"{_rel(data_dir, csv_path)}:{line}"
        if not path or not label:
            quarantine.append(quarantine_row(where, split, "row without a path or a label"))
            continue
        target, reason = confine(data_dir, path)
        if not reason and class_name_problem(label):
            reason = f"label '{printable(label)}' is refused: {class_name_problem(label)}"
        if not reason:
            try:
                if target.is_file():
                    candidates.append(Candidate(_rel(data_dir, target), label))
                    continue
                reason = "no such file"
            except OSError as exc:  # a name too long for the system, say
                reason = f"unreadable path: {exc.strerror or exc}"
        quarantine.append(quarantine_row(path, split, f"{reason} ({where})"))
    return candidates, quarantine


def confine(data_dir: Path, user_path: str) -> tuple[Path, str]:
    """Resolve a user-given path inside data/; return (path, "") or (_, reason it is refused)."""
    if CONTROL.search(user_path):  # a NUL would also stop every os call with ValueError
        return data_dir, "path contains a control character"
    pure = PurePosixPath(user_path.replace("\\", "/"))
    if pure.is_absolute() or (len(user_path) > 1 and user_path[1] == ":"):
        return data_dir, "absolute path refused: paths must be relative to data/"
    if ".." in pure.parts:
        return data_dir, "path escapes data/ ('..' refused)"
    target = data_dir / pure
    if not _inside(target.resolve(), data_dir.resolve()):
        return data_dir, "path resolves outside data/ through a symlink (refused)"
    return target, ""


def _walk(data_dir: Path, root: Path, split: str) -> tuple[list[str], list[dict]]:
    """Image files under root, any depth; every other entry gets a quarantine reason."""
    files, quarantine = [], []
    resolved_data = data_dir.resolve()

    def unreadable(error: OSError) -> None:  # os.walk would skip the folder without a word
        where = _rel(data_dir, Path(error.filename))
        quarantine.append(quarantine_row(where, split, f"unreadable folder: {error.strerror}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=False):
        here = Path(dirpath)
        kept = []
        for name in sorted(dirnames):
            why = "hidden folder" if _is_hidden(name) else _name_problem(name, "folder")
            if not why and (here / name).is_symlink():
                why = "symlinked folder (not followed)"
            if why:
                quarantine.append(quarantine_row(_rel(data_dir, here / name), split, why))
            else:
                kept.append(name)
        dirnames[:] = kept  # os.walk goes only into these
        for name in sorted(filenames):
            path = here / name
            reason = _why_not_image_file(path, resolved_data)
            if reason:
                quarantine.append(quarantine_row(_rel(data_dir, path), split, reason))
            else:
                files.append(_rel(data_dir, path))
    return files, quarantine


def _why_not_image_file(path: Path, resolved_data: Path) -> str:
    """Why a file under a split folder is not a candidate image; "" when it is one."""
    if _is_hidden(path.name) or path.name.lower() in SYSTEM_FILES:
        return "hidden or system file"
    if problem := _name_problem(path.name, "file"):
        return problem
    if path.is_symlink() and not _inside(path.resolve(), resolved_data):
        return "symlink pointing outside data/ (refused)"
    if not path.exists():
        return "unreadable: broken symlink"
    if not path.is_file():
        return "not a regular file"
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return f"unsupported extension {path.suffix or '(none)'!r}"
    return ""


def _why_not_class_folder(entry: Path) -> str:
    """Why an entry of a split folder is not read as a class folder; "" when it is one."""
    if _is_hidden(entry.name) or entry.name.lower() in SYSTEM_FILES:
        return "hidden or system file"
    if problem := _name_problem(entry.name, "folder" if entry.is_dir() else "file"):
        return problem
    if entry.is_symlink():
        return "symlink at class level (not followed)"
    if not entry.is_dir():
        return "not inside a class folder"
    if problem := class_name_problem(entry.name):
        return f"not a class name: {problem} (rename the folder to use it)"
    return ""


def _name_problem(name: str, kind: str) -> str:
    """Why a file or folder name cannot be used as it is ("" when it can): paths and labels
    go into UTF-8 CSVs and one-line reports (names.file_name_problem)."""
    problem = file_name_problem(name)
    return f"{kind} {problem} (rename it to use it)" if problem else ""


def quarantine_row(path: str, split: str, reason: str) -> dict:
    """One quarantine entry; the path and reason printable (a file's name can hold bytes that
    are not UTF-8, or control characters)."""
    return {"path": printable(path), "split": split, "reason": printable(reason)}


def _rel(data_dir: Path, path: Path) -> str:
    try:
        return path.relative_to(data_dir).as_posix()
    except ValueError:
        return path.as_posix()


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _is_hidden(name: str) -> bool:
    return name.startswith(".")
