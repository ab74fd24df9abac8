"""The input contract: finding candidate images under data/, decoding them into packed sets,
confining user paths to data/, the truth file and stratified holdouts.

Shared by ingest (labeled and test images), pseudolabel (pools) and clean (overrides, the
validation split).
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.core.config import BaseConfig
from pipeline.core.errors import PipelineError
from pipeline.core.io import ShardWriter, atomic_dir
from pipeline.core.names import CONTROL, class_name_problem, file_name_problem, printable
from pipeline.data.images import (
    IMAGE_EXTENSIONS,
    SHAPE_SIZE,
    SIGNATURE_SIZE,
    SYSTEM_FILES,
    Decoded,
    Rejected,
    decode,
    max_file_bytes,
    too_large,
)

# --------------------------------------------------------------------------------------------
# 1) Scanning: which files are candidates, and why the others are not

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


# --------------------------------------------------------------------------------------------
# 2) Decoding: stream every candidate into one packed array

PARALLEL_FROM = 64  # files; a smaller set decodes inline (starting workers would cost more)
MAX_WORKERS = 8  # decoding processes at most: each holds a decoded photo; the parent writes all
TASKS_PER_WORKER = 2  # tasks queued per worker: it never waits, and memory stays flat
TASK_FILES = 32  # files one task decodes at most: small images share the cost of a round trip
#   (tasks stay a 16th of a worker's share, so the workers finish together)
TASK_MIB = 4.0  # decoded pixels one task returns at most


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
    workers: int | None = None,
    draft: bool = True,
) -> tuple[pd.DataFrame, list[dict]]:
    """Decode candidates into the packed image folder `out`; returns (table, quarantine rows).

    Images go to disk shard by shard as they are decoded, so memory stays flat however many
    there are; table row i is image i of `out`. `split` is one name for all or one per candidate.
    Each image's signature (images.signature, 512 bytes) goes to out/signatures.npy.
    `workers` decoding processes (default: decode_workers) read and decode the files, and the
    results come back in candidate order, so the output does not depend on it; draft=False
    decodes JPEGs at full size (images.decode; the old path, for comparison).
    """
    splits = [split] * len(candidates) if isinstance(split, str) else split
    records, quarantine, looks = [], [], []
    options = {
        "image_size": base.image_size,
        "channels": base.channels,
        "resize": base.resize,
        "max_pixels": max_pixels,
        "draft": draft,
    }
    paths = [data_dir / cand.path for cand in candidates]
    workers = decode_workers(len(paths)) if workers is None else workers
    with atomic_dir(out) as tmp, _decoding(paths, options, workers) as decoded:
        writer = ShardWriter(tmp, (base.image_size, base.image_size, base.channels), shard_mib)
        progress = tqdm(decoded, desc=desc, total=len(paths), unit="img", mininterval=1.0)
        for index, image in enumerate(progress):
            cand = candidates[index]
            if isinstance(image, str):
                quarantine.append(quarantine_row(cand.path, splits[index], image))
                continue
            writer.append(image.pixels)
            looks.append(image.signature.astype(np.float16))
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
        np.save(tmp / SIGNATURES, np.array(looks, np.float16).reshape(len(looks), SIGNATURE_SIZE))
    table = pd.DataFrame(records, columns=MANIFEST_COLUMNS[:-1])
    table["row"] = np.arange(len(table))
    return table, quarantine


def decode_workers(n_files: int) -> int:
    """Decoding processes for n_files: the cores this process may use, at most MAX_WORKERS
    and n_files; 1 (inline, no process started) below PARALLEL_FROM files."""
    if n_files < PARALLEL_FROM:
        return 1
    try:
        cores = len(os.sched_getaffinity(0))  # a container's or taskset's share, not the host's
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS, n_files))


@contextmanager
def _decoding(paths: list[Path], options: dict, workers: int) -> Iterator[Iterator[Decoded | str]]:
    """Yield an iterator over images.decode of each file, or its quarantine reason, in the
    order of `paths`.

    With workers > 1, worker processes read and decode the files; at most TASKS_PER_WORKER
    tasks per worker are queued or finished but not yet taken, so memory does not grow with
    the file count. The workers start here, before a progress bar starts its thread: fork()
    (Linux's default start method, which costs no start-up) copies only the calling thread.
    """
    if workers <= 1 or len(paths) <= 1:
        yield (_decode_file(path, options) for path in paths)
        return
    per_image = options["image_size"] ** 2 * options["channels"] + 1024  # + signature, names
    size = max(1, int(min(TASK_MIB * 2**20 // per_image, len(paths) // (16 * workers), TASK_FILES)))
    tasks = (paths[i : i + size] for i in range(0, len(paths), size))
    pool = ProcessPoolExecutor(workers)
    try:
        queued = deque(
            pool.submit(_decode_files, task, options)
            for task in islice(tasks, TASKS_PER_WORKER * workers)
        )

        def results() -> Iterator[Decoded | str]:
            while queued:
                try:
                    done = queued.popleft().result()
                except BrokenProcessPool:  # a worker killed (out of memory, say): one line
                    raise PipelineError(
                        "a decoding process died (out of memory?): free memory or lower "
                        "ingest.max_image_pixels, then rerun"
                    ) from None
                queued.extend(
                    pool.submit(_decode_files, task, options) for task in islice(tasks, 1)
                )
                yield from _unpack(done)

        yield results()
    finally:
        pool.shutdown(cancel_futures=True)


def _decode_files(paths: list[Path], options: dict) -> tuple:
    """A task's results in few objects, so sending them back costs little per image: (pixels
    (k, H, W, C), signatures (k, SIGNATURE_SIZE), one quarantine reason or (sha256, width,
    height, mode, note) per path, where k counts the decoded ones)."""
    results = [_decode_file(path, options) for path in paths]
    decoded = [r for r in results if not isinstance(r, str)]
    shape = (options["image_size"], options["image_size"], options["channels"])
    pixels = np.stack([r.pixels for r in decoded]) if decoded else np.empty((0, *shape), np.uint8)
    looks = np.array([r.signature for r in decoded], np.float32).reshape(-1, SIGNATURE_SIZE)
    rest = [
        r if isinstance(r, str) else (r.sha256, r.width, r.height, r.mode, r.note) for r in results
    ]
    return pixels, looks, rest


def _unpack(task: tuple) -> Iterator[Decoded | str]:
    """_decode_files' results one by one again, as _decode_file gave them."""
    pixels, looks, rest = task
    row = 0
    for item in rest:
        if isinstance(item, str):
            yield item
            continue
        sha256, width, height, mode, note = item
        yield Decoded(pixels[row], sha256, width, height, mode, note, looks[row])
        row += 1


