"""Second-opinion relabels on or off, judged on the same validation rows (test only reported).

python bench/experiments/recheck_val.py REGIME SEED [SEED ...]   # e.g. colour 0 1
"""

import json
import os
import sys
import tempfile

os.environ["TQDM_DISABLE"] = "1"
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import outcome

from pipeline.config import load_params
from pipeline.ensemble import load_ensemble
from pipeline.io import read_array, read_json, read_table, write_table

ON = {"clean.recheck_relabel": True}  # the "off" arm is derived from the same clean run
regime = sys.argv[1]
for seed in map(int, sys.argv[2:]):
    params = load_params(ROOT / "params.yaml", {**outcome.REGIMES[regime], "base.seed": seed, **ON})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "data"
        cm = outcome.prepare(regime, work, params)
        iss = read_table(work / "clean" / "issues.csv").set_index("id")
        tr = read_table(work / "clean" / "train.csv")
        va = read_table(work / "clean" / "val.csv")
        second = tr["id"].map(iss["reason"]).str.startswith("relabel_recheck")
        write_table(work / "off_train.csv", tr[~second])
        vsecond = va["reason"].str.startswith("relabel_recheck")
        write_table(
            work / "off_val.csv", va.assign(scored=np.where(vsecond, "False", va["scored"]))
        )
        right = (
            float((tr.loc[second, "label"] == tr.loc[second, "id"].map(iss["true_label"])).mean())
            if second.any()
            else None
        )
        out = {
            "regime": regime,
            "seed": seed,
            "relabeled": int(second.sum()),
            "relabels_right": right,
            "val_rows_relabeled": int(vsecond.sum()),
        }
        common = va[(va["scored"] == "True") & ~vsecond]
        classes = read_json(work / "ingest" / "classes.json")
        images = read_array(work / "ingest" / "images")
        x = np.asarray(images[common["row"].astype(int).to_numpy()])
        y = common["label"].map(classes.index).to_numpy()
        for name, t, v in (
            ("on", work / "clean" / "train.csv", work / "clean" / "val.csv"),
            ("off", work / "off_train.csv", work / "off_val.csv"),
        ):
            f = outcome.train_and_test(work, name, t, v, params, None)
            acc = float((load_ensemble(work / name / "model").predict(x).argmax(1) == y).mean())
            out[name] = {"val_common": round(acc, 4), "test": round(f["test"], 4)}
        out["common_rows"] = len(common)
        print(json.dumps(out), flush=True)
