"""ingest stage: scan data/, decode every image once, pack them into sharded arrays.

Reads   data/labeled/<class>/**  (or data/labeled/labels.csv: path,label; paths relative to data/)
        data/test/<class>/**     (optional; otherwise a stratified, seeded split of labeled)
        data/truth.csv           (optional audit: path,true_label)
Writes  <out>/manifest.csv   one row per usable image: id, path, sha256, label, split, row, ...
        <out>/images/        the packed images: uint8 (N, image_size, image_size, channels) in
                             .npy shards of ingest.shard_mib MiB + index.json, memory-mapped
                             (pipeline.io.PackedImages reads them as one array)
        <out>/classes.json   the one class order used everywhere
        <out>/quarantine.csv path, split, reason for every file or folder not used
        <out>/metrics.json
Params  base, ingest

Unlabeled pools are packed by the pseudolabel stage of their round with the same functions, so
adding a pool does not rerun this stage.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.config import BaseConfig, Params, to_dict
from pipeline.errors import PipelineError
from pipeline.images import IMAGE_EXTENSIONS, SYSTEM_FILES, Rejected, decode
from pipeline.io import (
    ShardWriter,
    atomic_dir,
    read_array,
    write_json,
    write_packed,
    write_table,
)

log = logging.getLogger(__name__)

MANIFEST_NAME = "labels.csv"
QUARANTINE_COLUMNS = ["path", "split", "reason"]


@dataclass(frozen=True)
class Candidate:
    path: str  # relative to data/, POSIX separators
    label: str  # "" for unlabeled pools


# --------------------------------------------------------------------------------------------
# 1) Scanning: which files are candidates, and why the others are not


def scan_folder(data_dir: Path, sub: str, *, by_class: bool) -> tuple[list[Candidate], list[dict]]:
    """Candidates under data/<sub>; with by_class, the first folder level is the label."""
    root = data_dir / sub
    candidates: list[Candidate] = []
    quarantine: list[dict] = []
    if by_class and (root / MANIFEST_NAME).is_file():
        return read_csv_manifest(data_dir, root / MANIFEST_NAME, sub)
    if by_class:
        for entry in sorted(root.iterdir()):
            rel = _rel(data_dir, entry)
            if entry.is_dir() and not entry.is_symlink() and not _is_hidden(entry.name):
                files, rejected = _walk(data_dir, entry, sub)
                quarantine += rejected
                candidates += [Candidate(path, entry.name) for path in files]
                if not files:
                    quarantine.append(_row(rel, sub, "empty class folder (no usable images)"))
            else:
                quarantine.append(_row(rel, sub, _why_not_class_folder(entry)))
    else:
        files, quarantine = _walk(data_dir, root, sub)
        candidates = [Candidate(path, "") for path in files]
    return candidates, quarantine


def read_csv_manifest(
    data_dir: Path, csv_path: Path, sub: str
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
            quarantine.append(_row(where, sub, "row without a path or a label"))
            continue
        target, reason = confine(data_dir, path)
        if reason:
            quarantine.append(_row(path, sub, f"{reason} ({where})"))
        elif not target.is_file():
            quarantine.append(_row(path, sub, f"listed in {where} but no such file"))
        else:
            candidates.append(Candidate(_rel(data_dir, target), label))
    return candidates, quarantine


def confine(data_dir: Path, user_path: str) -> tuple[Path, str]:
    """Resolve a user-given path inside data/; return (path, "") or (_, reason it is refused)."""
    pure = PurePosixPath(user_path.replace("\\", "/"))
    if pure.is_absolute() or (len(user_path) > 1 and user_path[1] == ":"):
        return data_dir, "absolute path refused: paths must be relative to data/"
    if ".." in pure.parts:
        return data_dir, "path escapes data/ ('..' refused)"
    target = data_dir / pure
    if not _inside(target.resolve(), data_dir.resolve()):
        return data_dir, "path resolves outside data/ through a symlink (refused)"
    return target, ""


def _walk(data_dir: Path, root: Path, sub: str) -> tuple[list[str], list[dict]]:
    """Image files under root, any depth; every other entry gets a quarantine reason."""
    files, quarantine = [], []
    resolved_data = data_dir.resolve()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        for name in sorted(dirnames):
            if _is_hidden(name) or (here / name).is_symlink():
                why = "hidden folder" if _is_hidden(name) else "symlinked folder (not followed)"
                quarantine.append(_row(_rel(data_dir, here / name), sub, why))
        dirnames[:] = sorted(
            d for d in dirnames if not _is_hidden(d) and not (here / d).is_symlink()
        )
        for name in sorted(filenames):
            path = here / name
            rel = _rel(data_dir, path)
            reason = ""
            if _is_hidden(name) or name.lower() in SYSTEM_FILES:
                reason = "hidden or system file"
            elif path.is_symlink() and not _inside(path.resolve(), resolved_data):
                reason = "symlink pointing outside data/ (refused)"
            elif not path.exists():
                reason = "unreadable: broken symlink"
            elif not path.is_file():
                reason = "not a regular file"
            elif path.suffix.lower() not in IMAGE_EXTENSIONS:
                reason = f"unsupported extension {path.suffix or '(none)'!r}"
            if reason:
                quarantine.append(_row(rel, sub, reason))
            else:
                files.append(rel)
    return files, quarantine


def _why_not_class_folder(entry: Path) -> str:
    if _is_hidden(entry.name) or entry.name.lower() in SYSTEM_FILES:
        return "hidden or system file"
    if entry.is_symlink():
        return "symlink at class level (not followed)"
    return "not inside a class folder"


# --------------------------------------------------------------------------------------------
# 2) Decoding: stream every candidate into one packed array


def pack(
    candidates: list[Candidate],
    data_dir: Path,
    out: Path,
    base: BaseConfig,
    max_pixels: int,
    *,
    split: str | list[str],
    shard_mib: float = 64.0,
    desc: str = "ingest",
) -> tuple[pd.DataFrame, list[dict]]:
    """Decode candidates into the packed image folder `out`; returns (table, quarantine rows).

    Images go to disk shard by shard as they are decoded, so memory stays flat however many
    there are; table row i is image i of `out`. `split` is one name for all or one per candidate.
    """
    splits = [split] * len(candidates) if isinstance(split, str) else split
    records, quarantine = [], []
    with atomic_dir(out) as tmp:
        writer = ShardWriter(tmp, (base.image_size, base.image_size, base.channels), shard_mib)
        for index, cand in enumerate(tqdm(candidates, desc=desc, unit="img", mininterval=1.0)):
            try:
                data = (data_dir / cand.path).read_bytes()
                image = decode(
                    data,
                    image_size=base.image_size,
                    channels=base.channels,
                    resize=base.resize,
                    max_pixels=max_pixels,
                )
            except Rejected as exc:
                quarantine.append(_row(cand.path, splits[index], str(exc)))
                continue
            except OSError as exc:
                quarantine.append(
                    _row(cand.path, splits[index], f"unreadable: {exc.strerror or exc}")
                )
                continue
            writer.append(image.pixels)
            records.append(
                {
                    "id": image_id(cand.path),
                    "path": cand.path,
                    "sha256": image.sha256,
                    "label": cand.label,
                    "split": splits[index],
                    "width": image.width,
                    "height": image.height,
                    "mode": image.mode,
                    "note": image.note,
                }
            )
        writer.close()
    table = pd.DataFrame(records, columns=MANIFEST_COLUMNS[:-1])
    table["row"] = np.arange(len(table))
    return table, quarantine


MANIFEST_COLUMNS = [
    "id",
    "path",
    "sha256",
    "label",
    "split",
    "width",
    "height",
    "mode",
    "note",
    "row",
]


def image_id(path: str) -> str:
    """A short id that depends only on the path, so it is stable across runs."""
    return hashlib.sha1(path.encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# 3) Decisions over the table: duplicates, leakage, tiny classes, test split


def resolve_duplicates(table: pd.DataFrame) -> tuple[pd.Series, list[dict], dict]:
    """Keep mask over `table` and quarantine rows for exact (byte-identical) duplicates.

    Rules: a test image wins over every copy outside test (the copies leave training, so the
    test set never leaks); among test copies the first path wins; among labeled copies with one
    label the first path wins; copies that disagree on the label are all set aside.
    """
    keep = pd.Series(True, index=table.index)
    quarantine: list[dict] = []
    counts = Counter()
    for _, group in table.groupby("sha256", sort=False):
        if len(group) == 1:
            continue
        group = group.sort_values("path")
        tests = group[group["split"] == "test"]
        if len(tests):
            winner = tests.iloc[0]
            for idx, row in group.drop(index=winner.name).iterrows():
                keep[idx] = False
                if row["split"] == "test":
                    reason = f"exact duplicate of test image {winner['path']}"
                    counts["duplicates"] += 1
                else:
                    reason = f"same image as test image {winner['path']}: kept out of training"
                    counts["test_leakage"] += 1
                quarantine.append(_row(row["path"], row["split"], reason))
        elif group["label"].nunique() > 1:
            labels = ", ".join(sorted(group["label"].unique()))
            counts["label_conflicts"] += 1
            for idx, row in group.iterrows():
                keep[idx] = False
                quarantine.append(
                    _row(row["path"], row["split"], f"same image under labels {labels}")
                )
        else:
            winner = group.iloc[0]
            for idx, row in group.iloc[1:].iterrows():
                keep[idx] = False
                counts["duplicates"] += 1
                quarantine.append(
                    _row(row["path"], row["split"], f"exact duplicate of {winner['path']}")
                )
    return keep, quarantine, dict(counts)


def drop_small_classes(table: pd.DataFrame, minimum: int) -> tuple[pd.Series, list[dict]]:
    """Set aside training images of classes with fewer than `minimum` images."""
    sizes = table.loc[table["split"] == "train", "label"].value_counts()
    small = set(sizes[sizes < minimum].index)
    keep = ~((table["split"] == "train") & table["label"].isin(small))
    quarantine = [
        _row(
            row.path,
            row.split,
            f"class {row.label!r} has {sizes[row.label]} image(s); "
            f"ingest.min_images_per_class is {minimum}",
        )
        for row in table[~keep].itertuples()
    ]
    return keep, quarantine


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


def attach_truth(table: pd.DataFrame, data_dir: Path) -> tuple[pd.DataFrame, int]:
    """Add a `true_label` column from data/truth.csv ("" where unknown)."""
    truth = read_truth(data_dir)
    table = table.copy()
    table["true_label"] = [truth.get(path, "") for path in table["path"]]
    return table, len(truth)


def read_truth(data_dir: Path) -> dict[str, str]:
    path = data_dir / "truth.csv"
    if not path.is_file():
        return {}
    try:
        truth = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise PipelineError(f"data/truth.csv is not a readable CSV: {exc}") from None
    if not {"path", "true_label"} <= set(truth.columns):
        raise PipelineError(
            f"data/truth.csv needs the columns path,true_label; it has {','.join(truth.columns)}"
        )
    return dict(zip(truth["path"], truth["true_label"]))


# --------------------------------------------------------------------------------------------
# 4) The stage


def run(data_dir: Path, out_dir: Path, params: Params) -> dict:
    """Scan, decode, deduplicate and write the ingest outputs; returns the metrics."""
    data_dir = Path(data_dir)
    if not (data_dir / "labeled").is_dir():
        raise PipelineError(
            f"no labeled data: expected {data_dir / 'labeled'}/<class>/<image> "
            f"(or run `python -m pipeline demo-data`)"
        )
    candidates, quarantine = scan_folder(data_dir, "labeled", by_class=True)
    splits = ["train"] * len(candidates)
    has_test = (data_dir / "test").is_dir()
    if has_test:
        test_candidates, test_quarantine = scan_folder(data_dir, "test", by_class=True)
        candidates += test_candidates
        splits += ["test"] * len(test_candidates)
        quarantine += test_quarantine

    scratch = out_dir / ".images.unfiltered"
    shard_mib = params.ingest.shard_mib
    table, rejected = pack(
        candidates,
        data_dir,
        scratch,
        params.base,
        params.ingest.max_image_pixels,
        split=splits,
        shard_mib=shard_mib,
    )
    quarantine += rejected

    keep, dup_rows, dup_counts = resolve_duplicates(table)
    quarantine += dup_rows
    table = table[keep]
    keep, small_rows = drop_small_classes(table, params.ingest.min_images_per_class)
    quarantine += small_rows
    table = table[keep]

    classes = sorted(table.loc[table["split"] == "train", "label"].unique())
    if len(classes) < 2:
        raise PipelineError(
            f"need at least 2 classes with {params.ingest.min_images_per_class}+ usable images "
            f"in {data_dir / 'labeled'}; found {len(classes)} (see the quarantine list)"
        )
    unknown = (table["split"] == "test") & ~table["label"].isin(classes)
    quarantine += [
        _row(r.path, r.split, f"class {r.label!r} has no labeled training images")
        for r in table[unknown].itertuples()
    ]
    table = table[~unknown]
    if not has_test:
        is_test = stratified_holdout(table["label"], params.ingest.test_fraction, params.base.seed)
        table.loc[is_test, "split"] = "test"

    # The packed images in manifest order; the scratch set with set-aside rows goes away.
    table = table.sort_values(["split", "label", "path"], kind="stable").reset_index(drop=True)
    write_packed(out_dir / "images", read_array(scratch), table["row"].to_numpy(), shard_mib)
    shutil.rmtree(scratch)
    table["row"] = np.arange(len(table))
    table, n_truth = attach_truth(table, data_dir)

    quarantine_table = pd.DataFrame(quarantine, columns=QUARANTINE_COLUMNS)
    metrics = summarize(table, quarantine_table, dup_counts, classes, n_truth)
    write_table(out_dir / "manifest.csv", table)
    write_table(out_dir / "quarantine.csv", quarantine_table)
    write_json(out_dir / "classes.json", classes)
    write_json(
        out_dir / "params.json", {"base": to_dict(params.base), "ingest": to_dict(params.ingest)}
    )
    write_json(out_dir / "metrics.json", metrics)
    log.info(
        "ingest: %d train, %d test images, %d classes, %d quarantined (see %s)",
        metrics["train_images"],
        metrics["test_images"],
        len(classes),
        metrics["quarantined"],
        out_dir / "quarantine.csv",
    )
    return metrics


def summarize(
    table: pd.DataFrame,
    quarantine: pd.DataFrame,
    dup_counts: dict,
    classes: list[str],
    n_truth: int,
) -> dict:
    split_counts = table["split"].value_counts()
    return {
        "train_images": int(split_counts.get("train", 0)),
        "test_images": int(split_counts.get("test", 0)),
        "classes": len(classes),
        "quarantined": len(quarantine),
        "exact_duplicates": dup_counts.get("duplicates", 0),
        "label_conflicts": dup_counts.get("label_conflicts", 0),
        "test_leakage": dup_counts.get("test_leakage", 0),
        "truth_rows": n_truth,
        "per_class": {
            split: {
                str(k): int(v)
                for k, v in table[table["split"] == split]["label"]
                .value_counts()
                .sort_index()
                .items()
            }
            for split in ("train", "test")
        },
        "quarantine_reasons": {
            str(kind): int(n)
            for kind, n in quarantine["reason"].map(_reason_kind).value_counts().items()
        },
    }


def _reason_kind(reason: str) -> str:
    return reason.split(":")[0].split("(")[0].strip()


def _row(path: str, split: str, reason: str) -> dict:
    return {"path": path, "split": split, "reason": reason}


def _rel(data_dir: Path, path: Path) -> str:
    try:
        return path.relative_to(data_dir).as_posix()
    except ValueError:
        return path.as_posix()


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _is_hidden(name: str) -> bool:
    return name.startswith(".")
