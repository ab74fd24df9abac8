"""init: bring your own images into data/ and write the params that fit them.

    python -m pipeline init SRC [--test DIR] [--pool NAME=DIR ...] [--link] [--force]
                                [--backbone NAME] [--weights imagenet|none|FILE]

SRC is either
  a folder   SRC/<class>/** or SRC/labeled/<class>/**, optional SRC/test/<class>/**,
             SRC/unlabeled/<pool>/** and SRC/truth.csv (path,true_label, for the audit), or
  a CSV      path,label[,split]  paths relative to the CSV's folder; split is train or test.
--test is a class-folder tree of test images, --pool NAME=DIR a folder of unlabeled images.

Files are copied (or hard-linked with --link) into data/labeled/, data/test/ and
data/unlabeled/<pool>/, each tracked with `dvc add`. params.yaml (comments kept) gets
base.image_size from the images' sizes, base.channels and augment.hsv.p from their colour,
train.model's backbone (pipeline/tools/init_params.py: a pretrained one for photos, with
--backbone NAME and --weights imagenet|none|FILE to choose) and one round per pool. Nothing is decoded for training here: ingest still checks every file
and quarantines what it cannot use; init only reads headers (and a sample for colour) to choose
the params and warn early. A data/ that already holds a dataset is refused unless --force,
which moves it aside into data-before-init-<time>/, never deletes it.
"""

from __future__ import annotations

import logging
import shlex
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from pipeline.core.config import load_params
from pipeline.core.errors import PipelineError
from pipeline.core.io import dvc_add
from pipeline.core.names import (
    check_name,
    class_name_problem,
    file_name_problem,
    name_problem,
    printable,
)
from pipeline.data.image_stats import inspect
from pipeline.data.images import IMAGE_EXTENSIONS, SYSTEM_FILES
from pipeline.data.inputs import read_csv_rows
from pipeline.data.intake import (
    Changes,
    all_or_nothing,
    copy_file,
    image_files,
    refuse_overlap,
    staging,
)
from pipeline.tools.init_params import apply_params, choose_backbone, choose_params

log = logging.getLogger(__name__)

RESERVED = ("labeled", "test", "unlabeled")  # folder names inside SRC that are not classes
DATASET = (  # what data/ holds of one dataset; --force moves all of it aside
    "labeled",
    "test",
    "unlabeled",
    "truth.csv",
    "overrides.csv",
    "pseudo_overrides.csv",
    "test_audit.csv",
    "added_labels.csv",
)
ASIDE_PREFIX = "data-before-init-"  # init --force moves the old dataset to <this><time>/


@dataclass
class Source:
    # (file, class, its path inside the class folder): data/labeled/<class>/<that path>
    labeled: list[tuple[Path, str, str]] = field(default_factory=list)
    test: list[tuple[Path, str, str]] = field(default_factory=list)
    pools: dict[str, list[tuple[Path, str]]] = field(default_factory=dict)  # (file, inner path)
    skipped: list[str] = field(default_factory=list)  # not images, or not in a class folder
    truth: Path | None = None  # SRC/truth.csv