def _decode_file(path: Path, options: dict) -> Decoded | str:
    """The decoded image, or the reason it goes to quarantine. A file larger than any image
    within max_pixels can be (images.max_file_bytes) is refused before it is read: up to
    MAX_WORKERS processes read one file each at a time."""
    limit = max_file_bytes(options["max_pixels"])
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                return too_large(size, options["max_pixels"])
            data = f.read(limit + 1)  # a file that grew since is caught by decode's own check
        return decode(data, **options)
    except Rejected as exc:
        return str(exc)
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"


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
# 3) Splits and the audit file


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


def read_csv_rows(path: Path) -> list[tuple[int, dict[str, str]]]:
    """(line number, row with stripped values) of a UTF-8 CSV with at least path,label."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = set(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise PipelineError(f"{path} is not a readable CSV: {exc}") from None
    if not {"path", "label"} <= columns:
        raise PipelineError(f"{path} needs a header with path,label")
    return [
        (line, {k: (v or "").strip() for k, v in row.items() if k is not None})
        for line, row in enumerate(rows, start=2)
    ]


# --------------------------------------------------------------------------------------------
# 4) Near copies: the same picture under other bytes (re-encoded, resized, cropped, re-saved)

SIGNATURES = "signatures.npy"
LEAKAGE_COLUMNS = ["path", "split", "copy_of", "copy_split", "distance", "kind", "action"]
SAMPLE = 2000  # rows whose nearest neighbour sets the scale of "near"
CHUNK_ROWS = 256  # query rows per similarity block: 256 x 100k float32 = 100 MiB


CANDIDATES = 5  # nearest shapes checked for colour and contrast
COLOUR_TOLERANCE = 0.03  # most a copy's mean red, green or blue moves (0..1)
CONTRAST_RATIO = 1.5  # most a copy's contrast changes, either way


def nearest(
    queries: np.ndarray, pool: np.ndarray, exclude_self: bool = False, k: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """(indices (N, k) of the k pool rows nearest in shape, their cosine distances (N, k)),
    nearest first, for each query signature (k=1: (N,) arrays).

    Exact and blockwise: CHUNK_ROWS queries against the whole pool at a time, so memory stays
    bounded; the cost grows with len(queries) * len(pool). With exclude_self, queries are the
    pool's own first rows and a row is never its own neighbour.
    """
    pool = np.asarray(pool[:, :SHAPE_SIZE], np.float32)
    k_found = min(k, len(pool) - int(exclude_self))
    index = np.full((len(queries), k), -1, np.int64)
    distance = np.full((len(queries), k), np.inf, np.float32)
    if k_found > 0:
        for start in range(0, len(queries), CHUNK_ROWS):
            block = np.asarray(queries[start : start + CHUNK_ROWS, :SHAPE_SIZE], np.float32)
            block = block @ pool.T
            if exclude_self:
                rows = np.arange(start, start + len(block))
                block[rows - start, rows] = -np.inf
            top = np.argpartition(-block, k_found - 1, axis=1)[:, :k_found]
            sims = np.take_along_axis(block, top, 1)
            order = np.argsort(-sims, axis=1)
            index[start : start + len(block), :k_found] = np.take_along_axis(top, order, 1)
            distance[start : start + len(block), :k_found] = 1.0 - np.take_along_axis(
                sims, order, 1
            )
    return (index[:, 0], distance[:, 0]) if k == 1 else (index, distance)


def copies_of(
    queries: np.ndarray, pool: np.ndarray, cutoff: float, exclude_self: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(index of the pool row each query is a copy of, or -1; the shapes' distance): the
    nearest of the CANDIDATES closest shapes within `cutoff` whose colour and contrast agree."""
    index, distance = nearest(queries, pool, exclude_self, k=CANDIDATES)
    partner = np.full(len(queries), -1, np.int64)
    found = np.full(len(queries), np.inf, np.float32)
    for q, p in zip(*np.nonzero((distance <= cutoff) & (index >= 0))):
        if partner[q] >= 0:
            continue  # a nearer candidate already matched
        a = np.asarray(queries[q, SHAPE_SIZE:], np.float32)
        b = np.asarray(pool[index[q, p], SHAPE_SIZE:], np.float32)
        contrast = max(a[3], b[3], 1e-3) / max(min(a[3], b[3]), 1e-3)
        if np.abs(a[:3] - b[:3]).max() <= COLOUR_TOLERANCE and contrast <= CONTRAST_RATIO:
            partner[q], found[q] = index[q, p], distance[q, p]
    return partner, found


def near_copy_cutoff(looks: np.ndarray, ratio: float, cap: float, seed: int) -> float:
    """Cosine distance under which two signatures are one picture: `ratio` times the median
    distance from an image to its nearest other image (a sample of SAMPLE), at most `cap`.

    How close distinct images lie depends on the data (8-px digits crowd together, photos do
    not); measured on real images, copies sit far below the median, distinct images above a
    fifth of it (see docs/near-copies.md).
    """
    if len(looks) < 3:
        return 0.0
    rng = np.random.default_rng(seed)
    sample = rng.permutation(len(looks))[:SAMPLE]
    order = np.concatenate([sample, np.setdiff1d(np.arange(len(looks)), sample)])
    _, distance = nearest(looks[sample], looks[order], exclude_self=True)
    return float(min(cap, ratio * np.median(distance)))


def leak(path, split, copy_of, copy_split, distance, kind, action="kept out of training") -> dict:
    """One row of a leakage table: an image set aside as a copy of a test image."""
    return dict(zip(LEAKAGE_COLUMNS, (path, split, copy_of, copy_split, distance, kind, action)))


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
