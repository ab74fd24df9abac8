"""dataset stage: the improved dataset as a versioned table, after the last round.

Reads   artifacts/ (ingest's manifest and quarantine, clean's decisions, the last round's
        pseudo-label set and every pool round's quarantine)
Writes  <out>/labels.csv     every labeled, pool and test file once: final label, source,
                             original label, round and confidence of pseudo-labels, or why the
                             file was set aside (columns: pipeline/data/dataset_table.py)
        <out>/metrics.json   images per split and source, set aside per split
Params  none

`dvc.yaml` keeps labels.csv in git (cache: false), so every commit has its dataset and
`python -m pipeline diff REV_A REV_B` says which labels changed between two of them.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.io import atomic_dir, write_json, write_table
from pipeline.data.dataset_table import dataset_table


def run(artifacts: Path, out_dir: Path) -> dict:
    table = dataset_table(artifacts)
    kept = table[table["label"] != ""]
    metrics = {
        "images": int(len(kept)),
        "by_split": {str(k): int(v) for k, v in kept["split"].value_counts().sort_index().items()},
        "by_source": {
            str(k): int(v) for k, v in kept["source"].value_counts().sort_index().items()
        },
        "set_aside": {
            str(k): int(v)
            for k, v in table.loc[table["label"] == "", "split"].value_counts().sort_index().items()
        },
    }
    with atomic_dir(out_dir) as tmp:
        write_table(tmp / "labels.csv", table)
        write_json(tmp / "metrics.json", metrics)
    return metrics
