"""A regime's rounds for one seed, as bench/outcome.py runs them, without the baselines; the
work folder is kept, so a variant's validation figures can be read back from it.

Prints one JSON line: per round the test accuracy (reported only), the ensemble's validation
accuracy and calibrated loss (what choices are made on), and for pool rounds the share of pool
images in the set and the set's accuracy.

    OMP_NUM_THREADS=1 python bench/experiments/rounds.py SEED REGIME WORK [key=value ...]
    # one thread: the recorded figures (other thread counts round differently)
    # e.g. 0 low-label WORK train.model.width=32
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

from pipeline.core.io import read_json


def main(seed: int, regime: str, work: Path, overrides: dict) -> dict:
    params = outcome.regime_params(regime, seed, overrides)
    started = time.perf_counter()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    outcome.prepare(regime, work, params)
    rounds, _ = outcome.pipeline_rounds(work, params)
    names = [f"r{index:03d}" for index in range(len(rounds))]
    for name, figures in zip(names, rounds):
        figures["val_loss"] = read_json(work / name / "live" / "metrics.json")["ensemble_val_loss"]
    keep = (
        "test",
        "val",
        "val_loss",
        "pseudo_share",
        "pseudo_accuracy",
        "epochs",
    )
    return {
        "seed": seed,
        "regime": regime,
        "overrides": overrides,
        "seconds": round(time.perf_counter() - started),
        "rounds": {n: {k: f[k] for k in keep if k in f} for n, f in zip(names, rounds)},
    }


if __name__ == "__main__":
    seed, regime, work, *pairs = sys.argv[1:]
    print(json.dumps(main(int(seed), regime, Path(work), outcome.parse_overrides(pairs))))
