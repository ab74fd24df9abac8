"""Decoding candidates into a packed image folder: each image streamed to disk shard by shard,
in worker processes for a large set, with its signature (signatures.npy) and its table row
(MANIFEST_COLUMNS). Shared by ingest (labeled and test images) and pseudolabel (pools).
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from itertools import islice
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.core.config import BaseConfig
from pipeline.core.errors import PipelineError
from pipeline.core.io import ShardWriter, atomic_dir
from pipeline.data.images import (
    SIGNATURE_SIZE,
    Decoded,
    Rejected,
    decode,
    max_file_bytes,
    too_large,
)
from pipeline.data.near_copies import SIGNATURES
from pipeline.data.scan import Candidate, quarantine_row

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
        yield (decode_file(path, options) for path in paths)
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
    results = [decode_file(path, options) for path in paths]
    decoded = [r for r in results if not isinstance(r, str)]
    shape = (options["image_size"], options["image_size"], options["channels"])
    pixels = np.stack([r.pixels for r in decoded]) if decoded else np.empty((0, *shape), np.uint8)
    looks = np.array([r.signature for r in decoded], np.float32).reshape(-1, SIGNATURE_SIZE)
    rest = [
        r if isinstance(r, str) else (r.sha256, r.width, r.height, r.mode, r.note) for r in results
    ]
    return pixels, looks, rest


def _unpack(task: tuple) -> Iterator[Decoded | str]:
    """_decode_files' results one by one again, as decode_file gave them."""
    pixels, looks, rest = task
    row = 0
    for item in rest:
        if isinstance(item, str):
            yield item
            continue
        sha256, width, height, mode, note = item
        yield Decoded(pixels[row], sha256, width, height, mode, note, looks[row])
        row += 1


def decode_file(path: Path, options: dict) -> Decoded | str:
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
