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
compare in. With a pretrained backbone (train.model.weights) the body's frozen features are that
space instead, and a logistic regression per fold on them is a K-fold candidate: seconds where
fine-tuned folds take minutes (pipeline/training/frozen.py).

The stage runs library code: finding the issues in pipeline/data/label_issues.py, the decisions
and overrides in pipeline/data/label_decisions.py, the page in pipeline/reports/clean_page.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from cleanlab.count import estimate_joint
from cleanlab.dataset import find_overlapping_classes, overall_label_health_score

from pipeline.core.config import Params, with_image_shape
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
from pipeline.core.typed import to_dict
from pipeline.data.inputs import stratified_holdout
from pipeline.data.label_decisions import (
    apply_overrides,
    decide,
    guarded_policy,
    read_overrides,
    truth_scores,
    validation_labels,
)
from pipeline.data.label_issues import (
    datalab_checks,
    find_issues,
    near_duplicates,
    outlier_scores,
)
from pipeline.data.quality import checks_for, image_issues
from pipeline.reports.clean_page import render
from pipeline.training.ensemble import predict_proba
from pipeline.training.feed import Samples, training_augmentation
from pipeline.training.frozen import features
from pipeline.training.kfold import kfold_pred_probs, recipe
from pipeline.training.loop import fit
from pipeline.training.model import build_model

log = logging.getLogger(__name__)


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
    model = build_model(params.train.model, params.base.channels, len(classes), pretrained=True)
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
# 2) Finding issues: pipeline/data/label_issues.py (pure functions over labels (N,),
#    pred_probs (N, K), features)

# --------------------------------------------------------------------------------------------
# 3) Decisions: pipeline/data/label_decisions.py

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

    # A pretrained backbone's frozen features: a K-fold candidate and the one embedding space.
    frozen = None
    if params.train.model.pretrained:
        body = build_model(params.train.model, params.base.channels, len(classes), pretrained=True)
        frozen = features(body, train_images, pick_device(), desc="clean: embeddings")
    # Out-of-sample probabilities, with the augmentation policy the final model will use.
    pred_probs, kfold_embeddings, budgets = kfold_pred_probs(
        train_images, labels, len(classes), params, classes, beside=out_dir, features=frozen
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
    embeddings = kfold_embeddings if frozen is None else frozen
    if cfg.embedding_steps > 0 and frozen is None:
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
