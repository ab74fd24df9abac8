"""The repository reads as a product: a short README whose links resolve, and no document,
comment, param or result that points at how the work was organised (an internal iteration
counter, a folder outside the repository) instead of at a commit or a docs page."""

import re

from .conftest import ROOT

CHECKED = ["README.md", "params.yaml", "docs", "pipeline", "bench"]
SUFFIXES = {".md", ".py", ".yaml", ".json", ".txt", ".csv"}
# What a reader outside the team cannot follow: "stop 28", "stop30.json", "../shared/tools",
# "/tmp/s35/...", "issue 14", "closing note", "the session", "no GPU was lent".
INTERNAL = re.compile(
    r"\bstops? ?\d+|stop\d+|\.\./shared|/tmp/s\d+|\bissues? \d+|closing note|\bsession\b|\blent\b",
    re.IGNORECASE,
)
README_LINES = 250


def checked_files():
    for name in CHECKED:
        path = ROOT / name
        if path.is_file():
            yield path
        else:
            yield from (p for p in sorted(path.rglob("*")) if p.suffix in SUFFIXES)


def test_nothing_refers_to_internal_counters_or_outside_folders():
    found = []
    for path in checked_files():
        rel = path.relative_to(ROOT).as_posix()
        if INTERNAL.search(rel):
            found.append(f"{rel}: the file's name")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            match = INTERNAL.search(line)
            if match:
                found.append(f"{rel}:{number}: {match.group(0)!r}")
    assert not found, "\n".join(found)


def test_the_check_catches_what_it_is_for():
    for text in ("as at stop 28", "stop30.json", "../shared/tools/as-a-user", "/tmp/s35/x",
                 "issue 14", "No GPU was lent"):  # fmt: skip
        assert INTERNAL.search(text), text
    for text in ("early stopping", "stops when the loss is flat", "issues.csv", "commit c4f2d8a"):
        assert not INTERNAL.search(text), text


def test_the_readme_is_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_LINES
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not re.match(r"[a-z]+://", target):
            assert (ROOT / target).exists(), f"README links to {target}, which is missing"
