"""predict: classify new images with a round's checkpoint ensemble, without making a round.

    python -m pipeline predict PATH... [--round rN] [--out predictions.csv] [--top-k 3]

PATH is an image file, a folder (every file under it, any depth; links are not followed, hidden
files are skipped) or a CSV with a `path` column (paths relative to the CSV's folder). Each file
is decoded exactly as ingest decodes a training image (pipeline/data/pack.py, at the ensemble's
input size and channels, base.resize, ingest.max_image_pixels) and scored by the round's
ensemble with its calibration (temperature). Files stream through in chunks of CHUNK, so memory
stays flat however many there are; the CSV is written atomically.

Writes one row per file: path, predicted, confidence (calibrated), top_k ("class prob; ..."),
and reason: empty, or why the file could not be classified (not an image, too large, ...).
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.core.config import Params
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_path
from pipeline.core.names import check_round_key, printable
from pipeline.data.inputs import read_csv_rows
from pipeline.data.pack import decode_file
from pipeline.training.ensemble import load_ensemble

log = logging.getLogger(__name__)

CHUNK = 256  # files decoded and predicted at a time
COLUMNS = ["path", "predicted", "confidence", "top_k", "reason"]


def run(
    paths: list[Path],
    *,
    model_dir: Path,
    out: Path,
    params: Params,
    top_k: int = 3,
) -> dict:
    """Classify every file `paths` name; returns counts. model_dir: a round's model folder."""
    ensemble = load_ensemble(model_dir)
    options = {
        "image_size": int(ensemble.info["image_size"]),
        "channels": int(ensemble.info["channels"]),
        "resize": params.base.resize,
        "max_pixels": params.ingest.max_image_pixels,
        "draft": True,
    }
    files = list(collect(paths))
    if not files:
        raise PipelineError(f"no file to classify in {', '.join(map(str, paths))}")
    classes, k = ensemble.classes, max(1, min(top_k, len(ensemble.classes)))
    counts = {"files": len(files), "classified": 0, "refused": 0}
    with atomic_path(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        progress = tqdm(total=len(files), desc="predict", unit="img", mininterval=1.0)
        for start in range(0, len(files), CHUNK):
            chunk = files[start : start + CHUNK]
            decoded = [decode_file(path, options) for path in chunk]
            good = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
            probs = np.zeros((0, len(classes)))
            if good:
                probs = ensemble.predict(np.stack([decoded[i].pixels for i in good]))
            scored = dict(zip(good, probs))
            for i, path in enumerate(chunk):
                if i in scored:
                    p = scored[i]
                    order = np.argsort(-p)[:k]
                    top = "; ".join(f"{classes[j]} {p[j]:.4f}" for j in order)
                    writer.writerow(
                        [printable(str(path)), classes[order[0]], f"{p[order[0]]:.6f}", top, ""]
                    )
                else:
                    writer.writerow([printable(str(path)), "", "", "", decoded[i]])
            counts["classified"] += len(good)
            counts["refused"] += len(chunk) - len(good)
            progress.update(len(chunk))
        progress.close()
    log.info(
        "predict: %d files, %d classified, %d refused (see the reason column) -> %s",
        counts["files"],
        counts["classified"],
        counts["refused"],
        out,
    )
    return counts


def round_model(rounds: Path, round_name: str | None) -> Path:
    """The model folder of `round_name`, or of the last round that has one."""
    if round_name:
        check_round_key(round_name, "--round")
        return rounds / round_name / "model"
    done = sorted(p.parents[1].name for p in rounds.glob("r[0-9][0-9][0-9]/model/ensemble.json"))
    if not done:
        raise PipelineError(f"no trained round in {rounds}: run `dvc repro` first")
    return rounds / done[-1] / "model"


def collect(paths: list[Path]) -> Iterator[Path]:
    """Every file the arguments name, in order: files as given, folders walked (sorted, links
    not followed, hidden entries skipped), CSVs read for their `path` column."""
    for path in map(Path, paths):
        if path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    if not name.startswith("."):
                        yield Path(dirpath) / name
        elif path.suffix.lower() == ".csv":
            yield from (path.parent / row["path"] for _, row in read_csv_rows(path, ("path",)))
        elif path.exists() or path.is_symlink():
            yield path
        else:
            raise PipelineError(f"{printable(str(path))}: no such file or folder")
