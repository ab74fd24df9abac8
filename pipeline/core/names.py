"""The rules for names that come from data: pool names, round keys and class names.

A pool name becomes part of a `dvc.yaml` command line (DVC runs it through a shell) and of a
path, so pool names (and round keys) follow a strict rule: letters, digits, `_`, `.` and `-`,
starting with a letter or a digit. Class names never reach a command line but become folders,
CSV cells (to_label.csv is opened in spreadsheets) and labels beside the words `keep`, `drop`
and `reject` in the decision files; people name classes "golden retriever" or "日本", so their
rule refuses only what breaks something: a path separator, a leading `.`, a leading `= + - @`
(a spreadsheet formula), control characters, bytes that are not UTF-8 and the RESERVED words.
Every such name is checked here, both where it is derived (init, add-pool, ingest's class
folders and manifests) and where params.yaml is read.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from pipeline.core.errors import PipelineError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # control characters (Unicode category Cc)
ROUND_KEY = re.compile(r"r[0-9]{3}")  # r000 .. r999: sorted by name is sorted by round
MAX_LENGTH = 64
FORMULA = ("=", "+", "-", "@")  # a cell starting with one of these is a spreadsheet formula
# Words the decision files use (overrides.csv: keep, drop; pseudo_overrides.csv: reject) and
# the review page's actions: a class with one of these names could not be chosen as a label.
RESERVED = frozenset({"keep", "drop", "reject", "relabel", "confirm", "flag"})
RULE = "letters, digits, '_', '.' and '-', starting with a letter or digit"


def name_problem(name: str) -> str:
    """Why `name` cannot be a pool name (or a study name), or "" when it can."""
    if not isinstance(name, str) or not name:
        return "empty name"
    if len(name) > MAX_LENGTH:
        return f"longer than {MAX_LENGTH} characters"
    if not NAME.fullmatch(name):
        return f"only {RULE}"
    return _reserved(name)


def class_name_problem(name: str) -> str:
    """Why `name` cannot be a class name, or "" when it can."""
    if not isinstance(name, str) or not name:
        return "empty name"
    if len(name) > MAX_LENGTH:
        return f"longer than {MAX_LENGTH} characters"
    if problem := file_name_problem(name):
        return problem
    if "/" in name or "\\" in name:
        return "a class name holds no '/' or '\\'"
    if name[0] in FORMULA or name[0] == "." or name != name.strip():
        return (
            f"a class name starts with no '.', {', '.join(FORMULA)} or space (a spreadsheet "
            f"reads a leading {', '.join(FORMULA)} as a formula) and ends with no space"
        )
    return _reserved(name)


def _reserved(name: str) -> str:
    if name.lower() in RESERVED:
        return f"{name!r} is a word the decision files use ({', '.join(sorted(RESERVED))})"
    return ""


def check_name(name: str, what: str, fix: str = "", *, rule: Callable = name_problem) -> str:
    """`name`, or a PipelineError naming `what` it is, why it fails (by `rule`: name_problem
    or class_name_problem) and `fix`."""
    problem = rule(name)
    if problem:
        raise PipelineError(f"{what} {name!r} is refused: {problem}" + (f"; {fix}" if fix else ""))
    return name


def check_round_key(key: str, where: str) -> str:
    if not isinstance(key, str) or not ROUND_KEY.fullmatch(key):
        raise PipelineError(f"{where}: round key {key!r} must be r followed by 3 digits (r001)")
    return key


def file_name_problem(name: str) -> str:
    """Why a file or folder name inside a class or pool folder cannot be brought in, or "".
    Such names only reach paths and quoted CSV cells, so most characters are fine; a name that
    is not UTF-8 (old zips) or holds a control character cannot be written to a CSV or shown."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "name is not valid UTF-8"
    if CONTROL.search(name):
        return "name contains a control character"
    return ""


def printable(text: str) -> str:
    """A file name or path as it can be shown and written in UTF-8 on one line: bytes that are
    not UTF-8 (Python carries them as surrogates, os.fsdecode) and control characters become
    backslash escapes, e.g. b"bad\\xff.png" -> "bad\\xff.png"; other text is unchanged."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no bytes decode to (a Windows name can hold one)
        raw = text.encode("utf-8", "backslashreplace")
    text = raw.decode("utf-8", "backslashreplace")
    return CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}", text)
