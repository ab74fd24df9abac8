"""The outcome benchmark's baselines for a work folder `rounds.py` left, trained with the same
params as its rounds: the labeled rows as given (noisy), with their true labels (true), and
those plus every pool image truly labeled (ceiling). Test accuracy is reported only.

    OMP_NUM_THREADS=1 python bench/experiments/baselines.py SEED REGIME WORK [key=value ...]
    # WORK and key=value as given to rounds.py; prints one JSON line
"""

import json
import os
import sys
import time

os.environ["TQDM_DISABLE"] = "1"
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import outcome


def main(seed: int, regime: str, work: Path, overrides: dict) -> dict:
    params = outcome.regime_params(regime, seed, overrides)
    started = time.perf_counter()
    tables = outcome.baseline_tables(work)
    last = sorted(p for p in work.glob("r0*") if (p / "pseudo" / "table.csv").is_file())[-1]
    ceiling = work / "ceiling_pseudo"
    if not ceiling.exists():
        ceiling = outcome.ceiling_pseudo(work, last / "pseudo")
    result = {"seed": seed, "regime": regime, "overrides": overrides}
    for name, (table, val) in tables.items():
        result[name] = outcome.train_and_test(work, name, table, val, params, None)["test"]
    true_train, true_val = tables["true"]
    result["ceiling"] = outcome.train_and_test(
        work, "ceiling", true_train, true_val, params, ceiling
    )["test"]
    result["seconds"] = round(time.perf_counter() - started)
    return result


if __name__ == "__main__":
    seed, regime, work, *pairs = sys.argv[1:]
    sets = outcome.parse_overrides(pairs)
    print(json.dumps(main(int(seed), regime, Path(work), sets)), flush=True)
