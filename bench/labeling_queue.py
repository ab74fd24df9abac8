"""Is the labeling queue worth a person's time? The queue against random picks, side by side.

Low-label regime of bench/outcome.py, per seed: clean, round r000 (human labels), round r001
(r000's model labels pool 1), then one more round r002 (r001's model re-scores pool 1 and labels
pool 2) three ways:

  none     no human answers
  queue    the first 50 rows of r001's to_label.csv answered with their true labels
  random   50 random images of pool 1 answered with their true labels

A perfect annotator answers from truth.csv. The answers enter as confirmed labels
(data/pseudo_overrides.csv: path,label), which train exactly like human rows; going through
`add-labels` instead would re-carve the validation split and make the arms incomparable. The
arms share everything up to r001. Validation and test accuracy are reported; nothing is chosen.

    python bench/labeling_queue.py [--seeds 0 1 2] [--answers 50] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported

import outcome  # noqa: E402

from pipeline.core.config import load_params  # noqa: E402
from pipeline.core.io import read_table, write_table  # noqa: E402
from pipeline.stages import pseudolabel  # noqa: E402

ARMS = ("none", "queue", "random")


def one_seed(seed: int, answers: int, overrides: dict) -> dict:
    params = load_params(
        ROOT / "params.yaml", {**outcome.REGIMES["low-label"], **overrides, "base.seed": seed}
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "data"
        started = time.perf_counter()
        outcome.prepare("low-label", work, params)
        train_csv, val_csv = work / "clean" / "train.csv", work / "clean" / "val.csv"
        r000 = work / "r000" / "pseudo"
        pseudolabel.init_pseudo(r000, work / "ingest" / "images")
        outcome.train_and_test(work, "r000", train_csv, val_csv, params, None)
        r001, _ = outcome.pseudo_round(work, "r001", "pool_001", "r000", r000, params)
        first = outcome.train_and_test(work, "r001", train_csv, val_csv, params, r001)

        truth = read_table(data / "truth.csv").set_index("path")["true_label"]
        queue = read_table(work / "r001" / "pseudo_report" / "to_label.csv")["path"][:answers]
        pool = read_table(r001 / "table.csv")
        rng = np.random.default_rng(seed)
        picks = {
            "none": [],
            "queue": list(queue),
            "random": list(rng.choice(pool["path"], size=answers, replace=False)),
        }
        accepted = dict(zip(pool["path"], pool["accepted"] == "True"))
        right = dict(zip(pool["path"], pool["label"] == pool["path"].map(truth)))
        manifest = read_table(work / "ingest" / "manifest.csv")
        result = {"seed": seed, "test_images": int((manifest["split"] == "test").sum())}
        result["r001"] = first
        for arm in ARMS:
            answered = work / f"answers_{arm}.csv"
            paths = picks[arm]
            write_table(answered, pd.DataFrame({"path": paths, "label": [truth[p] for p in paths]}))
            name = f"r002_{arm}"
            pseudo, metrics = outcome.pseudo_round(
                work, name, "pool_002", "r001", r001, params, overrides=answered
            )
            figures = outcome.train_and_test(work, name, train_csv, val_csv, params, pseudo)
            result[arm] = {
                **figures,
                "answered": len(paths),
                # what the answers changed: images r001 had left out, or had labeled wrongly
                "answered_not_accepted": int(sum(not accepted[p] for p in paths)),
                "answered_wrongly_pseudo_labeled": int(
                    sum(accepted[p] and not right[p] for p in paths)
                ),
                "pseudo_share": metrics["accepted"] / max(metrics["candidates"], 1),
                "pseudo_accuracy": metrics.get("pseudo_label_accuracy"),
            }
        result["seconds"] = time.perf_counter() - started
    return result


def report(results: list[dict]) -> str:
    lines = [
        "| seed | r001 test | "
        + " | ".join(f"r002 {arm}: test / val" for arm in ARMS)
        + " | answered images r001 had not accepted (queue / random) |",
        "|---:|---:|" + "---:|" * len(ARMS) + "---:|",
    ]
    for r in results:
        cells = [f"{r[arm]['test']:.4f} / {r[arm]['val']:.3f}" for arm in ARMS]
        lines.append(
            f"| {r['seed']} | {r['r001']['test']:.4f} | "
            + " | ".join(cells)
            + f" | {r['queue']['answered_not_accepted']} / {r['random']['answered_not_accepted']} |"
        )
    mean = {arm: np.mean([r[arm]["test"] for r in results]) for arm in ARMS}
    val = {arm: np.mean([r[arm]["val"] for r in results]) for arm in ARMS}
    first = np.mean([r["r001"]["test"] for r in results])
    n_test = np.mean([r["test_images"] for r in results])
    lines.append(
        f"| mean | {first:.4f} | "
        + " | ".join(f"{mean[a]:.4f} / {val[a]:.3f}" for a in ARMS)
        + " | |"
    )
    lines.append(
        f"\nqueue - random: {mean['queue'] - mean['random']:+.4f} test accuracy "
        f"({(mean['queue'] - mean['random']) * n_test:+.1f} of {n_test:.0f} test images a seed); "
        f"queue - no answers: {mean['queue'] - mean['none']:+.4f}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--answers", type=int, default=50)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "labeling_queue.json"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a param"
    )
    args = parser.parse_args()
    overrides = outcome.parse_overrides(args.set)
    started = time.perf_counter()
    results = []
    for seed in args.seeds:
        results.append(one_seed(seed, args.answers, overrides))
        print(json.dumps(results[-1]), flush=True)
    outcome.save(args.out, args.set, results, report(results), started)


if __name__ == "__main__":
    main()
