"""init: bring your own images into data/ and write the params that fit them.

    python -m pipeline init SRC [--test DIR] [--pool NAME=DIR ...] [--link] [--force]

SRC is either
  a folder   SRC/<class>/** or SRC/labeled/<class>/**, optional SRC/test/<class>/**,
             SRC/unlabeled/<pool>/** and SRC/truth.csv (path,true_label, for the audit), or
  a CSV      path,label[,split]  paths relative to the CSV's folder; split is train or test.
--test is a class-folder tree of test images, --pool NAME=DIR a folder of unlabeled images.

Files are copied (or hard-linked with --link) into data/labeled/, data/test/ and
data/unlabeled/<pool>/, each tracked with `dvc add`. params.yaml (comments kept) gets
base.image_size from the images' sizes, base.channels and augment.hsv.p from their colour,
and one round per pool. Nothing is decoded for training here: ingest still checks every file
and quarantines what it cannot use; init only reads headers (and a sample for colour) to choose
the params and warn early. A data/ that already holds a dataset is refused unless --force,
which moves it aside into data-before-init-<time>/, never deletes it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from pipeline.config import is_plain_name, load_params
from pipeline.errors import PipelineError
from pipeline.image_stats import fitting_shape, inspect
from pipeline.images import IMAGE_EXTENSIONS, SYSTEM_FILES
from pipeline.inputs import read_csv_rows
from pipeline.io import dvc_add, edit_yaml
from pipeline.pools import write_rounds

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
TINY_SIDE = 24  # px: below, CleanVision's low-information threshold would flag nearly every image


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
) -> dict:
    """Copy the user's images into data_dir, write params from them; returns the summary."""
    source, data_dir = Path(source), Path(data_dir)
    found = read_source(source)
    if test is not None:
        found.test = class_files(Path(test), found.skipped)
    for item in pools or []:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise PipelineError(f"--pool {item!r}: expected NAME=DIR")
        found.pools[name] = image_files(Path(folder), found.skipped)
    check(found)
    if not params_path.is_file():
        raise PipelineError(f"params file not found: {params_path}")
    max_pixels = load_params(params_path).ingest.max_image_pixels
    stats = inspect([p for p, _, _ in found.labeled + found.test], max_pixels)
    chosen = choose_params(stats)

    moved = make_room(data_dir, force)
    write_files(found, data_dir, link)
    apply_params(params_path, chosen, list(found.pools))
    if register:
        tracked = ["labeled"] + (["test"] if found.test else [])
        tracked += ["truth.csv"] if found.truth else []
        dvc_add(data_dir, tracked + [f"unlabeled/{p}" for p in found.pools])
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
    if (source / "truth.csv").is_file():
        found.truth = source / "truth.csv"
    if (source / "test").is_dir():
        found.test = class_files(source / "test", found.skipped)
    if (source / "unlabeled").is_dir():
        for folder in sorted(p for p in (source / "unlabeled").iterdir() if p.is_dir()):
            found.pools[folder.name] = image_files(folder, found.skipped)
    return found


def read_csv_source(path: Path) -> Source:
    root = path.parent.resolve()
    found = Source()
    for line, row in read_csv_rows(path):
        rel, label, split = row["path"], row["label"], row.get("split") or "train"
        if not rel or not label:
            found.skipped.append(f"{path.name}:{line}: no path or no label")
            continue
        pure = PurePosixPath(rel.replace("\\", "/"))
        target = (root / pure).resolve()
        if pure.is_absolute() or root not in target.parents:
            raise PipelineError(f"{path.name}:{line}: {rel!r} escapes {root} (refused)")
        if split not in ("train", "test"):
            raise PipelineError(f"{path.name}:{line}: split {split!r} must be train or test")
        if not target.is_file() or target.suffix.lower() not in IMAGE_EXTENSIONS:
            found.skipped.append(f"{rel}: no such image file")
            continue
        (found.test if split == "test" else found.labeled).append((target, label, target.name))
    return found


def class_files(
    root: Path, skipped: list[str], skip: tuple[str, ...] = ()
) -> list[tuple[Path, str, str]]:
    """(file, class, path inside the class folder) for every image under root/<class>/."""
    if not root.is_dir():
        raise PipelineError(f"{root} is not a folder")
    out = []
    for entry in sorted(root.iterdir()):
        if entry.name in skip and entry.is_dir():
            continue
        if entry.is_dir() and not entry.name.startswith("."):
            out += [(f, entry.name, inner) for f, inner in image_files(entry, skipped)]
        elif entry.name.lower() not in SYSTEM_FILES | {"truth.csv"} and entry.name[0] != ".":
            skipped.append(f"{entry}: not inside a class folder")
    return out


def image_files(folder: Path, skipped: list[str]) -> list[tuple[Path, str]]:
    """(file, its POSIX path inside folder) for every image file under folder, any depth."""
    if not folder.is_dir():
        raise PipelineError(f"{folder} is not a folder")
    files = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith(".") or name.lower() in SYSTEM_FILES:
                continue
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                files.append((path, path.relative_to(folder).as_posix()))
            else:
                skipped.append(f"{path}: not an image file")
    return files


