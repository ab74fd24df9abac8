"""Near duplicates in the clean stage's one embedding space: distinct rows against planted copies.

python bench/experiments/near_duplicates.py SEED REGIME   # e.g. 0 demo
"""

import io
import os
import sys
import tempfile

os.environ["TQDM_DISABLE"] = "1"
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import outcome

from pipeline.core.config import load_params
from pipeline.core.io import read_table
from pipeline.stages import clean, ingest

seed = int(sys.argv[1])
regime = sys.argv[2]
params = load_params(ROOT / "params.yaml", {**outcome.REGIMES[regime], "base.seed": seed})
with tempfile.TemporaryDirectory() as tmp:
    work = Path(tmp)
    data = work / "data"
    outcome.write_data(regime, data, params)
    files = sorted((data / "labeled").rglob("*.png"))
    rng = np.random.default_rng(0)
    pick = rng.choice(len(files), 30, replace=False)
    planted = {}
    for n, i in enumerate(pick):
        f = files[i]
        im = Image.open(f)
        kind = ["jpeg", "bright", "resize"][n % 3]
        if kind == "jpeg":
            b = io.BytesIO()
            im.convert("L").save(b, "JPEG", quality=90)
            out = f.with_name(f.stem + "_jpg.jpg")
            out.write_bytes(b.getvalue())
        elif kind == "bright":
            a = np.asarray(im).astype(int)
            out = f.with_name(f.stem + "_b.png")
            Image.fromarray(np.clip(a + 3, 0, 255).astype(np.uint8)).save(out)
        else:
            out = f.with_name(f.stem + "_r.png")
            im.resize((im.width * 2, im.height * 2), Image.BILINEAR).save(out)
        planted[str(out.relative_to(data))] = (str(f.relative_to(data)), kind)
    ingest.run(data, work / "ingest", params)
    cm = clean.run(work / "ingest", data, work / "clean", params)
    iss = read_table(work / "clean" / "issues.csv")
    emb = np.load(work / "clean" / "embeddings.npy")
    u = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    D = 1 - u @ u.T
    np.fill_diagonal(D, 9)
    idx = {p: i for i, p in enumerate(iss["path"])}
    both = {idx[a] for a in planted if a in idx} | {
        idx[b] for a, (b, k) in planted.items() if b in idx
    }
    distinct = [i for i in range(len(iss)) if i not in both]
    Dd = D[np.ix_(distinct, distinct)]
    nn = Dd.min(1)
    print(
        regime,
        seed,
        "rows",
        len(iss),
        "distinct nearest q0/0.5/1/5/50%:",
        np.round(np.percentile(nn, [0, 0.5, 1, 5, 50]), 5),
    )
    for thr in (0.0005, 0.001, 0.002, 0.005):
        print("  thr", thr, "distinct rate", round(float((nn <= thr).mean()), 4))
    flag = iss["is_near_duplicate_issue"].astype(str).eq("True").to_numpy()
    partner = iss["near_duplicate_of"].fillna("")
    print(
        "  flagged among distinct rows:",
        int(flag[distinct].sum()),
        "of",
        len(distinct),
        f"({flag[distinct].mean():.2%})",
    )
    print(
        "  planted pairs flagged:",
        {
            k: sum(
                1
                for a, (b, kk) in planted.items()
                if kk == k and a in idx and b in idx and (flag[idx[a]] or flag[idx[b]])
            )
            for k in ("jpeg", "bright", "resize")
        },
    )
    for a, (b, k) in list(planted.items())[:0]:
        if a in idx and b in idx:
            print(
                "  planted",
                k,
                round(float(D[idx[a], idx[b]]), 6),
                "rank-nearest?",
                int(D[idx[a]].argmin() == idx[b]),
            )
