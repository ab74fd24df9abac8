"""ingest stage: scan data/, decode every image once, pack them into sharded arrays.

Reads   data/labeled/<class>/**  (or data/labeled/labels.csv: path,label; paths relative to data/)
        data/test/<class>/**     (optional; otherwise a stratified, seeded split of labeled)
        data/truth.csv           (optional audit: path,true_label)
Writes  <out>/manifest.csv   one row per usable image: id, path, sha256, label, split, row, ...
        <out>/images/        the packed images: uint8 (N, image_size, image_size, channels) in
                             .npy shards of ingest.shard_mib MiB + index.json, memory-mapped
                             (pipeline.core.io.PackedImages reads them as one array)
        <out>/classes.json   the one class order used everywhere
        <out>/quarantine.csv path, split, reason for every file or folder not used
        <out>/signatures.npy (N, 256) float16 look of each image (images.signature), manifest order
        <out>/leakage.csv    path, split, copy_of, copy_split, distance, kind, action: every image
                             set aside as a copy of a test image, exact or near, with its pair
        <out>/params.json    the params used, `auto` image size and channels resolved (and why)
        <out>/metrics.json
Params  base, ingest

Scanning lives in pipeline/data/scan.py and decoding in pipeline/data/pack.py: unlabeled pools
are packed by the pseudolabel stage of their round with the same functions, so adding a pool
does not rerun this stage.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.config import Params
from pipeline.core.errors import PipelineError
from pipeline.core.io import (
    read_array,
    write_array,
    write_json,
    write_packed,
    write_table,
)
from pipeline.core.typed import AUTO, to_dict
from pipeline.data.image_stats import fitting_shape, inspect
from pipeline.data.inputs import attach_truth, stratified_holdout
from pipeline.data.near_copies import LEAKAGE_COLUMNS, SIGNATURES, copies_of, leak, near_copy_cutoff
from pipeline.data.pack import pack
from pipeline.data.scan import QUARANTINE_COLUMNS, quarantine_row, scan_folder

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# 1) Decisions over the table: duplicates, leakage, tiny classes, test split


def resolve_duplicates(table: pd.DataFrame) -> tuple[pd.Series, list[dict], list[dict], dict]:
    """Keep mask, quarantine rows and leakage rows for exact (byte-identical) duplicates.

    Rules: a test image wins over every copy outside test (the copies leave training, so the
    test set never leaks); among test copies the first path wins; among labeled copies with one
    label the first path wins; copies that disagree on the label are all set aside.
    """
    keep = pd.Series(True, index=table.index)
    quarantine: list[dict] = []
    leaks: list[dict] = []
    counts = Counter()
    for _, group in table.groupby("sha256", sort=False):
        if len(group) == 1:
            continue
        group = group.sort_values("path")
        tests = group[group["split"] == "test"]
        if len(tests):
            winner = tests.iloc[0]
            for idx, row in group.drop(index=winner.name).iterrows():
                keep[idx] = False
                if row["split"] == "test":
                    reason = f"exact duplicate of test image {winner['path']}"
                    counts["duplicates"] += 1
                else:
                    reason = f"same image as test image {winner['path']}: kept out of training"
                    counts["test_leakage"] += 1
                quarantine.append(quarantine_row(row["path"], row["split"], reason))
                if row["split"] != "test":
                    leaks.append(
                        leak(row["path"], row["split"], winner["path"], "test", 0.0, "exact")
                    )
        elif group["label"].nunique() > 1:
            labels = ", ".join(sorted(group["label"].unique()))
            counts["label_conflicts"] += 1
            for idx, row in group.iterrows():
                keep[idx] = False
                quarantine.append(
                    quarantine_row(row["path"], row["split"], f"same image under labels {labels}")
                )
        else:
            winner = group.iloc[0]
            for idx, row in group.iloc[1:].iterrows():
                keep[idx] = False
                counts["duplicates"] += 1
                quarantine.append(
                    quarantine_row(
                        row["path"], row["split"], f"exact duplicate of {winner['path']}"
                    )
                )
    return keep, quarantine, leaks, dict(counts)


def resolve_near_copies(
    table: pd.DataFrame, looks: np.ndarray, cutoff: float
) -> tuple[pd.Series, list[dict], list[dict], dict]:
    """Keep mask, quarantine rows and leakage rows for near copies (near_copies.copies_of: shapes
    within `cutoff`, colour and contrast alike) that exact hashing cannot see: a training image near a test image leaves training; training
    images near one another under different labels are all set aside, as exact copies are."""
    keep = pd.Series(True, index=table.index)
    quarantine, leaks = [], []
    counts = Counter()
    is_test = (table["split"] == "test").to_numpy()
    train = np.flatnonzero(~is_test)
    test = np.flatnonzero(is_test)
    paths, labels = table["path"].to_numpy(), table["label"].to_numpy()
    partner, distance = copies_of(looks[train], looks[test], cutoff)
    for i, j, d in zip(train, partner, distance):
        if j >= 0:
            keep.iloc[i] = False
            counts["near_test_leakage"] += 1
            quarantine.append(
                quarantine_row(
                    paths[i],
                    "train",
                    f"near copy of test image {paths[test[j]]} (distance {d:.4f} <= {cutoff:.4f}): "
                    "kept out of training",
                )
            )
            leaks.append(leak(paths[i], "train", paths[test[j]], "test", float(d), "near"))
    partner, distance = copies_of(looks[train], looks[train], cutoff, exclude_self=True)
    for i, j, d in zip(train, partner, distance):
        other = train[j]
        if j < 0 or labels[i] == labels[other]:
            continue
        counts["near_label_conflicts"] += 1
        for a, b in ((i, other), (other, i)):
            if keep.iloc[a]:
                keep.iloc[a] = False
                quarantine.append(
                    quarantine_row(
                        paths[a],
                        "train",
                        f"near copy of {paths[b]} under another label "
                        f"({labels[a]} vs {labels[b]}, distance {d:.4f})",
                    )
                )
    return keep, quarantine, leaks, dict(counts)


def drop_small_classes(table: pd.DataFrame, minimum: int) -> tuple[pd.Series, list[dict]]:
    """Set aside training images of classes with fewer than `minimum` images."""
    sizes = table.loc[table["split"] == "train", "label"].value_counts()
    small = set(sizes[sizes < minimum].index)
    keep = ~((table["split"] == "train") & table["label"].isin(small))
    quarantine = [
        quarantine_row(
            row.path,
            row.split,
            f"class {row.label!r} has {sizes[row.label]} image(s); "
            f"ingest.min_images_per_class is {minimum}",
        )
        for row in table[~keep].itertuples()
    ]
    return keep, quarantine


# --------------------------------------------------------------------------------------------
# 2) The stage


def run(data_dir: Path, out_dir: Path, params: Params, truth_path: Path | None = None) -> dict:
    """Scan, decode, deduplicate and write the ingest outputs; returns the metrics."""
    data_dir = Path(data_dir)
    if not (data_dir / "labeled").is_dir():
        raise PipelineError(
            f"no labeled data: expected {data_dir / 'labeled'}/<class>/<image> "
            f"(or run `python -m pipeline demo-data`)"
        )
    candidates, quarantine = scan_folder(data_dir, "labeled", by_class=True, split="train")
    splits = ["train"] * len(candidates)
    test_candidates, test_quarantine = [], []
    if (data_dir / "test").is_dir():  # absent or empty: a held-out share of labeled below
        test_candidates, test_quarantine = scan_folder(
            data_dir, "test", by_class=True, split="test"
        )
    has_test = bool(test_candidates)
    candidates += test_candidates
    splits += ["test"] * len(test_candidates)
    quarantine += test_quarantine

    params, chosen = resolve_shape(params, [data_dir / c.path for c in candidates])
    scratch = out_dir / ".images.unfiltered"
    shard_mib = params.ingest.shard_mib
    table, rejected = pack(
        candidates,
        data_dir,
        scratch,
        params.base,
        params.ingest.max_image_pixels,
        split=splits,
        shard_mib=shard_mib,
    )
    quarantine += rejected

    keep, dup_rows, leaks, dup_counts = resolve_duplicates(table)
    quarantine += dup_rows
    table = table[keep]
    keep, small_rows = drop_small_classes(table, params.ingest.min_images_per_class)
    quarantine += small_rows
    table = table[keep]

    classes = sorted(table.loc[table["split"] == "train", "label"].unique())
    if len(classes) < 2:
        raise PipelineError(
            f"need at least 2 classes with {params.ingest.min_images_per_class}+ usable images "
            f"in {data_dir / 'labeled'}; found {len(classes)} (see the quarantine list)"
        )
    unknown = (table["split"] == "test") & ~table["label"].isin(classes)
    quarantine += [
        quarantine_row(r.path, r.split, f"class {r.label!r} has no labeled training images")
        for r in table[unknown].itertuples()
    ]
    table = table[~unknown]
    if not has_test:
        is_test = stratified_holdout(table["label"], params.ingest.test_fraction, params.base.seed)
        table.loc[is_test, "split"] = "test"

    # Near copies, once the test split is known (carved or given).
    looks = np.load(scratch / SIGNATURES)
    cutoff = 0.0
    if params.ingest.near_copies:
        rows = table["row"].to_numpy()
        cutoff = near_copy_cutoff(
            looks[rows],
            params.ingest.near_copy_ratio,
            params.ingest.near_copy_max_distance,
            params.base.seed,
        )
        keep, near_rows, near_leaks, near_counts = resolve_near_copies(table, looks[rows], cutoff)
        quarantine += near_rows
        leaks += near_leaks
        dup_counts.update(near_counts)
        table = table[keep]

    # The packed images in manifest order; the scratch set with set-aside rows goes away.
    table = table.sort_values(["split", "label", "path"], kind="stable").reset_index(drop=True)
    write_packed(out_dir / "images", read_array(scratch), table["row"].to_numpy(), shard_mib)
    write_array(out_dir / SIGNATURES, looks[table["row"].to_numpy()])
    shutil.rmtree(scratch)
    table["row"] = np.arange(len(table))
    table, n_truth = attach_truth(table, truth_path or data_dir / "truth.csv")

    quarantine_table = pd.DataFrame(quarantine, columns=QUARANTINE_COLUMNS)
    metrics = summarize(table, quarantine_table, dup_counts, classes, n_truth)
    metrics["near_copy_cutoff"] = cutoff
    write_table(out_dir / "manifest.csv", table)
    write_table(out_dir / "leakage.csv", pd.DataFrame(leaks, columns=LEAKAGE_COLUMNS))
    write_table(out_dir / "quarantine.csv", quarantine_table)
    write_json(out_dir / "classes.json", classes)
    write_json(
        out_dir / "params.json",
        {"base": to_dict(params.base), "ingest": to_dict(params.ingest), "auto": chosen},
    )
    write_json(out_dir / "metrics.json", metrics)
    log.info(
        "ingest: %d train, %d test images, %d classes, %d quarantined (see %s)",
        metrics["train_images"],
        metrics["test_images"],
        len(classes),
        metrics["quarantined"],
        out_dir / "quarantine.csv",
    )
    return metrics


def resolve_shape(params: Params, files: list[Path]) -> tuple[Params, dict]:
    """params with `auto` image size and channels chosen from the labeled and test files;
    also {key: {"value", "why"}} for each key chosen."""
    wanted = [key for key in ("image_size", "channels") if getattr(params.base, key) == AUTO]
    if not wanted:
        return params, {}
    shape = fitting_shape(inspect(files, params.ingest.max_image_pixels))
    backbone = params.train.model.backbone
    if backbone != "resnet":  # the size its pretrained weights expect, whatever the images
        from pipeline.training.backbones import input_size

        shape["image_size"] = input_size(backbone)
        shape["why"]["image_size"] = f"the input size timm's {backbone} was pretrained at"
    chosen = {key: {"value": shape[key], "why": shape["why"][key]} for key in wanted}
    for key, choice in chosen.items():
        log.info("ingest: base.%s auto -> %s (%s)", key, choice["value"], choice["why"])
    resolved = dataclasses.replace(params.base, **{k: c["value"] for k, c in chosen.items()})
    return dataclasses.replace(params, base=resolved), chosen


def summarize(
    table: pd.DataFrame,
    quarantine: pd.DataFrame,
    dup_counts: dict,
    classes: list[str],
    n_truth: int,
) -> dict:
    split_counts = table["split"].value_counts()
    return {
        "train_images": int(split_counts.get("train", 0)),
        "test_images": int(split_counts.get("test", 0)),
        "classes": len(classes),
        "quarantined": len(quarantine),
        "exact_duplicates": dup_counts.get("duplicates", 0),
        "label_conflicts": dup_counts.get("label_conflicts", 0),
        "test_leakage": dup_counts.get("test_leakage", 0),
        "near_test_leakage": dup_counts.get("near_test_leakage", 0),
        "near_label_conflicts": dup_counts.get("near_label_conflicts", 0),
        "truth_rows": n_truth,
        "per_class": {
            split: {
                str(k): int(v)
                for k, v in table[table["split"] == split]["label"]
                .value_counts()
                .sort_index()
                .items()
            }
            for split in ("train", "test")
        },
        "quarantine_reasons": {
            str(kind): int(n)
            for kind, n in quarantine["reason"].map(_reason_kind).value_counts().items()
        },
    }


def _reason_kind(reason: str) -> str:
    return reason.split(":")[0].split("(")[0].strip()