def run(
    source: Path,
    *,
    test: Path | None = None,
    pools: list[str] | None = None,
    link: bool = False,
    force: bool = False,
    data_dir: Path = Path("data"),
    params_path: Path = Path("params.yaml"),
    register: bool = True,
    backbone: str | None = None,
    weights: str | None = None,
) -> dict:
    """Copy the user's images into data_dir, write params from them; returns the summary."""
    source, data_dir = Path(source), Path(data_dir)
    for folder in [source] + ([Path(test)] if test else []):
        if folder.is_dir():
            refuse_overlap(folder, data_dir)
    found = read_source(source)
    if test is not None:
        found.test = class_files(Path(test), found.skipped)
    for item in pools or []:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise PipelineError(f"--pool {item!r}: expected NAME=DIR")
        check_name(name, "--pool NAME")
        refuse_overlap(Path(folder), data_dir)
        found.pools[name] = image_files(Path(folder), found.skipped)
    check(found)
    if not params_path.is_file():
        raise PipelineError(f"params file not found: {params_path}")
    max_pixels = load_params(params_path).ingest.max_image_pixels
    stats = inspect([p for p, _, _ in found.labeled + found.test], max_pixels)
    chosen = choose_params(stats)
    model = choose_backbone(chosen, stats["short_side"]["median"], backbone, weights)
    chosen |= {k: v for k, v in model.items() if k != "why"}
    chosen["why"] |= model["why"]

    # Copy into a staging folder, then swap it in: until the swap, data/ is untouched, and
    # every change after it (the old data moved aside, params.yaml, dvc add) is undone if the
    # command stops early, Ctrl-C included.
    tracked = ["labeled"] + (["test"] if found.test else [])
    tracked += ["truth.csv"] if found.truth else []
    tracked += [f"unlabeled/{p}" for p in found.pools]
    touched = [params_path, *(data_dir / n for n in (".gitignore", "unlabeled/.gitignore"))]
    touched += [data_dir / f"{p}.dvc" for p in tracked]
    with staging(data_dir, "init") as stage, all_or_nothing(touched) as changes:
        write_files(found, stage, link)
        moved = make_room(data_dir, force, changes)
        for name in [n for n in DATASET if (stage / n).exists()]:
            if name != "unlabeled":
                changes.move(stage / name, data_dir / name)
                continue
            if not (data_dir / name).is_dir():
                (data_dir / name).mkdir()
                changes.created(data_dir / name)
            for pool in sorted((stage / name).iterdir()):
                changes.move(pool, data_dir / name / pool.name)
        apply_params(params_path, chosen, list(found.pools))
        if register:
            dvc_add(data_dir, tracked)
    summary = {
        "classes": dict(sorted(Counter(label for _, label, _ in found.labeled).items())),
        "test": len(found.test),
        "pools": {name: len(files) for name, files in found.pools.items()},
        "skipped": found.skipped,
        "unreadable": stats["unreadable"],
        "too_large": stats["too_large"],
        "formats": stats["formats"],
        "short_side": stats["short_side"],
        "colour_share": stats["colour_share"],
        "params": chosen,
        "moved_aside": str(moved) if moved else None,
        "truth": bool(found.truth),
    }
    return summary


# --------------------------------------------------------------------------------------------
# Reading the source


def read_source(source: Path) -> Source:
    if source.is_file():
        return read_csv_source(source)
    if not source.is_dir():
        raise PipelineError(f"{source} is neither a folder of class folders nor a CSV file")
    found = Source()
    labeled = source / "labeled" if (source / "labeled").is_dir() else source
    found.labeled = class_files(labeled, found.skipped, skip=RESERVED)
    truth = source / "truth.csv"
    if truth.is_file() and not truth.is_symlink():
        found.truth = truth
    elif truth.is_symlink():
        found.skipped.append(f"{truth}: symbolic link (links are never followed)")
    if (source / "test").is_dir() and not (source / "test").is_symlink():
        found.test = class_files(source / "test", found.skipped)
    unlabeled = source / "unlabeled"
    if unlabeled.is_dir() and not unlabeled.is_symlink():
        for folder in sorted(unlabeled.iterdir()):
            if not folder.is_dir() and not folder.is_symlink():
                found.skipped.append(f"{printable(str(folder))}: not inside a pool folder")
                continue
            why = _why_not_folder(folder) or name_problem(folder.name)
            if why:  # the fix is pasted into a shell: the folder's name is quoted for it
                found.skipped.append(
                    f"pool folder {printable(str(folder))}: {why}; "
                    f"bring it in with --pool NAME={shlex.quote(printable(str(folder)))}"
                )
            else:
                found.pools[folder.name] = image_files(folder, found.skipped)
    return found


def _why_not_folder(entry: Path) -> str:
    """Why entry cannot be a class or pool folder (before its name is checked), or ""."""
    if entry.is_symlink():
        return "symbolic link (links are never followed)"
    if not entry.is_dir():
        return "not inside a class folder"
    return file_name_problem(entry.name) or ("hidden folder" if entry.name[0] == "." else "")


