"""Which K-fold budget the clean stage keeps, per regime and seed (clean.min_steps as committed).

The regime's data written, ingested and cleaned as bench/outcome.py does; prints the budgets
tried (out-of-fold accuracy and log loss against the given labels, which one was kept), the
flags' precision and recall against the truth (an audit: the stage never reads it) and the
clean stage's seconds. With --compare DIR ..., also whether the kept pred_probs.npy equal
those of earlier runs' work folders (then the rounds after it are those runs' rounds).

    python bench/experiments/kfold_budget.py REGIME SEED WORK [--compare DIR ...]
"""

import json
import os
import sys
import time

os.environ["TQDM_DISABLE"] = "1"
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import outcome

from pipeline.stages import clean, ingest

regime, seed, work = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
compare = sys.argv[5:] if sys.argv[4:5] == ["--compare"] else []
params = outcome.regime_params(regime, seed, {})
work.mkdir(parents=True, exist_ok=True)
outcome.write_data(regime, work / "data", params)
ingest.run(work / "data", work / "ingest", params)
start = time.perf_counter()
metrics = clean.run(work / "ingest", work / "data", work / "clean", params)
kept = np.load(work / "clean" / "pred_probs.npy")
out = {
    "regime": regime,
    "seed": seed,
    "clean_seconds": round(time.perf_counter() - start),
    "budgets": metrics["kfold_budgets"],
    "truth": metrics.get("truth"),
    "same_pred_probs_as": {
        folder: bool(np.array_equal(np.load(Path(folder) / "clean" / "pred_probs.npy"), kept))
        for folder in compare
    },
}
print(json.dumps(out))
