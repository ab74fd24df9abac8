"""Finding label issues and unusual samples: pure functions over labels (N,), out-of-sample
pred_probs (N, K) and embeddings (N, D), on cleanlab and exact nearest neighbours.

find_issues      cleanlab's label issues and label quality scores, and the model's suggested class
near_duplicates  close pairs in embedding space (cosine), relative to the median neighbour distance
datalab_checks   cleanlab Datalab's class-imbalance and underperforming-group checks (optional extra)
outlier_scores   cleanlab's out-of-distribution score per row

The clean stage (pipeline/stages/clean.py) runs them; pipeline/data/label_decisions.py turns
what they find into decisions.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import sklearn
from cleanlab.filter import find_label_issues
from cleanlab.outlier import OutOfDistribution
from cleanlab.rank import get_label_quality_scores
from sklearn.neighbors import NearestNeighbors

# Exact neighbour searches compute distances a block of rows at a time; sklearn's default
# block (1 GiB) alone would put the clean stage over 2 GiB on 100k images.
KNN_WORKING_MIB = 128


def find_issues(labels: np.ndarray, pred_probs: np.ndarray, *, filter_by: str) -> pd.DataFrame:
    """cleanlab's label issues and quality scores, plus the model's suggested class."""
    if pred_probs.shape != (len(labels), pred_probs.shape[1]):
        raise ValueError(f"pred_probs has shape {pred_probs.shape}, labels has {len(labels)} rows")
    is_issue = find_label_issues(labels, pred_probs, filter_by=filter_by)
    quality = get_label_quality_scores(labels, pred_probs)
    others = pred_probs.copy()
    others[np.arange(len(labels)), labels] = -1.0
    return pd.DataFrame(
        {
            "label_issue": is_issue,
            "label_quality": quality,
            "suggested": others.argmax(1),
            "suggested_prob": others.max(1),
            "given_prob": pred_probs[np.arange(len(labels)), labels],
        }
    )


def near_duplicates(
    embeddings: np.ndarray, ratio: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(is_duplicate (N,) bool, partner (N,) int or -1, cosine distance to the nearest other
    row (N,), the cutoff): is_duplicate marks the later members of close pairs.

    The cutoff is `ratio` times the median nearest-neighbour distance: how tightly a model packs
    its embeddings varies with the data and the training, a copy's distance relative to its
    neighbours much less (demo: distinct digits' nearest neighbour lies at >= 0.24 of the median,
    re-encoded and brightened copies at <= 0.05).
    """
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    unit = embeddings / np.maximum(norms, 1e-12)
    nn = NearestNeighbors(n_neighbors=min(3, len(unit)), metric="cosine").fit(unit)
    with sklearn.config_context(working_memory=KNN_WORKING_MIB):
        distances, neighbors = nn.kneighbors(unit)
    # the nearest row other than itself: an exact copy ties with the row, in either order
    other = (neighbors != np.arange(len(unit))[:, None]).argmax(1)
    rows = np.arange(len(unit))
    distances, neighbors = distances[rows, other], neighbors[rows, other]
    cutoff = ratio * float(np.median(distances))
    partner = np.where(distances <= cutoff, neighbors, -1)
    # Flag only the later index of each pair, so one copy of every duplicate stays unflagged.
    is_dup = (partner >= 0) & (partner < np.arange(len(partner)))
    return is_dup, partner, distances, cutoff


DATALAB_CHECKS = ("class_imbalance", "underperforming_group")


def datalab_checks(
    labels: list[str], pred_probs: np.ndarray, embeddings: np.ndarray
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict] | None:
    """cleanlab Datalab's class-imbalance and underperforming-group checks on the stage's own
    pred_probs and embeddings: (flags per type, scores per type, summary), or None when the
    optional `datalab` extra (datasets, pyarrow: about 200 MB) is not installed.

    Datalab's non-iid check is not run: the table's order is the pipeline's own (sorted by split,
    class and path), so it could only find that sorting.
    """
    try:  # without the extra, cleanlab exports a stand-in that raises when called
        from cleanlab import Datalab

        lab = Datalab(data={"label": labels}, label_name="label", verbosity=0)
    except ImportError:
        return None
    neighbours = max(1, min(10, len(labels) - 1))  # Datalab's default k, on tiny sets fewer
    lab.find_issues(
        pred_probs=pred_probs,
        features=embeddings,
        issue_types={"class_imbalance": {}, "underperforming_group": {"k": neighbours}},
    )
    found = lab.get_issues()
    ran = [name for name in DATALAB_CHECKS if f"is_{name}_issue" in found]
    flags = {name: found[f"is_{name}_issue"].to_numpy(bool) for name in ran}
    scores = {name: found[f"{name}_score"].to_numpy(float) for name in ran}
    summary = {
        name: {"flagged": int(flags[name].sum())} if name in ran else "failed (see the log)"
        for name in DATALAB_CHECKS
    }
    if "class_imbalance" in ran:
        summary["class_imbalance"]["rarest_class"] = str(
            lab.get_info("class_imbalance").get("Rarest Class", "")
        )
    return flags, scores, summary


def outlier_scores(embeddings: np.ndarray) -> np.ndarray:
    """cleanlab's out-of-distribution score per row (lower = more unusual)."""
    k = min(10, len(embeddings) - 1)
    with sklearn.config_context(working_memory=KNN_WORKING_MIB):
        return OutOfDistribution(params={"k": k}).fit_score(features=embeddings, verbose=False)
