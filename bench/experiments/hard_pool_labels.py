"""Who labels the pool images the last pseudo-label set leaves out best? A diagnosis on the work
folder of a finished run (bench/experiments/rounds.py), against truth.csv, which a user does
not have.

The set the last round trained on was chosen by the previous round's ensemble (the teacher).
On the pool images it left out, compare:
  teacher        the teacher's own prediction
  shift TTA      the teacher's probabilities averaged over the nine 1-px shifts
  kNN k          k nearest neighbours (cosine, distance-weighted) in the teacher's embedding
                 space among the human training rows and the accepted pool images
  spreading      sklearn LabelSpreading on a 10- or 20-nearest-neighbour graph of those embeddings
  final model    the last round's own ensemble (the teacher of a next round)
and how often kNN and the teacher agree, and how right they are then.

    python bench/experiments/hard_pool_labels.py WORK LAST_ROUND   # e.g. /tmp/ll_0 r003
"""

import json
import os
import sys

os.environ["TQDM_DISABLE"] = "1"
from pathlib import Path

import numpy as np
from sklearn.neighbors import KNeighborsClassifier
from sklearn.semi_supervised import LabelSpreading

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT)]

from pipeline.ensemble import load_ensemble
from pipeline.io import Rows, read_array, read_table


def unit(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-8)


def shifted(images: np.ndarray) -> list[np.ndarray]:
    return [np.roll(images, (dy, dx), axis=(1, 2)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


work, last = Path(sys.argv[1]), sys.argv[2]
teacher = load_ensemble(work / f"r{int(last[1:]) - 1:03d}" / "model")
classes = np.array([str(c) for c in teacher.classes])
table = read_table(work / last / "pseudo" / "table.csv")
table = table[table["pool"].str.startswith("pool")].reset_index(drop=True)  # not clean's drops
truth = read_table(work / "data" / "truth.csv").set_index("path")["true_label"]
true = table["path"].map(truth).to_numpy(str)
accepted = (table["accepted"] == "True").to_numpy()
left = ~accepted
pool = np.asarray(Rows(read_array(work / last / "pseudo" / "images"), table["row"].astype(int)))
human = read_table(work / "clean" / "train.csv")
human_images = np.asarray(Rows(read_array(work / "ingest" / "images"), human["row"].astype(int)))
probs, pool_emb = teacher.predict(pool, embeddings=True)
_, human_emb = teacher.predict(human_images, embeddings=True)
teacher_says = classes[probs[left].argmax(1)]


def right(predicted: np.ndarray) -> float:
    return round(float((predicted == true[left]).mean()), 4)


known = unit(np.concatenate([human_emb, pool_emb[accepted]]))
known_y = np.concatenate([human["label"].to_numpy(str), table["label"].to_numpy(str)[accepted]])
out = {
    "work": str(work),
    "pool_images": len(table),
    "left_out": int(left.sum()),
    "set_accuracy": round(float((table["label"].to_numpy(str) == true)[accepted].mean()), 4),
    "teacher": right(teacher_says),
    "shift TTA": right(
        classes[np.mean([teacher.predict(s) for s in shifted(pool[left])], 0).argmax(1)]
    ),
}
for k in (5, 10, 20):
    knn = KNeighborsClassifier(k, weights="distance").fit(known, known_y)
    knn_says = knn.predict(unit(pool_emb[left]))
    out[f"kNN {k}"] = right(knn_says)
    if k == 10:
        agree = knn_says == teacher_says
        out["kNN 10 and teacher agree, share"] = round(float(agree.mean()), 4)
        out["kNN 10 and teacher agree, right"] = round(
            float((teacher_says == true[left])[agree].mean()), 4
        )
graph = np.concatenate([known, unit(pool_emb[left])])
index = {name: i for i, name in enumerate(classes)}
targets = np.array([index[y] for y in known_y] + [-1] * int(left.sum()))
for k in (10, 20):
    spread = LabelSpreading(kernel="knn", n_neighbors=k, alpha=0.5, max_iter=100).fit(
        graph, targets
    )
    out[f"spreading {k}"] = right(classes[spread.label_distributions_[len(known_y) :].argmax(1)])
out["final model"] = right(
    classes[load_ensemble(work / last / "model").predict(pool[left]).argmax(1)]
)
print(json.dumps(out))
