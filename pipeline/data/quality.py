"""Image quality on the original files, by CleanVision: dark, light, blurry, low information,
odd aspect ratio, odd size and (for colour projects) grayscale. Shared by clean (training rows:
issues.csv, the gallery) and evaluate (accuracy by slice of the test split).

CleanVision's thresholds are tuned to photographs; they are params (`clean.quality`), and the
grayscale check only runs where `base.channels` is 3. No hand-written check is left: each of the
earlier ones (robust z-scores on the packed model inputs) has a CleanVision equivalent measured
on the file itself rather than on a letterboxed 16-px array.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import pandas as pd

from pipeline.core.config import QualityConfig
from pipeline.data.images import Rejected, as_decoded, open_image

log = logging.getLogger(__name__)

QUALITY_CHECKS = (
    "dark",
    "light",
    "blurry",
    "low_information",
    "odd_aspect_ratio",
    "odd_size",
    "grayscale",
)


# The modes CleanVision's checks read as they are meant. It reads each file itself: two-channel
# images (LA, PA) crash its brightness check, which indexes a third channel, and 16-bit, palette
# and alpha images would be scored on raw values; those are checked on a decoded copy.
CLEANVISION_MODES = ("L", "RGB")


def checks_for(channels: int) -> tuple[str, ...]:
    """The checks that mean something for a project: grayscale only for a colour one."""
    return tuple(c for c in QUALITY_CHECKS if c != "grayscale" or channels == 3)


def cleanvision_params(cfg: QualityConfig) -> dict[str, dict]:
    """CleanVision issue_types with this project's thresholds."""
    return {
        "dark": {"threshold": cfg.dark},
        "light": {"threshold": cfg.light},
        "blurry": {"threshold": cfg.blurry},
        "low_information": {"threshold": cfg.low_information},
        "odd_aspect_ratio": {"threshold": cfg.odd_aspect_ratio},
        "odd_size": {"iqr_factor": cfg.odd_size_iqr},
        "grayscale": {},
    }


def image_issues(paths: list[Path], cfg: QualityConfig, channels: int) -> pd.DataFrame:
    """is_<check>_issue and <check>_score (CleanVision's, in [0, 1], lower = worse) for each
    file, rows in the order of `paths`. The files are read once more, one process; an image in
    a mode CleanVision misreads is checked on a decoded copy (`checkable`). A file that is gone
    since ingest (a data/ edited without `dvc repro`) gets no scores and no flags, and one
    warning says how many; if CleanVision fails, no file is flagged and a warning says why."""
    from cleanvision import Imagelab  # imports matplotlib and friends: only when needed

    checks = checks_for(channels)
    columns = [c for name in checks for c in (f"is_{name}_issue", f"{name}_score")]
    files = [str(p) for p in paths]
    present = [f for f in files if Path(f).is_file()]
    if len(present) < len(files):
        log.warning(
            "image checks: %d of %d files are gone since ingest (first: %s); they are not "
            "checked: run `dvc repro` to ingest data/ again",
            len(files) - len(present),
            len(files),
            next(f for f in files if f not in set(present)),
        )
    found = pd.DataFrame(index=files, columns=columns)
    if present:
        wanted = cleanvision_params(cfg)
        with tempfile.TemporaryDirectory() as folder:
            checked = checkable(present, Path(folder))
            present = [f for f, c in zip(present, checked) if c]  # refused files: not checked
            checked = [c for c in checked if c]
            lab = Imagelab(filepaths=checked, verbose=False)
            try:
                lab.find_issues(issue_types={n: wanted[n] for n in checks}, n_jobs=1, verbose=False)
            except Exception as exc:  # noqa: BLE001 - a library failure costs these flags only
                log.warning(
                    "image checks: CleanVision failed (%s: %s); no image is flagged dark, "
                    "blurry, odd-sized and so on this run; the label checks are unaffected",
                    type(exc).__name__,
                    exc,
                )
            else:
                issues = lab.issues.reindex(checked)
                issues.index = present
                found = issues.reindex(files)
    for name in checks:
        flag = found[f"is_{name}_issue"]
        found[f"is_{name}_issue"] = flag.where(flag.notna(), False).astype(bool)
        found[f"{name}_score"] = found[f"{name}_score"].astype(float)
    return found[columns].reset_index(drop=True)


def checkable(files: list[str], folder: Path) -> list[str | None]:
    """`files`, each image in a mode outside CLEANVISION_MODES replaced by a copy in `folder`, as
    ingest decodes it at the file's own size, and None for a file whose bytes are no longer a
    format ingest accepts (CleanVision's own Pillow calls would open any). The originals are
    only read."""
    out = []
    for index, file in enumerate(files):
        try:
            with open_image(file) as image:  # only DECODE_FORMATS' plugins read it
                if image.mode in CLEANVISION_MODES:
                    out.append(file)
                    continue
                copy = folder / f"{index:06d}.png"
                as_decoded(image).save(copy)
        except Rejected:  # another format since ingest: never handed to CleanVision
            out.append(None)
            continue
        except OSError:  # unreadable since ingest: CleanVision meets it as it is
            out.append(file)
            continue
        out.append(str(copy))
    return out
