"""TPE against the jittered log-grid at equal budgets, low-label regime, several seeds.

Per seed: the regime's data, ingest, clean and augment once (bench/outcome.py), then two
studies over the same space (train.lr 1e-4..1e-1 and train.weight_decay 1e-6..1e-3, both log):
Optuna's TPE and the grid sampler (a k x k jittered log mesh, so the budget is a square). Each
trial trains round r000 in-process through the same study loop `tune` runs over DVC's queue
(pipeline.tools.tune.run_study; only the runner differs). The chosen configuration is the best on
**validation**; its test accuracy is reported once, never used to choose. params.yaml's own
values are trained once per seed for reference.

    OMP_NUM_THREADS=1 python bench/tune_compare.py [--seeds 0 1 2] [--trials 16] [--set key=value]
        [--work DIR]   # keep the runs; rerunning the same command resumes the studies
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
os.environ.setdefault("TQDM_DISABLE", "1")

import outcome  # noqa: E402

from pipeline.core.config import load_params  # noqa: E402
from pipeline.tools import tune, tune_space  # noqa: E402

SPACE = ["train.lr=1e-4:1e-1", "train.weight_decay=1e-6:1e-3"]  # 3 decades each
REGIME = "low-label"


class InProcessRunner:
    """A trial = one r000 training in work/<name>; its figures are read back from the files
    training and evaluation write, so a killed benchmark resumes without retraining."""

    def __init__(self, work: Path, overrides: dict):
        self.work, self.overrides = work, overrides
        self.queued: dict[str, list[str]] = {}

    def queue(self, name: str, sets: list[str]) -> None:
        self.queued[name] = sets

    def wait(self, names: list[str]) -> dict[str, tune.Outcome]:
        out = {}
        for name in names:
            if not self.finished(name) and name in self.queued:
                self.train(name, self.queued[name])
            if self.finished(name):
                out[name] = tune.Outcome("success", self.figures(name)["val"])
        return out

    def finished(self, name: str) -> bool:
        return (self.work / name / "eval" / "metrics.json").is_file()

    def figures(self, name: str) -> dict:
        live = json.loads((self.work / name / "live" / "metrics.json").read_text())
        test = json.loads((self.work / name / "eval" / "metrics.json").read_text())
        return {"val": live["ensemble_val_acc"], "test": test["accuracy"]}

    def train(self, name: str, sets: list[str]) -> dict:
        if not self.finished(name):
            shutil.rmtree(self.work / name, ignore_errors=True)  # a run a kill cut short
            values = outcome.parse_overrides(sets)
            params = load_params(ROOT / "params.yaml", {**self.overrides, **values})
            clean = self.work / "clean"
            outcome.train_and_test(
                self.work, name, clean / "train.csv", clean / "val.csv", params, None
            )
        return self.figures(name)


def one_seed(seed: int, trials: int, extra: dict, work: Path | None) -> dict:
    with contextlib.ExitStack() as stack:
        if work is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        return study_seed(seed, trials, extra, work)


def study_seed(seed: int, trials: int, extra: dict, work: Path) -> dict:
    overrides = {**outcome.REGIMES[REGIME], **extra, "base.seed": seed}
    params = load_params(ROOT / "params.yaml", overrides)
    side = math.isqrt(trials)
    result = {"seed": seed, "trials": trials}
    started = time.perf_counter()
    if not (work / "augment").is_dir():
        work.mkdir(parents=True, exist_ok=True)
        outcome.prepare(REGIME, work, params)
    runner = InProcessRunner(work, overrides)
    result["default"] = runner.train("default", [])
    space = tune_space.parse_space(SPACE, ROOT / "params.yaml")
    for sampler in ("tpe", "grid"):
        settings = {"space": space.to_json(), "metric": "val", "round": "r000"}
        # a k x k grid is its own study; TPE's carries on (a rerun with more trials extends it)
        name = "tpe" if sampler == "tpe" else f"grid{side}x{side}"
        study = tune.open_study(work / "study.db", name, None, create=settings)
        told = len(study.trials)
        study.sampler = tune.create_sampler(sampler, seed=seed, trials=trials, told=told)
        if sampler == "grid" and not told:  # k values per 3-decade axis: per_decade (k - 1) / 3
            for point in tune_space.build_mesh(list(space.dims), (side - 1) / 3, 0.5, seed):
                study.enqueue_trial(point)
        tune.run_study(study, runner, trials=trials, batch=1, fixed=[])
        best = study.best_trial
        values = [t.value for t in study.trials]
        result[sampler] = {
            "best_val": best.value,
            "chosen": {k: float(f"{v:.4g}") for k, v in best.params.items()},
            # reported once, never used to choose
            "chosen_test": runner.figures(best.user_attrs["experiment"])["test"],
            "mean_val": sum(values) / len(values),
            "vals": values,
        }
    result["seconds"] = time.perf_counter() - started
    return result


def report(results: list[dict]) -> str:
    lines = [
        "seed | default val / test | TPE best val | TPE chosen test | grid best val | "
        "grid chosen test | TPE chosen | grid chosen",
    ]
    for r in results:
        t, g = r["tpe"], r["grid"]
        lines.append(
            f"{r['seed']} | {r['default']['val']:.4f} / {r['default']['test']:.4f} | "
            f"{t['best_val']:.4f} | {t['chosen_test']:.4f} | {g['best_val']:.4f} | "
            f"{g['chosen_test']:.4f} | {t['chosen']} | {g['chosen']}"
        )
    n = len(results)
    mean = {
        key: sum(r[s][f] for r in results) / n
        for key, s, f in (
            ("tpe_val", "tpe", "best_val"),
            ("tpe_test", "tpe", "chosen_test"),
            ("grid_val", "grid", "best_val"),
            ("grid_test", "grid", "chosen_test"),
        )
    }
    lines.append(
        f"mean | | {mean['tpe_val']:.4f} | {mean['tpe_test']:.4f} | {mean['grid_val']:.4f} | "
        f"{mean['grid_test']:.4f} | |"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=16, help="a square: the grid is k x k")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/tune_compare.json")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--work", type=Path, help="keep each seed's runs in WORK/seed<k> (a rerun resumes there)"
    )
    args = parser.parse_args()
    if math.isqrt(args.trials) ** 2 != args.trials:
        parser.error("--trials must be a square (the grid is k x k): 9, 16, 25")
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    results = []
    for seed in args.seeds:
        work = args.work / f"seed{seed}" if args.work else None
        results.append(one_seed(seed, args.trials, outcome.parse_overrides(args.set), work))
        print(json.dumps(results[-1]), flush=True)
    outcome.save(args.out, args.set, results, report(results), started)


if __name__ == "__main__":
    main()