def read_csv_source(path: Path) -> Source:
    """The rows of a path,label[,split] CSV whose paths name image files inside its folder;
    every other row is named in `skipped` with the reason."""
    root = path.parent.resolve()
    found = Source()
    for line, row in read_csv_rows(path):
        rel, label, split = row["path"], row["label"], row.get("split") or "train"
        where = f"{path.name}:{line}"
        if not rel or not label:
            found.skipped.append(f"{where}: no path or no label")
            continue
        if split not in ("train", "test"):
            raise PipelineError(f"{where}: split {split!r} must be train or test")
        why = file_name_problem(rel)
        if not why and class_name_problem(label):
            why = f"label {label!r} is refused: {class_name_problem(label)}"
        pure = PurePosixPath(rel.replace("\\", "/"))
        if not why and (pure.is_absolute() or ".." in pure.parts):
            why = "escapes the CSV's folder (refused)"
        target = root / pure
        if not why:
            why = _why_not_file(target, root)
        if why:
            found.skipped.append(f"{where}: {printable(rel)}: {why}")
            continue
        (found.test if split == "test" else found.labeled).append((target, label, target.name))
    return found


def _why_not_file(target: Path, root: Path) -> str:
    """Why a CSV row's file cannot be brought in, or "": it must be an image file inside root
    that no link leads to (a link inside the folder could still point at ~/.ssh)."""
    if any(p.is_symlink() for p in [target, *target.parents] if root in p.parents):
        return "symbolic link (links are never followed)"
    if not target.is_file() or target.suffix.lower() not in IMAGE_EXTENSIONS:
        return "no such image file"
    return ""


def class_files(
    root: Path, skipped: list[str], skip: tuple[str, ...] = ()
) -> list[tuple[Path, str, str]]:
    """(file, class, path inside the class folder) for every image under root/<class>/."""
    if not root.is_dir():
        raise PipelineError(f"{printable(str(root))} is not a folder")
    out = []
    for entry in sorted(root.iterdir()):
        if entry.name in skip and entry.is_dir() and not entry.is_symlink():
            continue
        if entry.name.lower() in SYSTEM_FILES | {"truth.csv"}:
            continue
        why = _why_not_folder(entry)
        if not why and class_name_problem(entry.name):
            why = f"not a class name: {class_name_problem(entry.name)}; rename the folder"
        if why:
            skipped.append(f"{printable(str(entry))}: {why}")
        else:
            out += [(f, entry.name, inner) for f, inner in image_files(entry, skipped)]
    return out


def check(found: Source) -> None:
    classes = Counter(label for _, label, _ in found.labeled)
    if not classes:
        skipped = f" (skipped: {found.skipped[0]}" if found.skipped else ""
        skipped += (
            f" and {len(found.skipped) - 1} more)"
            if len(found.skipped) > 1
            else ")" * bool(skipped)
        )
        raise PipelineError(
            f"no labeled image found: expected SRC/<class>/<image> or a CSV{skipped}"
        )
    if len(classes) == 1:
        raise PipelineError(f"only one class ({next(iter(classes))!r}): a classifier needs two")
    for name in [*classes, *(label for _, label, _ in found.test)]:
        check_name(name, "class", rule=class_name_problem)
    unknown = {label for _, label, _ in found.test} - set(classes)
    if unknown:
        raise PipelineError(f"test classes without labeled images: {', '.join(sorted(unknown))}")
    for name, files in found.pools.items():
        if not files:
            raise PipelineError(f"pool {name!r} holds no image files")


# --------------------------------------------------------------------------------------------
# Writing data/


