"""clean stage: find wrong labels and bad samples with cleanlab on out-of-sample probabilities.

Reads   <ingest>/manifest.csv, images/, classes.json; data/overrides.csv (path,label|keep|drop)
Writes  <out>/train.csv        the cleaned training table the train stage reads
        <out>/val.csv          the validation split (carved before cleaning) and its scoring labels
        <out>/issues.csv       every training row: scores, issue types, decision and reason
        <out>/pred_probs.npy   (N, K) out-of-sample probabilities, rows as in issues.csv
        <out>/embeddings.npy   (N, D) penultimate features of the embedding model (one model for
                               every row; the K-fold's when clean.embedding_steps is 0)
        <out>/metrics.json     issues per type, noise estimate, label health, truth precision/recall,
                               the K-fold budgets tried and the one kept
        <out>/report.html      gallery of flagged samples, worst first
Params  base, clean (its own short K-fold recipe; clean.nproc > 1 spreads the folds over that many
        processes under torchrun), train.model (the model family), augment

The validation split is carved from the human-labeled rows *before* cleaning (stratified,
seeded, `clean.val_fraction` with at least `clean.val_min_per_class` per class), so it is the
same rows whatever cleaning decides, in every round and experiment. Its rows are never trained
on, but the K-fold scores them like every other row, and a validation row flagged as a label
issue is scored against the model's suggestion when that is confident
(>= clean.relabel_threshold), otherwise left out of the score and counted: a noisy validation
label would otherwise reward checkpoints that learned the noise.

The K-fold (pipeline/training/kfold.py) runs at each budget in clean.min_steps and keeps the run whose
out-of-fold predictions agree best with the given labels (metrics.json `kfold_budgets`).

The embedding model is one model trained, after the K-fold, on the rows a first pass keeps
(clean.embedding_steps): its embeddings are the one space near-duplicate and outlier scores
compare in.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import sklearn
import torch
from cleanlab.count import estimate_joint
from cleanlab.dataset import find_overlapping_classes, overall_label_health_score
from cleanlab.filter import find_label_issues
from cleanlab.outlier import OutOfDistribution
from cleanlab.rank import get_label_quality_scores
from sklearn.neighbors import NearestNeighbors

from pipeline.core.config import Params, to_dict, with_image_shape
from pipeline.core.device import pick_device
from pipeline.core.errors import PipelineError
from pipeline.core.io import (
    read_array,
    read_json,
    read_table,
    write_array,
    write_json,
    write_table,
    write_text,
)
from pipeline.data.images import thumbnail
from pipeline.data.inputs import confine, stratified_holdout
from pipeline.data.quality import checks_for, image_issues
from pipeline.reports import report
from pipeline.training.ensemble import predict_proba
from pipeline.training.feed import Samples, training_augmentation
from pipeline.training.kfold import kfold_pred_probs, recipe
from pipeline.training.loop import fit
from pipeline.training.model import build_model

log = logging.getLogger(__name__)

# Exact neighbour searches compute distances a block of rows at a time; sklearn's default
# block (1 GiB) alone would put the clean stage over 2 GiB on 100k images.
KNN_WORKING_MIB = 128


# --------------------------------------------------------------------------------------------
# 1) Out-of-sample probabilities (the K-fold, pipeline/training/kfold.py) and one embedding space


def embedding_model(
    images: np.ndarray, labels: np.ndarray, trains: np.ndarray, params: Params, classes: list[str]
) -> np.ndarray:
    """Embeddings (N, D) of every row from one model trained on the rows where `trains` holds.

    The K-fold's embeddings come from five models, each its own space; this one puts every row
    in one space for the similarity checks, learned from the rows cleaning keeps.
    """
    device = pick_device()
    torch.manual_seed(params.base.seed)
    model = build_model(params.train.model, params.base.channels, len(classes))
    fit(
        model,
        Samples(images[trains], labels[trains]),
        None,
        recipe(params, params.clean.embedding_steps),
        seed=params.base.seed,
        device=device,
        augmentation=training_augmentation(params.augment, params.base, classes, device),
        desc="clean: embedding model",
    )
    return predict_proba([model], images, device, embeddings=True)[1]


# --------------------------------------------------------------------------------------------
# 2) Finding issues (pure functions over labels (N,), pred_probs (N, K), features)


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


# --------------------------------------------------------------------------------------------
# 3) Decisions


def decide(
    issues: pd.DataFrame,
    classes: list[str],
    *,
    policy: str,
    relabel_threshold: float,
) -> pd.DataFrame:
    """A decision (keep, flag, drop, relabel) and a reason for each row."""
    decision = np.full(len(issues), "keep", dtype=object)
    reason = np.full(len(issues), "", dtype=object)
    final = issues["given_label"].to_numpy(dtype=object).copy()
    for i, row in enumerate(issues.itertuples()):
        other_types = [t for t in row.issue_types.split(";") if t and t != "label_issue"]
        if row.label_issue:
            said = f"given {row.given_label!r}, model says {row.suggested_label!r} (p={row.suggested_prob:.2f})"
            if policy == "flag":
                decision[i], reason[i] = "flag", f"label_issue: {said}"
            elif policy.startswith("relabel") and row.suggested_prob >= relabel_threshold:
                decision[i], reason[i] = "relabel", f"relabel_confident: {said}"
                final[i] = row.suggested_label
            elif policy == "relabel_keep":
                decision[i] = "flag"
                reason[i] = (
                    f"kept_not_confident: {said} < clean.relabel_threshold {relabel_threshold}"
                )
            elif policy == "relabel":
                decision[i] = "drop"
                reason[i] = (
                    f"drop_not_confident: {said} < clean.relabel_threshold {relabel_threshold}"
                )
            else:
                decision[i], reason[i] = "drop", f"label_issue: {said}"
        elif other_types:
            decision[i], reason[i] = "flag", ", ".join(other_types)
    out = issues.copy()
    out["decision"], out["reason"], out["label"] = decision, reason, final
    return out


def guarded_policy(
    labels: np.ndarray, pred_probs: np.ndarray, policy: str, max_noise_rate: float
) -> tuple[str, str]:
    """(policy to apply, warning or ""): flag only when the K-fold models are too weak to judge.

    When the estimated share of wrong labels is implausibly high, the usual cause is that the
    K-fold models barely beat chance (too few images, a recipe unfit for the data), not that most
    labels are wrong; dropping or relabeling would then throw away good labels.
    """
    noise = float(1.0 - np.trace(estimate_joint(labels, pred_probs)))
    if noise <= max_noise_rate or policy == "flag":
        return policy, ""
    accuracy = float((pred_probs.argmax(1) == labels).mean())
    chance = float(np.bincount(labels).max() / len(labels))
    return "flag", (
        f"the K-fold models estimate {noise:.0%} of the labels as wrong (above clean.max_noise_rate "
        f"{max_noise_rate}) and agree with only {accuracy:.0%} of the given labels (majority class: "
        f"{chance:.0%}); that usually means the models are too weak to judge the labels, not that "
        f"the labels are that bad. Nothing was dropped or relabeled (clean.policy {policy!r} "
        f"applied as 'flag'); review artifacts/clean/report.html, and check the image size and "
        f"channels ingest used (artifacts/ingest/params.json) and train.model before trusting "
        f"the flags."
    )


def validation_labels(
    decided: pd.DataFrame,
    *,
    relabel_threshold: float,
    trust_model: bool = True,
) -> tuple[pd.Series, pd.Series]:
    """(label scored against, scored?) for validation rows, whatever clean.policy says.

    Overrides win; a flagged label is replaced by a confident suggestion, otherwise the row is
    left out of the score. Without trust_model (the noise guard tripped) flagged rows keep their
    given label and are scored.
    """
    label = decided["given_label"].copy()
    scored = pd.Series(True, index=decided.index)
    for idx, row in decided.iterrows():
        if row["reason"].startswith("override:"):
            label[idx], scored[idx] = row["label"], row["decision"] != "drop"
        elif row["label_issue"] and trust_model:
            confident = row["suggested_prob"] >= relabel_threshold
            label[idx], scored[idx] = row["suggested_label"], confident
    return label, scored


def read_overrides(data_dir: Path, classes: list[str], path: Path | None = None) -> pd.DataFrame:
    """data/overrides.csv (or `path`) as (path, action): action is keep, drop or a class name."""
    path = path or data_dir / "overrides.csv"
    if not path.is_file():
        return pd.DataFrame(columns=["path", "action"])
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path} is not a readable CSV: {exc}") from None
    except pd.errors.EmptyDataError:
        return pd.DataFrame(columns=["path", "action"])
    if not {"path", "label"} <= set(table.columns):
        raise PipelineError(
            f"{path} needs the columns path,label; it has {','.join(table.columns)}"
        )
    table = table.assign(path=table["path"].str.strip(), action=table["label"].str.strip())
    for line, row in enumerate(table.itertuples(), start=2):
        _, why = confine(data_dir, row.path)
        if why:
            raise PipelineError(f"{path}:{line}: {row.path!r}: {why}")
        if row.action not in ("keep", "drop") and row.action not in classes:
            raise PipelineError(
                f"{path}:{line}: {row.action!r} is not keep, drop or a class ({', '.join(classes)})"
            )
    conflicts = table.groupby("path")["action"].nunique()
    if (conflicts > 1).any():
        first = conflicts[conflicts > 1].index[0]
        actions = sorted(table.loc[table["path"] == first, "action"])
        raise PipelineError(f"{path}: {first!r} is overridden twice, as {' and '.join(actions)}")
    return table[["path", "action"]].drop_duplicates()


def apply_overrides(decided: pd.DataFrame, overrides: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """User overrides win over every decision; returns (table, overrides that matched nothing)."""
    out = decided.copy()
    by_path = dict(zip(overrides["path"], overrides["action"]))
    matched = 0
    for idx, path in out["path"].items():
        action = by_path.get(path)
        if action is None:
            continue
        matched += 1
        if action == "keep":
            out.loc[idx, ["decision", "label"]] = ["keep", out.loc[idx, "given_label"]]
        elif action == "drop":
            out.loc[idx, "decision"] = "drop"
        else:
            out.loc[idx, ["decision", "label"]] = [
                "relabel" if action != out.loc[idx, "given_label"] else "keep",
                action,
            ]
        out.loc[idx, "reason"] = f"override: {action} (data/overrides.csv)"
    return out, len(by_path) - matched


def truth_scores(flagged: np.ndarray, given: pd.Series, truth: pd.Series) -> dict:
    """Precision and recall of flagged label issues against data/truth.csv, where known."""
    known = (truth != "").to_numpy()
    if not known.any():
        return {}
    wrong = (given != truth).to_numpy() & known
    hits = int((flagged & wrong).sum())
    return {
        "truth_rows": int(known.sum()),
        "truly_wrong": int(wrong.sum()),
        "precision": hits / max(int((flagged & known).sum()), 1),
        "recall": hits / max(int(wrong.sum()), 1),
    }


# --------------------------------------------------------------------------------------------
# 4) The stage


def run(
    ingest_dir: Path,
    data_dir: Path,
    out_dir: Path,
    params: Params,
    overrides_path: Path | None = None,
) -> dict:
    manifest = read_table(ingest_dir / "manifest.csv")
    classes = read_json(ingest_dir / "classes.json")
    images = read_array(ingest_dir / "images")
    params = with_image_shape(params, images.shape)
    table = manifest[manifest["split"] == "train"].reset_index(drop=True)
    if len(classes) < 2:
        raise PipelineError(f"cleaning needs at least 2 classes; {ingest_dir} has {len(classes)}")
    cfg = params.clean
    is_val = stratified_holdout(
        table["label"], cfg.val_fraction, params.base.seed, minimum=cfg.val_min_per_class
    ).to_numpy()
    overrides = read_overrides(Path(data_dir), classes, overrides_path)
    labels = table["label"].map(classes.index).to_numpy(np.int64)
    train_images = np.ascontiguousarray(images[table["row"].astype(int).to_numpy()])

    # Out-of-sample probabilities, with the augmentation policy the final model will use.
    pred_probs, kfold_embeddings, budgets = kfold_pred_probs(
        train_images, labels, len(classes), params, classes, beside=out_dir
    )
    found = find_issues(labels, pred_probs, filter_by=params.clean.filter_by)
    policy, guard = guarded_policy(labels, pred_probs, cfg.policy, cfg.max_noise_rate)
    if guard:
        log.warning("clean: WARNING %s", guard)
    issues = pd.DataFrame(
        {
            "id": table["id"],
            "path": table["path"],
            "row": table["row"],
            "split": np.where(is_val, "val", "train"),
            "given_label": table["label"],
            "suggested_label": [classes[i] for i in found["suggested"]],
            "suggested_prob": found["suggested_prob"],
            "given_prob": found["given_prob"],
            "label_quality": found["label_quality"],
            "label_issue": found["label_issue"],
            "predicted_label": [classes[i] for i in pred_probs.argmax(1)],
        }
    )

    # The embedding model, trained on what a first pass over the label issues keeps.
    embeddings = kfold_embeddings
    if cfg.embedding_steps > 0:
        first, _ = apply_overrides(
            decide(
                issues.assign(issue_types=""),
                classes,
                policy=policy,
                relabel_threshold=cfg.relabel_threshold,
            ),
            overrides,
        )
        trains = ~is_val & (first["decision"] != "drop").to_numpy()
        first_labels = first["label"].map(classes.index).to_numpy(np.int64)
        embeddings = embedding_model(train_images, first_labels, trains, params, classes)

    is_dup, partner, nearest, cutoff = near_duplicates(embeddings, cfg.near_duplicate_ratio)
    ood = outlier_scores(embeddings)
    is_outlier = (
        ood <= np.quantile(ood, params.clean.outlier_quantile)
        if params.clean.outlier_quantile > 0
        else np.zeros(len(ood), bool)
    )
    quality = image_issues(
        [Path(data_dir) / p for p in table["path"]], cfg.quality, params.base.channels
    )
    checks = checks_for(params.base.channels)
    issues["near_duplicate_of"] = [table["path"][p] if d else "" for d, p in zip(is_dup, partner)]
    issues["outlier_score"] = ood
    issues["true_label"] = table.get("true_label", pd.Series([""] * len(table)))
    types = {
        "label_issue": found["label_issue"].to_numpy(),
        "near_duplicate": is_dup,
        "outlier": is_outlier,
    }
    types.update({k: quality[f"is_{k}_issue"].to_numpy(bool) for k in checks})
    datalab = datalab_checks(list(table["label"]), pred_probs, embeddings)
    if datalab is None:
        log.info(
            "clean: class-imbalance and underperforming-group checks need cleanlab's Datalab: "
            "pip install -e '.[datalab]'"
        )
    else:
        types.update(datalab[0])
    issues["issue_types"] = [";".join(t for t in types if types[t][i]) for i in range(len(issues))]
    # cleanlab Datalab's shape: is_<type>_issue and <type>_score (lower = more severe) per type
    type_scores = {
        "label": found["label_quality"].to_numpy(),
        # the near-duplicate flag is cosine distance <= the cutoff: score 0.5 there
        "near_duplicate": 1.0 - 0.5 ** (nearest / max(cutoff, 1e-12)),
        "outlier": ood,
        **{k: quality[f"{k}_score"].to_numpy(float) for k in checks},
        **(datalab[1] if datalab else {}),
    }
    for name, values in type_scores.items():
        issues[f"is_{name}_issue"] = types["label_issue" if name == "label" else name]
        issues[f"{name}_score"] = values
    decided = decide(
        issues,
        classes,
        policy=policy,
        relabel_threshold=cfg.relabel_threshold,
    )
    decided, unmatched = apply_overrides(decided, overrides)
    val = decided[is_val].copy()
    val["label"], val["scored"] = validation_labels(
        val,
        relabel_threshold=cfg.relabel_threshold,
        trust_model=not guard,
    )
    decided.loc[is_val, "decision"] = np.where(val["scored"], "validate", "unscored")
    decided.loc[is_val, "label"] = val["label"]  # what the row is scored against

    kept = decided[~is_val & (decided["decision"] != "drop")]
    if kept.empty:
        raise PipelineError(
            "every training image was dropped: check data/overrides.csv, or set clean.policy: flag"
        )
    emptied = sorted(set(classes) - set(kept["label"]))
    if emptied:
        raise PipelineError(
            f"cleaning would leave class {emptied[0]!r} with no training images: "
            f"set clean.policy: flag or keep some of its images in data/overrides.csv"
        )
    if not val["scored"].any():
        raise PipelineError(
            "the validation split is empty: raise clean.val_fraction or clean.val_min_per_class"
        )
    cleaned = kept[["id", "path", "row", "label", "given_label", "decision", "reason"]]

    metrics = clean_metrics(labels, pred_probs, decided, types, classes, unmatched)
    metrics["policy_applied"] = policy
    metrics["kfold_budgets"] = budgets
    metrics["datalab"] = datalab[2] if datalab else "not installed: pip install -e '.[datalab]'"
    metrics["guard"] = guard
    metrics["validation"] = {
        "rows": len(val),
        "scored": int(val["scored"].sum()),
        "scored_as_suggested": int((val["scored"] & (val["label"] != val["given_label"])).sum()),
        "unscored": int((~val["scored"]).sum()),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_table(out_dir / "train.csv", cleaned)
    write_table(
        out_dir / "val.csv", val[["id", "path", "row", "label", "given_label", "scored", "reason"]]
    )
    write_table(out_dir / "issues.csv", decided)
    write_array(out_dir / "pred_probs.npy", pred_probs)
    write_array(out_dir / "embeddings.npy", embeddings)
    write_json(out_dir / "metrics.json", metrics)
    write_json(
        out_dir / "params.json", {"base": to_dict(params.base), "clean": to_dict(params.clean)}
    )
    write_text(
        out_dir / "report.html",
        render(decided, images, metrics, params.clean.gallery_size, data_dir),
    )
    truth = metrics.get("truth", {})
    log.info(
        "clean: %d label issues of %d (%s), %d dropped, %d relabeled%s",
        metrics["label_issues"],
        len(decided),
        f"estimated noise {metrics['estimated_noise_rate']:.1%}",
        metrics["decisions"].get("drop", 0),
        metrics["decisions"].get("relabel", 0),
        f"; vs truth: precision {truth['precision']:.2f}, recall {truth['recall']:.2f}"
        if truth
        else "",
    )
    return metrics


def clean_metrics(labels, pred_probs, decided, types, classes, unmatched) -> dict:
    joint = estimate_joint(labels, pred_probs)
    overlapping = find_overlapping_classes(labels=labels, pred_probs=pred_probs, class_names=None)
    top_pairs = [
        {
            "classes": [classes[int(r["Class Index A"])], classes[int(r["Class Index B"])]],
            "joint": float(r["Joint Probability"]),
        }
        for _, r in overlapping.head(5).iterrows()
    ]
    metrics = {
        "train_rows": len(decided),
        "label_issues": int(decided["label_issue"].sum()),
        "issues_by_type": {t: int(np.asarray(v).sum()) for t, v in types.items()},
        "decisions": {str(k): int(v) for k, v in decided["decision"].value_counts().items()},
        "estimated_noise_rate": float(1.0 - np.trace(joint)),
        "label_health_score": float(overall_label_health_score(labels, pred_probs, verbose=False)),
        "noise_per_class": {
            classes[k]: float(1.0 - joint[k, k] / max(joint[k].sum(), 1e-12))
            for k in range(len(classes))
        },
        "overlapping_classes": top_pairs,
        "out_of_sample_accuracy": float((pred_probs.argmax(1) == labels).mean()),
        "overrides_unmatched": unmatched,
    }
    truth = truth_scores(
        decided["label_issue"].to_numpy(), decided["given_label"], decided["true_label"]
    )
    if truth:
        metrics["truth"] = truth
    return metrics


def _chosen(metrics: dict) -> dict | None:
    return next((b for b in metrics.get("kfold_budgets", []) if b["chosen"]), None)


def render(
    decided: pd.DataFrame, images: np.ndarray, metrics: dict, limit: int, data_dir: Path
) -> str:
    flagged = decided[decided["issue_types"] != ""].sort_values("label_quality")
    truth = metrics.get("truth")
    summary = [
        ("training images", metrics["train_rows"]),
        ("label issues", metrics["label_issues"]),
        ("estimated noise", f"{metrics['estimated_noise_rate']:.1%}"),
        ("label health", f"{metrics['label_health_score']:.2f}"),
        ("out-of-sample accuracy", f"{metrics['out_of_sample_accuracy']:.1%}"),
        ("K-fold budget", f"{chosen['min_steps']} steps" if (chosen := _chosen(metrics)) else "-"),
    ]
    if truth:
        summary += [
            ("precision vs truth", f"{truth['precision']:.2f}"),
            ("recall vs truth", f"{truth['recall']:.2f}"),
        ]
    tiles = []
    for row in flagged.head(limit).itertuples():
        verdict = ""
        if row.true_label:
            ok = row.true_label != row.given_label
            verdict = f"<div class='{'good' if ok == row.label_issue else 'bad'}'>truth: {report.esc(row.true_label)}</div>"
        tiles.append(
            "<div class='tile'>"
            + report.pictures(images[int(row.row)], thumbnail(data_dir / row.path))
            + f"<div>given <b>{report.esc(row.given_label)}</b> &rarr; suggested <b>{report.esc(row.suggested_label)}</b> "
            f"({row.suggested_prob:.2f})</div>"
            f"<div>quality {row.label_quality:.3f} &middot; {report.esc(row.issue_types.replace(';', ', '))}</div>"
            f"<div>decision: <b>{report.esc(row.decision)}</b></div>{verdict}"
            f"<div class='path'>{report.esc(row.path)}</div></div>"
        )
    by_type = report.table(["issue type", "count"], sorted(metrics["issues_by_type"].items()))
    budgets = report.table(
        ["steps per fold at least", "agreement with the given labels", "log loss", "kept"],
        [
            (
                b["min_steps"],
                f"{b['accuracy']:.1%}",
                f"{b['log_loss']:.3f}",
                "yes" if b["chosen"] else "",
            )
            for b in metrics.get("kfold_budgets", [])
        ],
    )
    per_class = report.table(
        ["class", "estimated noise"], [(k, v) for k, v in metrics["noise_per_class"].items()]
    )
    pairs = report.table(
        ["classes", "joint probability"],
        [(" / ".join(p["classes"]), p["joint"]) for p in metrics["overlapping_classes"]],
    )
    body = (
        "<h1>Label issues and sample quality</h1>"
        "<p class='muted'>Out-of-sample probabilities from K-fold training; cleanlab finds the labels "
        "the models disagree with. Worst label quality first.</p>"
        + report.cards(summary)
        + f"<h2>Issues by type</h2>{by_type}<h2>Estimated noise per class</h2>{per_class}"
        + "<h2>K-fold budgets tried</h2><p class='muted'>The run whose held-out predictions "
        "agree best with the given labels is kept (clean.min_steps).</p>"
        + budgets
        + f"<h2>Most overlapping classes</h2>{pairs}"
        + f"<h2>Flagged samples ({len(flagged)}, showing {min(limit, len(flagged))})</h2>"
        + f"<div class='gallery'>{''.join(tiles)}</div>"
    )
    return report.page("Label issues", body)
