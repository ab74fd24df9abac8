"""The outcome users come for, measured side by side on the demo data.

For each seed, in a fresh temporary folder:
  noisy      the model trained on the labeled split with its flipped labels (no cleaning)
  true       the same model trained on the labeled split's *true* labels (a perfect annotator)
  pipeline   clean -> train r000 -> pseudo-label pool_001 -> train r001 -> pseudo-label pool_002
             -> train r002 (the demo's stages, same params)
All three use params.yaml as committed and are scored on the same test split.

    python bench/outcome.py --seeds 0 1 2 [--out bench/results/outcome.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported

from pipeline import augment, clean, demo, evaluate, ingest, pseudolabel, train  # noqa: E402
from pipeline.config import load_params  # noqa: E402


def train_and_test(work: Path, name: str, table: Path, params, pseudo: Path | None) -> float:
    ing = work / "ingest"
    train.run(
        table_path=table,
        images_path=ing / "images",
        classes_path=ing / "classes.json",
        augment_dir=work / "augment",
        pseudo_dir=pseudo,
        model_dir=work / name / "model",
        report_dir=work / name / "train",
        live_dir=work / name / "live",
        state_dir=work / name / ".state",
        params=params,
    )
    metrics = evaluate.run(
        work / name / "model", ing, work / name / "train", work / name / "eval", params, name
    )
    return metrics["accuracy"]


def one_seed(seed: int, overrides: dict) -> dict:
    params = load_params(ROOT / "params.yaml", {**overrides, "base.seed": seed})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "data"
        demo.run(data, params, register=False)
        ingest.run(data, work / "ingest", params)
        manifest = pd.read_csv(work / "ingest" / "manifest.csv", dtype=str, keep_default_na=False)
        rows = manifest[manifest["split"] == "train"]
        noisy, true = work / "noisy.csv", work / "true.csv"
        rows.to_csv(noisy, index=False)
        rows.assign(label=rows["true_label"]).to_csv(true, index=False)
        augment.run(
            noisy,
            work / "ingest" / "images",
            work / "ingest" / "classes.json",
            work / "augment",
            params,
        )
        started = time.perf_counter()
        result = {"seed": seed}
        result["noisy"] = train_and_test(work, "noisy", noisy, params, None)
        result["true"] = train_and_test(work, "true", true, params, None)

        clean_metrics = clean.run(work / "ingest", data, work / "clean", params)
        result["clean_precision"] = clean_metrics["truth"]["precision"]
        result["clean_recall"] = clean_metrics["truth"]["recall"]
        pseudolabel.init_pseudo(work / "init", params.base)
        pseudo_in = work / "init"
        pools = sorted(p.name for p in (data / "unlabeled").iterdir())
        for index in range(len(pools) + 1):
            name = f"r{index:03d}"
            result[name] = train_and_test(
                work, name, work / "clean" / "train.csv", params, pseudo_in
            )
            if index < len(pools):
                pm = pseudolabel.run(
                    round_name=name,
                    pool=pools[index],
                    data_dir=data,
                    model_dir=work / name / "model",
                    ingest_dir=work / "ingest",
                    pseudo_in=pseudo_in,
                    out_dir=work / name / "pseudo",
                    report_dir=work / name / "pseudo_report",
                    params=params,
                )
                result[f"{name}_pseudo_accuracy"] = pm.get("pseudo_label_accuracy")
                result[f"{name}_pseudo_accepted"] = pm["accepted"]
                pseudo_in = work / name / "pseudo"
        result["pipeline"] = result[f"r{len(pools):03d}"]
        result["seconds"] = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "outcome.json")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a param"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    results = [one_seed(seed, overrides) for seed in args.seeds]
    table = pd.DataFrame(results)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    mean = table[["noisy", "true", "pipeline"]].mean()
    print(
        f"\nmean test accuracy: noisy labels {mean['noisy']:.4f} | true labels {mean['true']:.4f} | "
        f"pipeline (clean + pseudo-labels) {mean['pipeline']:.4f} | pipeline / true = {mean['pipeline'] / mean['true']:.4f}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": results, "mean": mean.to_dict()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
