"""Decoding an unlabeled pool (data/unlabeled/<pool>/**) exactly as ingest decodes labeled
images, and deciding which of its images may be pseudo-labeled: not copies (exact or near) of
test, labeled or earlier pools' images, nor a second copy within the pool.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.config import Params
from pipeline.core.io import read_array, read_json, read_table
from pipeline.data.near_copies import SIGNATURES, copies_of, leak
from pipeline.data.pack import pack
from pipeline.data.scan import scan_folder


def decode_pool(
    data_dir: Path,
    pool: str,
    scratch: Path,
    params: Params,
    known: dict[str, str],
    ingest_dir: Path,
) -> tuple[pd.DataFrame, np.ndarray, list[dict], list[dict]]:
    """Decode a new pool into `scratch`: (table, eligible (N,) bool, quarantine rows, leakage
    rows).

    Test images, copies of labeled images and copies of earlier pools' images are not
    eligible; neither is the second copy of an image within the pool, nor a near copy of a
    test or labeled image (ingest's signatures and cutoff: re-encoded, resized, cropped).
    """
    candidates, quarantine = scan_folder(
        data_dir, f"unlabeled/{pool}", by_class=False, split="pool"
    )
    table, rejected = pack(
        candidates,
        data_dir,
        scratch,
        params.base,
        params.ingest.max_image_pixels,
        split="pool",
        shard_mib=params.ingest.shard_mib,
        desc=f"pool {pool}",
    )
    quarantine += rejected
    if not candidates:
        quarantine.append(
            {"path": f"unlabeled/{pool}", "split": "pool", "reason": "empty pool (no images)"}
        )
    reasons = {
        "test": "same image as a test image",
        "train": "same image as a labeled image",
        "pool": "same image as an image of an earlier pool",
    }
    seen: set[str] = set()
    manifest = read_table(ingest_dir / "manifest.csv")
    tests = manifest[manifest["split"] == "test"]
    tests_by_sha = dict(zip(tests["sha256"], tests["path"]))
    leaks: list[dict] = []
    eligible = np.ones(len(table), bool)
    for i, row in enumerate(table.itertuples()):
        why = reasons.get(known.get(row.sha256, ""))
        if why is None and row.sha256 in seen:
            why = "exact duplicate within the pool"
        if why:
            eligible[i] = False
            quarantine.append({"path": row.path, "split": "pool", "reason": why})
            if known.get(row.sha256) == "test":
                test_copy = tests_by_sha.get(row.sha256, "")
                leaks.append(
                    leak(row.path, "pool", test_copy, "test", 0.0, "exact", "never pseudo-labeled")
                )
        seen.add(row.sha256)
    cutoff = read_json(ingest_dir / "metrics.json").get("near_copy_cutoff", 0.0)
    if cutoff > 0 and len(table):
        partner, distance = copies_of(
            np.load(scratch / SIGNATURES), read_array(ingest_dir / SIGNATURES), cutoff
        )
        for i in np.flatnonzero(eligible & (partner >= 0)):
            other = manifest.iloc[partner[i]]
            kind = "test" if other["split"] == "test" else "labeled"
            eligible[i] = False
            quarantine.append(
                {
                    "path": table["path"].iloc[i],
                    "split": "pool",
                    "reason": f"near copy of {kind} image {other['path']} "
                    f"(distance {distance[i]:.4f} <= {cutoff:.4f})",
                }
            )
            if kind == "test":
                leaks.append(
                    leak(
                        table["path"].iloc[i],
                        "pool",
                        other["path"],
                        "test",
                        float(distance[i]),
                        "near",
                        "never pseudo-labeled",
                    )
                )
    return table, eligible, quarantine, leaks
