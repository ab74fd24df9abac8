"""Reading and writing artifacts. Every write is atomic: a temporary file, then a rename, so a
stage killed mid-write leaves the old file or none, never half of one."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.errors import PipelineError

log = logging.getLogger(__name__)


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
        os.chmod(tmp, _mode_for(path, 0o666))  # mkstemp's 0600 would stick to the file
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
        os.chmod(tmp, _mode_for(path, 0o777))  # mkdtemp's 0700 would stick to the folder
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


def _mode_for(path: Path, default: int) -> int:
    """The permission bits a replaced file keeps: the old file's, else `default` less the
    umask (what open() would have given a new file)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return default & ~_umask()


def _umask() -> int:
    # Linux shows the umask in /proc; elsewhere it is read by setting it (briefly).
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
    with atomic_path(path) as tmp:
        save_npy(tmp, array)


def save_npy(path: Path, array: np.ndarray) -> None:
    """np.save, but a full disk raises OSError(ENOSPC): numpy's own writer reports it as a
    short write without the cause."""
    array = np.ascontiguousarray(array)
    if array.dtype.hasobject:
        raise TypeError("refusing to save Python objects in a .npy artifact")
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(array))
        f.write(array.reshape(-1).view(np.uint8).data if array.size else b"")


def read_array(path: str | Path, mmap: bool = True) -> np.ndarray | PackedImages:
    """A .npy file (memory-mapped unless mmap=False), or a packed image folder."""
    path = Path(path)
    if (path / "index.json").is_file():
        return PackedImages(path)
    if not path.is_file():
        raise PipelineError(f"missing input {path}: run the stage that writes it first")
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


# --------------------------------------------------------------------------------------------
# Packed image sets: a folder of .npy shards plus index.json, read as one array


