"""Where the low-label regime's gap to the ceiling comes from: the human side or the pool side.

One seed's rounds run as bench/outcome.py runs them; then the last round is retrained with one
side replaced by its truth (truth.csv, which a user does not have: a diagnosis, not a recipe):

  r000 kept rows, true labels   clean's training rows with their true labels (the noise it left)
  r000 all rows, true labels    every labeled row, true labels (what dropping rows cost)
  last, true human rows         every labeled row true, the pipeline's own pseudo-label set
  last, true pool               clean's training rows, every pool image with its true label
  last, every pool image        the pipeline's rows and the last model's prediction for every
                                pool image, confident or not
  ceiling                       every labeled row and pool image true

Test accuracy is reported only; nothing is chosen from it.

    python bench/experiments/gap.py SEED [SEED ...]    # e.g. 0 1; about 12 min a seed on 2 cores
"""

import json
import os
import sys
import tempfile

os.environ["TQDM_DISABLE"] = "1"
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import outcome

from pipeline.core.config import load_params
from pipeline.core.io import read_table, write_table
from pipeline.stages import pseudolabel


def every_pool_image(work: Path, final_pseudo: Path) -> Path:
    """The last pseudo-label table with every row accepted: its label where it was accepted,
    the model's prediction otherwise."""
    table = read_table(final_pseudo / "table.csv")
    kept = table["accepted"] == "True"
    out = work / "every_pool_image"
    out.mkdir()
    table = table.assign(label=table["label"].where(kept, table["predicted"]), accepted="True")
    write_table(out / "table.csv", table)
    (out / "images").symlink_to(final_pseudo / "images", target_is_directory=True)
    return out


def one_seed(seed: int) -> dict:
    params = load_params(ROOT / "params.yaml", {**outcome.REGIMES["low-label"], "base.seed": seed})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "data"
        outcome.prepare("low-label", work, params)
        truth = read_table(work / "ingest" / "manifest.csv").set_index("id")["true_label"]
        kept = read_table(work / "clean" / "train.csv")
        write_table(work / "kept_true.csv", kept.assign(label=kept["id"].map(truth)))
        true_all = outcome.baseline_tables(work)["true"][0]
        train_csv, val_csv = work / "clean" / "train.csv", work / "clean" / "val.csv"

        def test_of(name, table, pseudo=None):
            return round(
                outcome.train_and_test(work, name, table, val_csv, params, pseudo)["test"], 4
            )

        out = {
            "seed": seed,
            "kept_rows": len(kept),
            "kept_rows_wrong": int((kept["label"] != kept["id"].map(truth)).sum()),
            "r000": test_of("r000", train_csv),
            "r000 kept rows, true labels": test_of("kept_true", work / "kept_true.csv"),
            "r000 all rows, true labels": test_of("true_all", true_all),
        }
        pseudo_in = work / "r000" / "pseudo"
        pseudolabel.init_pseudo(pseudo_in, work / "ingest" / "images")
        pools = sorted(p.name for p in (data / "unlabeled").iterdir())
        for index, pool in enumerate(pools, start=1):
            name, previous = f"r{index:03d}", f"r{index - 1:03d}"
            pseudo_in, _ = outcome.pseudo_round(work, name, pool, previous, pseudo_in, params)
            out[name] = test_of(name, train_csv, pseudo_in)
        out["last, true human rows"] = test_of("true_human", true_all, pseudo_in)
        ceiling = outcome.ceiling_pseudo(work, pseudo_in)
        out["last, true pool"] = test_of("true_pool", train_csv, ceiling)
        out["last, every pool image"] = test_of(
            "every_pool", train_csv, every_pool_image(work, pseudo_in)
        )
        out["ceiling"] = test_of("ceiling", true_all, ceiling)
    return out


if __name__ == "__main__":
    for seed in map(int, sys.argv[1:]):
        print(json.dumps(one_seed(seed)), flush=True)
