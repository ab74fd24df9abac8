"""A regime's rounds for one seed, as bench/outcome.py runs them, without the baselines; the
work folder is kept, so a variant's validation figures can be read back from it.

Prints one JSON line: per round the test accuracy (reported only), the ensemble's validation
accuracy and calibrated loss (what choices are made on), and for pool rounds the share of pool
images in the set, the set's accuracy and how many of the labeled images clean dropped joined.

    python bench/experiments/rounds.py SEED REGIME WORK [key=value ...]
    # e.g. 0 low-label /tmp/rounds/base pseudolabel.dropped=false; 5-10 min a seed on 2 cores
"""

import json
import os
import shutil
import sys
import time

os.environ["TQDM_DISABLE"] = "1"
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import outcome

from pipeline import pseudolabel
from pipeline.config import load_params
from pipeline.io import read_json


def main(seed: int, regime: str, work: Path, overrides: dict) -> dict:
    params = load_params(
        ROOT / "params.yaml", {**outcome.REGIMES[regime], **overrides, "base.seed": seed}
    )
    started = time.perf_counter()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    outcome.prepare(regime, work, params)
    pseudo_in = work / "r000" / "pseudo"
    pseudolabel.init_pseudo(pseudo_in, params.base)
    train_csv, val_csv = work / "clean" / "train.csv", work / "clean" / "val.csv"
    rounds = {"r000": outcome.train_and_test(work, "r000", train_csv, val_csv, params, None)}
    pools = sorted(p.name for p in (work / "data" / "unlabeled").iterdir())
    for index, pool in enumerate(pools, start=1):
        name, previous = f"r{index:03d}", f"r{index - 1:03d}"
        pseudo_in, pm = outcome.pseudo_round(work, name, pool, previous, pseudo_in, params)
        figures = outcome.train_and_test(work, name, train_csv, val_csv, params, pseudo_in)
        pooled = [v for k, v in pm["per_pool"].items() if k != pseudolabel.DROPPED]
        dropped = pm["per_pool"].get(pseudolabel.DROPPED, {"candidates": 0, "accepted": 0})
        figures.update(
            share=sum(v["accepted"] for v in pooled) / max(sum(v["candidates"] for v in pooled), 1),
            accuracy=pm.get("pseudo_label_accuracy"),
            dropped_joined=f"{dropped['accepted']}/{dropped['candidates']}",
        )
        rounds[name] = figures
    for name, figures in rounds.items():
        figures["val_loss"] = read_json(work / name / "live" / "metrics.json")["ensemble_val_loss"]
    keep = ("test", "val", "val_loss", "share", "accuracy", "dropped_joined", "epochs")
    return {
        "seed": seed,
        "regime": regime,
        "overrides": overrides,
        "seconds": round(time.perf_counter() - started),
        "rounds": {n: {k: f[k] for k in keep if k in f} for n, f in rounds.items()},
    }


if __name__ == "__main__":
    seed, regime, work, *pairs = sys.argv[1:]
    print(json.dumps(main(int(seed), regime, Path(work), outcome.parse_overrides(pairs))))
