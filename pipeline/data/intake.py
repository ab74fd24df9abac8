"""Bringing files in from a folder the user did not make (init, add-pool).

Everything in such a folder is untrusted: names, links, bytes. Only image files are taken.
Links are never followed, so `cat/x.png -> ~/.ssh/id_rsa` stays where it is; hidden files,
special files (a FIFO would block the copy) and names that are not UTF-8 are left out, each
with its reason. Copies land in a hidden staging folder first and reach data/ by rename, and
`all_or_nothing` puts back what a command changed when it stops early (an error, Ctrl-C), so
an interrupted command leaves data/ and params.yaml as they were and a rerun does the job.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.core.names import file_name_problem, printable
from pipeline.data.images import IMAGE_EXTENSIONS, SYSTEM_FILES

STAGING_SUFFIX = ".partial"  # hidden staging folders: .<command>-<random>.partial


def image_files(folder: Path, skipped: list[str]) -> list[tuple[Path, str]]:
    """(file, its POSIX path inside folder) for every image file under folder, any depth;
    everything else under folder is named in `skipped` with the reason."""
    if not folder.is_dir():
        raise PipelineError(f"{printable(str(folder))} is not a folder")
    files = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        here = Path(dirpath)
        kept = []
        for name in sorted(dirnames):
            why = _why_not(here / name, folder=True)
            if why:
                skipped.append(f"{printable(str(here / name))}: {why}")
            else:
                kept.append(name)
        dirnames[:] = kept
        for name in sorted(filenames):
            path = here / name
            if name.lower() in SYSTEM_FILES:
                continue  # Thumbs.db, desktop.ini: the file manager's, never the user's data
            why = _why_not(path, folder=False)
            if why:
                skipped.append(f"{printable(str(path))}: {why}")
            else:
                files.append((path, path.relative_to(folder).as_posix()))
    return files


def _why_not(path: Path, *, folder: bool) -> str:
    """Why the entry at path is not brought in, or ""."""
    problem = file_name_problem(path.name)
    if problem:
        return problem
    if path.name.startswith("."):
        return "hidden folder" if folder else "hidden file"
    mode = os.lstat(path).st_mode
    if stat.S_ISLNK(mode):
        return "symbolic link (links are never followed)"
    if folder:
        return ""
    if not stat.S_ISREG(mode):
        return "not a regular file"
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return f"not an image file ({path.suffix or 'no extension'})"
    return ""


def refuse_overlap(source: Path, data_dir: Path) -> None:
    """A source that holds the project's data/ (or lies inside it) would copy into itself."""
    source, data = source.resolve(), data_dir.resolve()
    if source == data or source in data.parents:
        raise PipelineError(
            f"{source} contains the project's {data_dir}/: choose the folder of "
            f"the new images itself"
        )
    if data in source.parents:
        raise PipelineError(f"{source} is inside the project's {data_dir}/ already")


@contextmanager
def staging(parent: Path, command: str) -> Iterator[Path]:
    """A hidden folder in `parent` (the file system of data/, so a rename moves its contents
    into place), removed on exit. Git ignores it even when a kill leaves it behind; the next
    run of the command removes such leftovers."""
    parent.mkdir(parents=True, exist_ok=True)
    for leftover in parent.glob(f".{command}-*{STAGING_SUFFIX}"):
        shutil.rmtree(leftover, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{command}-", suffix=STAGING_SUFFIX, dir=parent))
    try:
        (folder / ".gitignore").write_text("*\n")
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def copy_file(source: Path, target: Path, *, link: bool) -> None:
    """Copy (or hard-link) one file; never follows a link at `source`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        if link:
            os.link(source, target, follow_symlinks=False)
        else:
            shutil.copy2(source, target, follow_symlinks=False)
    except OSError as exc:
        hint = " (hard links need the same file system; drop --link)" if link else ""
        raise PipelineError(
            f"cannot copy {printable(str(source))} to {target}: {exc.strerror or exc}{hint}"
        ) from None


class Changes:
    """What a command did to the project, in order, so that it can be undone."""

    def __init__(self) -> None:
        self.log: list[tuple[Path, Path | None]] = []  # (path created, None) or (moved to, from)

    def created(self, path: Path) -> None:
        self.log.append((path, None))

    def makedirs(self, folder: Path) -> None:
        """Create folder and its missing parents, each recorded (an undo leaves no empty one)."""
        missing = [p for p in [folder, *folder.parents] if not p.exists()]
        for path in reversed(missing):
            path.mkdir()
            self.created(path)

    def move(self, source: Path, target: Path) -> None:
        os.rename(source, target)
        self.log.append((target, source))

    def undo(self) -> None:
        for path, origin in reversed(self.log):
            if origin is not None:
                os.rename(path, origin)
            elif path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


@contextmanager
def all_or_nothing(files: list[Path]) -> Iterator[Changes]:
    """Run a block that rewrites `files` and records what else it creates or moves: if the
    block does not finish, whatever the reason (an error, Ctrl-C), the moves and creations are
    undone in reverse order and `files` get their bytes back (or go, if they did not exist)."""
    before = {path: path.read_bytes() if path.is_file() else None for path in files}
    changes = Changes()
    try:
        yield changes
    except BaseException:
        changes.undo()
        for path, data in before.items():
            if data is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(data)
        raise
