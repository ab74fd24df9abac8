"""Reading and writing artifacts. Every write is atomic: a temporary file, then a rename, so a
stage killed mid-write leaves the old file or none, never half of one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.lib.format import open_memmap

from pipeline.errors import PipelineError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise PipelineError(f"cannot write {path}: {exc.strerror or exc}") from None
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        raise PipelineError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder that replaces folder `path` as a whole if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as exc:
        raise PipelineError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        raise PipelineError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def edit_yaml(path: str | Path, edit: Callable[[Any], None]) -> None:
    """Apply `edit` to the YAML document at `path` in place, keeping its comments and order.

    ruamel's round-trip loader is a safe loader (no arbitrary objects); the write is atomic.
    """
    from ruamel.yaml import YAML

    path = Path(path)
    editor = YAML()
    editor.preserve_quotes = True
    doc = editor.load(path.read_text(encoding="utf-8"))
    edit(doc)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        editor.dump(doc, f)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"missing input {path}: run the stage that writes it first")
    return json.loads(path.read_text(encoding="utf-8"))


def write_table(path: str | Path, table: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a CSV artifact; string columns stay strings (a class named "1" is not a number)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"missing input {path}: run the stage that writes it first")
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def write_array(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)


def create_array(path: str | Path, shape: tuple[int, ...], dtype=np.uint8) -> np.memmap:
    """A new .npy file of `shape`, memory-mapped for writing, its disk space reserved up front.

    Writing into a sparse memory map on a full disk kills the process with SIGBUS; reserving
    the space first turns that into an OSError (ENOSPC) here, before any image is written.
    """
    array = open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    with open(path, "r+b") as f:
        os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    return array


def read_array(path: str | Path, mmap: bool = True) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"missing input {path}: run the stage that writes it first")
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