class ShardWriter:
    """Append images to a new packed image folder, one .npy shard per `shard_mib` MiB.

    Memory holds one shard at most, whatever the number of images; `close()` writes the last
    shard and index.json. Use it inside atomic_dir, so a failed write leaves no folder behind.
    """

    def __init__(self, folder: Path, image_shape: tuple[int, ...], shard_mib: float = 64.0):
        self.folder, self.image_shape = Path(folder), tuple(image_shape)
        self.folder.mkdir(parents=True, exist_ok=True)
        per_image = int(np.prod(self.image_shape))
        self.shard_size = max(1, int(shard_mib * 2**20) // per_image)
        self.buffer = np.empty((0, *self.image_shape), np.uint8)  # grown as images arrive
        self.fill, self.shards = 0, []

    def append(self, image: np.ndarray) -> None:
        if self.fill == len(self.buffer):
            size = min(self.shard_size, max(1024, 2 * len(self.buffer)))
            grown = np.empty((size, *self.image_shape), np.uint8)
            grown[: self.fill] = self.buffer[: self.fill]
            self.buffer = grown
        self.buffer[self.fill] = image
        self.fill += 1
        if self.fill == self.shard_size:
            self._flush()

    def extend(self, images: np.ndarray) -> None:
        for image in images:
            self.append(image)

    def _flush(self) -> None:
        name = f"{len(self.shards):06d}.npy"
        save_npy(self.folder / name, self.buffer[: self.fill])
        self.shards.append({"file": name, "count": self.fill})
        self.fill = 0

    def close(self) -> int:
        """Write the last shard and the index; returns the number of images."""
        if self.fill:
            self._flush()
        self.buffer = np.empty((0, *self.image_shape), np.uint8)
        count = sum(s["count"] for s in self.shards)
        index = {"count": count, "image_shape": list(self.image_shape), "shards": self.shards}
        (self.folder / "index.json").write_text(json.dumps(index, indent=1) + "\n")
        return count


class PackedImages:
    """A packed image folder read as one uint8 array (N, H, W, C).

    Indexing with an int, a slice or an array of indices returns numpy arrays. Shards are
    memory-mapped only while an index touches them, so reading in chunks keeps memory flat
    however large the set is.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = read_json(self.folder / "index.json")
        self.files = [self.folder / s["file"] for s in index["shards"]]
        self.starts = np.cumsum([0] + [s["count"] for s in index["shards"]])
        self.shape = (int(index["count"]), *index["image_shape"])
        self.dtype = np.dtype(np.uint8)
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))

    def _shard(self, k: int) -> np.ndarray:
        return np.load(self.files[k], mmap_mode="r", allow_pickle=False)

    def __getitem__(self, key):
        if isinstance(key, int | np.integer):
            i = int(key) + len(self) if key < 0 else int(key)
            if not 0 <= i < len(self):
                raise IndexError(f"image {key} of {len(self)}")
            k = int(np.searchsorted(self.starts, i, side="right")) - 1
            return np.array(self._shard(k)[i - self.starts[k]])
        if isinstance(key, slice):
            key = np.arange(*key.indices(len(self)))
        key = np.asarray(key)
        if key.dtype == bool:
            key = np.flatnonzero(key)
        key = np.where(key < 0, key + len(self), key).astype(np.int64)
        if len(key) and (key.min() < 0 or key.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} images")
        out = np.empty((len(key), *self.shape[1:]), self.dtype)
        which = np.searchsorted(self.starts, key, side="right") - 1
        for k in np.unique(which):
            picked = which == k
            out[picked] = self._shard(int(k))[key[picked] - self.starts[k]]
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self[:]
        return array if dtype is None else array.astype(dtype)


class Rows:
    """source[rows] without reading it: a lazy view of some rows of an array or a packed folder.

    Slicing and index arrays read only what they touch, so predicting over a view in chunks
    keeps memory flat.
    """

    def __init__(self, source, rows: np.ndarray):
        self.source, self.rows = source, np.asarray(rows, dtype=np.int64)
        self.shape = (len(self.rows), *source.shape[1:])
        self.dtype = np.dtype(np.uint8)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key):
        picked = self.rows[key]
        return self.source[int(picked)] if np.ndim(picked) == 0 else self.source[picked]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = np.asarray(self.source[self.rows])
        return array if dtype is None else array.astype(dtype)


def write_packed(
    path: str | Path, source, rows: np.ndarray, shard_mib: float = 64.0, chunk: int = 8192
) -> None:
    """Write source[rows] (a packed folder or an array) as a new packed folder, atomically."""
    rows = np.asarray(rows, dtype=np.int64)
    with atomic_dir(path) as tmp:
        writer = ShardWriter(tmp, source.shape[1:], shard_mib)
        for start in range(0, len(rows), chunk):
            writer.extend(source[rows[start : start + chunk]])
        writer.close()


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


def stale_stages(run_audit: bool = False) -> list[str]:
    """Stages `dvc repro` would run now, less audit's standing "always changed" (empty outside
    a DVC repo). run_audit first runs the audit stage, which copies data/'s decision files where
    the stages depend on them, so edits to those files show."""
    if not Path(".dvc").is_dir():
        return []
    dvc = [sys.executable, "-m", "dvc"]
    if run_audit:
        subprocess.run([*dvc, "repro", "--single-item", "audit"], capture_output=True, text=True)
    result = subprocess.run([*dvc, "status", "--json"], capture_output=True, text=True)
    try:
        status = json.loads(result.stdout or "{}")
    except json.JSONDecodeError:
        return []
    return sorted(k for k, v in status.items() if v != ["always changed"])


def dvc_add(data_dir: Path, paths: list[str]) -> None:
    """Track data folders with DVC (not git), when data_dir lies in a DVC repo."""
    if not any(
        (parent / ".dvc").is_dir() for parent in [data_dir.resolve(), *data_dir.resolve().parents]
    ):
        log.warning(
            "not inside a DVC repo: %s is not tracked (run `dvc init` and `dvc add`)", data_dir
        )
        return
    targets = [str(data_dir / p) for p in paths]
    result = subprocess.run(
        [sys.executable, "-m", "dvc", "add", "--quiet", *targets], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise PipelineError(f"dvc add failed: {result.stderr.strip().splitlines()[-1:]}")
