"""audit stage: the optional user files, copied where the stages that read them can depend on them.

Reads   data/truth.csv      (optional audit: path,true_label)
        data/overrides.csv  (optional user decisions: path,label|keep|drop)
        data/pseudo_overrides.csv  (optional decisions on pseudo-labels: path,label|reject)
Writes  <out>/truth.csv, overrides.csv, pseudo_overrides.csv   a byte copy of each, or only its
                                                             header when the file is absent
        data/test/          created empty when absent (ingest then holds out ingest.test_fraction
                            of data/labeled as the test split)
Params  none

DVC cannot depend on a file that may not exist. This stage runs on every `dvc repro`
(`always_changed` in dvc.yaml; it reads three small files) and ingest, clean and pseudolabel
depend on its copies, which only change when the user's files do: a project without them runs,
and adding, editing or removing either reruns exactly the stages it feeds. The same holds
for the data/test folder ingest depends on: a user may bring no test split.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_path

log = logging.getLogger(__name__)

FILES = {
    "truth.csv": "path,true_label",
    "overrides.csv": "path,label",
    "pseudo_overrides.csv": "path,label",
}


def run(data_dir: Path, out_dir: Path) -> dict[str, bool]:
    """Copy each optional file (or its header) to out_dir; returns which were present."""
    present = {}
    for name, header in FILES.items():
        source = Path(data_dir) / name
        present[name] = source.is_file()
        if source.exists() and not present[name]:
            raise PipelineError(f"{source} is not a regular file")
        data = source.read_bytes() if present[name] else f"{header}\n".encode()
        with atomic_path(Path(out_dir) / name) as tmp:
            tmp.write_bytes(data)
    test_dir = Path(data_dir) / "test"
    present["test"] = test_dir.is_dir() and any(test_dir.iterdir())
    if not test_dir.exists():
        test_dir.mkdir(parents=True)  # an empty folder: no file of the user's changes
    log.info(
        "audit: %s%s",
        ", ".join(f"data/{n} {'present' if p else 'absent'}" for n, p in present.items()),
        "" if present["test"] else " (ingest holds out ingest.test_fraction of data/labeled)",
    )
    return present