def check(found: Source) -> None:
    classes = Counter(label for _, label, _ in found.labeled)
    if not classes:
        raise PipelineError("no labeled image found: expected SRC/<class>/<image> or a CSV")
    if len(classes) == 1:
        raise PipelineError(f"only one class ({next(iter(classes))!r}): a classifier needs two")
    for name in [*classes, *(label for _, label, _ in found.test), *found.pools]:
        if not is_plain_name(name):
            raise PipelineError(f"{name!r} cannot be a folder name under data/ (no '/', no '.')")
    unknown = {label for _, label, _ in found.test} - set(classes)
    if unknown:
        raise PipelineError(f"test classes without labeled images: {', '.join(sorted(unknown))}")
    for name, files in found.pools.items():
        if not files:
            raise PipelineError(f"pool {name!r} holds no image files")


# --------------------------------------------------------------------------------------------
# Inspecting the images and choosing params


def choose_params(stats: dict) -> dict:
    """base.image_size, base.channels, augment.hsv.p, clean.quality.low_information and the
    reason for each."""
    shape = fitting_shape(stats)
    colour = shape["channels"] == 3
    tiny = stats["short_side"]["median"] < TINY_SIDE
    return {
        "base.image_size": shape["image_size"],
        "base.channels": shape["channels"],
        "augment.hsv.p": 0.5 if colour else 0.0,
        "clean.quality.low_information": 0.15 if tiny else 0.3,
        "why": {
            "clean.quality.low_information": (
                f"images under {TINY_SIDE} px hold little information by nature"
                if tiny
                else "CleanVision's own threshold, which suits images of this size"
            ),
            "base.image_size": shape["why"]["image_size"],
            "base.channels": shape["why"]["channels"],
            "augment.hsv.p": "HSV shifts for colour images" if colour else "grayscale: no HSV",
        },
    }


def apply_params(params_path: Path, chosen: dict, pools: list[str]) -> None:
    def update(doc) -> None:
        doc["base"]["image_size"] = chosen["base.image_size"]
        doc["base"]["channels"] = chosen["base.channels"]
        doc["augment"]["hsv"]["p"] = chosen["augment.hsv.p"]
        doc["clean"]["quality"]["low_information"] = chosen["clean.quality.low_information"]

    edit_yaml(params_path, update)
    write_rounds(params_path, pools)


# --------------------------------------------------------------------------------------------
# Writing data/


def make_room(data_dir: Path, force: bool) -> Path | None:
    """Refuse a data/ holding a dataset, or (force) move it aside; returns where it went."""
    # a fresh clone's data/ holds only a header-only overrides.csv: nothing to keep
    present = [n for n in DATASET if (data_dir / n).exists() and not _header_only(data_dir / n)]
    if not present:
        return None
    if not force:
        raise PipelineError(
            f"{data_dir} already holds a dataset ({', '.join(present)}); "
            f"--force moves it aside (nothing is deleted)"
        )
    aside = data_dir.parent / f"data-before-init-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir()
    for name in DATASET:
        for path in (data_dir / name, data_dir / f"{name}.dvc"):
            if path.exists():
                shutil.move(str(path), str(aside / path.name))
    artifacts = data_dir.parent / "artifacts"  # models and reports of the old dataset
    if artifacts.is_dir():
        shutil.move(str(artifacts), str(aside / "artifacts"))
    return aside


def _header_only(path: Path) -> bool:
    return path.is_file() and path.suffix == ".csv" and len(path.read_text().splitlines()) <= 1


def write_files(found: Source, data_dir: Path, link: bool) -> None:
    copy = os.link if link else shutil.copy2
    for split, rows in (("labeled", found.labeled), ("test", found.test)):
        used: set[Path] = set()
        for path, label, inner in rows:
            _place(copy, path, _free(data_dir / split / label / inner, used))
    for name, files in found.pools.items():
        used = set()
        for path, inner in files:
            _place(copy, path, _free(data_dir / "unlabeled" / name / inner, used))
    if found.truth:  # its paths name SRC's layout: they match data/'s for a labeled/ source
        _place(shutil.copy2, found.truth, data_dir / "truth.csv")


def _free(target: Path, used: set[Path]) -> Path:
    """target, or target with a _N suffix when two source files share a name."""
    n, candidate = 1, target
    while candidate in used:
        candidate = target.with_name(f"{target.stem}_{n}{target.suffix}")
        n += 1
    used.add(candidate)
    return candidate


def _place(copy, source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        copy(source, target)
    except OSError as exc:
        hint = " (hard links need the same file system; drop --link)" if copy is os.link else ""
        raise PipelineError(
            f"cannot copy {source} to {target}: {exc.strerror or exc}{hint}"
        ) from None


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
