"""A finished run's last round retrained with the crosscheck on (`train.crosscheck`), on the same
pseudo-label set: validation and test beside the run's own, and how many of the relabels were
right against truth.csv (the benchmark's; a user has none).

    OMP_NUM_THREADS=1 python bench/experiments/crosscheck.py WORK ROUND REGIME SEED [key=value ...]
    # WORK: a bench/experiments/rounds.py work folder, ROUND its last round (e.g. r003);
    # default train.crosscheck=0.01. Every round with it on: rounds.py ... train.crosscheck=0.01
"""

import json
import os
import sys

os.environ["TQDM_DISABLE"] = "1"
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import outcome

from pipeline.io import read_json, read_table


def main(work: Path, last: str, regime: str, seed: int, overrides: dict) -> dict:
    params = outcome.regime_params(regime, seed, {"train.crosscheck": 0.01, **overrides})
    name = f"crosscheck_{last}"
    figures = outcome.train_and_test(
        work, name, work / "clean" / "train.csv", work / "clean" / "val.csv", params,
        work / last / "pseudo",
    )  # fmt: skip
    truth = read_table(work / "ingest" / "manifest.csv").set_index("id")["true_label"]
    relabeled = read_table(work / name / "train" / "crosschecked.csv")
    return {
        "work": str(work),
        "round": last,
        "test": figures["test"],
        "val": figures["val"],
        "val_loss": read_json(work / name / "live" / "metrics.json")["ensemble_val_loss"],
        "run_val": read_json(work / last / "live" / "metrics.json")["ensemble_val_acc"],
        "relabeled": len(relabeled),
        "right": int((relabeled["label"] == relabeled["id"].map(truth)).sum()),
        "made_wrong": int((relabeled["cleaned_label"] == relabeled["id"].map(truth)).sum()),
    }


if __name__ == "__main__":
    work, last, regime, seed, *pairs = sys.argv[1:]
    print(json.dumps(main(Path(work), last, regime, int(seed), outcome.parse_overrides(pairs))))