def make_room(data_dir: Path, force: bool, changes: Changes) -> Path | None:
    """Refuse a data/ holding a dataset, or (force) move it aside; returns where it went. The
    set-aside folder ignores itself for git and DVC: a `git add -A` must not commit old
    images."""
    # a fresh clone's data/ holds only a header-only overrides.csv: nothing to keep
    present = [n for n in DATASET if (data_dir / n).exists() and not _header_only(data_dir / n)]
    if not present:
        return None
    if not force:
        raise PipelineError(
            f"{data_dir} already holds a dataset ({', '.join(present)}); "
            f"--force moves it aside (nothing is deleted)"
        )
    aside = data_dir.parent / f"{ASIDE_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir()
    changes.created(aside)
    for ignore in (".gitignore", ".dvcignore"):
        (aside / ignore).write_text("*\n")
    for name in DATASET:
        for path in (data_dir / name, data_dir / f"{name}.dvc"):
            if path.exists():
                changes.move(path, aside / path.name)
    artifacts = data_dir.parent / "artifacts"  # models and reports of the old dataset
    if artifacts.is_dir():
        changes.move(artifacts, aside / "artifacts")
    return aside


def _header_only(path: Path) -> bool:
    return path.is_file() and path.suffix == ".csv" and len(path.read_text().splitlines()) <= 1


def write_files(found: Source, data_dir: Path, link: bool) -> None:
    for split, rows in (("labeled", found.labeled), ("test", found.test)):
        used: set[Path] = set()
        for path, label, inner in rows:
            copy_file(path, _free(data_dir / split / label / inner, used), link=link)
    for name, files in found.pools.items():
        used = set()
        for path, inner in files:
            copy_file(path, _free(data_dir / "unlabeled" / name / inner, used), link=link)
    if found.truth:  # its paths name SRC's layout: they match data/'s for a labeled/ source
        copy_file(found.truth, data_dir / "truth.csv", link=False)


def _free(target: Path, used: set[Path]) -> Path:
    """target, or target with a _N suffix when two source files share a name."""
    n, candidate = 1, target
    while candidate in used:
        candidate = target.with_name(f"{target.stem}_{n}{target.suffix}")
        n += 1
    used.add(candidate)
    return candidate


def describe(summary: dict) -> str:
    """The summary init prints: what was found, what was chosen and why, what to run next."""
    classes = summary["classes"]
    counts = list(classes.values())
    lines = [
        f"init: {sum(counts)} labeled images in {len(classes)} classes "
        f"({min(counts)} to {max(counts)} per class, imbalance {max(counts) / min(counts):.1f}x)",
        "  " + ", ".join(f"{c}: {n}" for c, n in classes.items()),
        f"  test: {summary['test']} images"
        if summary["test"]
        else "  test: none; ingest holds out ingest.test_fraction of the labeled images",
        "  pools: "
        + (
            ", ".join(f"{p} ({n})" for p, n in summary["pools"].items())
            or "none yet (add one later with `python -m pipeline add-pool DIR`)"
        ),
        f"  formats: {', '.join(f'{k} {v}' for k, v in summary['formats'].items())}; short side "
        f"{summary['short_side']['min']}-{summary['short_side']['max']} px "
        f"(median {summary['short_side']['median']:.0f})",
    ]
    for title, items in (
        ("unreadable, ingest will quarantine them", summary["unreadable"]),
        ("over ingest.max_image_pixels, ingest will quarantine them", summary["too_large"]),
        ("skipped, not copied", summary["skipped"]),
    ):
        if items:
            lines.append(
                f"  {len(items)} {title}: "
                + "; ".join(items[:5])
                + (" ..." if len(items) > 5 else "")
            )
    lines.append("  params.yaml:")
    for key, why in summary["params"]["why"].items():
        lines.append(f"    {key}: {summary['params'][key]}  ({why})")
    if summary["params"]["base.channels"] == 3:
        lines.append(
            "    augment.hflip.p stays 0: set it to 0.5 if a mirrored image keeps its class"
        )
    if summary["moved_aside"]:
        lines.append(f"  the previous dataset was moved to {summary['moved_aside']}")
    lines.append(
        "next: git add -A && git commit -m 'my data' && dvc repro"
        "   (then open artifacts/summary/index.html)"
    )
    return "\n".join(lines)
