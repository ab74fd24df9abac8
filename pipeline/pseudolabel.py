"""pseudolabel stage: confident predictions on one unlabeled pool join the next round's training.

Reads   data/unlabeled/<pool>/**, the round's ensemble, <ingest>/manifest.csv (content hashes of
        labeled and test images), the round's pseudo-label input, data/truth.csv (optional)
Writes  <out>/table.csv + images.npy   the cumulative set: previous rounds' rows + this round's
        <report>/metrics.json, candidates.csv, quarantine.csv, confidence.png, report.html
Params  base, ingest (decoding limits), pseudolabel

Also `init_pseudo`, which writes the empty set round 0 starts from.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import report
from pipeline.config import BaseConfig, Params, PseudolabelConfig, to_dict
from pipeline.errors import PipelineError
from pipeline.ingest import QUARANTINE_COLUMNS, pack, read_truth, scan_folder
from pipeline.io import (
    atomic_dir,
    read_array,
    read_json,
    read_table,
    write_array,
    write_json,
    write_table,
    write_text,
)
from pipeline.train import load_ensemble

log = logging.getLogger(__name__)

PSEUDO_COLUMNS = [
    "id",
    "path",
    "sha256",
    "label",
    "confidence",
    "threshold",
    "pool",
    "round",
    "model",
    "row",
]


# --------------------------------------------------------------------------------------------
# 1) Thresholds and selection (pure functions over pred_probs (N, K))


def class_thresholds(pred_probs: np.ndarray, cfg: PseudolabelConfig) -> np.ndarray:
    """Per-class confidence thresholds (K,).

    fixed: tau for every class. flexmatch: tau scaled by how well each class is learned,
    beta_c = sigma_c / max(max_c sigma_c, unused) with sigma_c the confident predictions of
    class c, mapped through x / (2 - x) so poorly learned classes get a lower bar.
    """
    k = pred_probs.shape[1]
    tau = cfg.threshold
    if cfg.policy == "fixed":
        return np.full(k, tau)
    confident = pred_probs.max(1) >= tau
    sigma = np.bincount(pred_probs.argmax(1)[confident], minlength=k).astype(float)
    unused = float((~confident).sum())
    beta = sigma / max(sigma.max(), unused, 1.0)
    return tau * beta / (2.0 - beta)


def select(
    pred_probs: np.ndarray,
    member_probs: np.ndarray,
    cfg: PseudolabelConfig,
    labeled_share: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which rows to accept: (accepted (N,) bool, predicted (N,), threshold used (N,))."""
    predicted = pred_probs.argmax(1)
    confidence = pred_probs.max(1)
    thresholds = class_thresholds(pred_probs, cfg)[predicted]
    accepted = confidence >= thresholds
    if cfg.agreement and len(member_probs):
        accepted &= (member_probs.argmax(2) == predicted[None, :]).all(0)
    k = pred_probs.shape[1]
    caps = np.full(k, np.iinfo(np.int64).max)
    if cfg.per_class_cap > 0:
        caps[:] = cfg.per_class_cap
    if cfg.balance:
        counts = np.bincount(predicted[accepted], minlength=k)
        # The largest total whose class split follows the labeled distribution.
        share = np.maximum(labeled_share, 1e-12)
        total = np.min(np.where(labeled_share > 0, counts / share, np.inf))
        caps = np.minimum(caps, np.floor(total * labeled_share).astype(np.int64))
    for c in range(k):
        members = np.flatnonzero(accepted & (predicted == c))
        if len(members) > caps[c]:
            ranked = members[np.argsort(-confidence[members], kind="stable")]
            accepted[ranked[caps[c] :]] = False
    return accepted, predicted, thresholds


# --------------------------------------------------------------------------------------------
# 2) The stages


def init_pseudo(out_dir: Path, base: BaseConfig) -> None:
    """The empty pseudo-label set round 0 trains with."""
    with atomic_dir(out_dir) as tmp:
        write_table(tmp / "table.csv", pd.DataFrame(columns=PSEUDO_COLUMNS))
        write_array(
            tmp / "images.npy",
            np.zeros((0, base.image_size, base.image_size, base.channels), np.uint8),
        )


def run(
    *,
    round_name: str,
    pool: str,
    data_dir: Path,
    model_dir: Path,
    ingest_dir: Path,
    pseudo_in: Path,
    out_dir: Path,
    report_dir: Path,
    params: Params,
) -> dict:
    cfg = params.pseudolabel
    pool_dir = data_dir / "unlabeled" / pool
    if not pool_dir.is_dir():
        raise PipelineError(
            f"pool {pool!r} not found: expected {pool_dir} (see `python -m pipeline add-pool`)"
        )
    ensemble = load_ensemble(model_dir)
    classes = read_json(ingest_dir / "classes.json")
    manifest = read_table(ingest_dir / "manifest.csv")
    previous = read_table(pseudo_in / "table.csv")
    previous_images = read_array(pseudo_in / "images.npy")
    model_id = hashlib.sha256((model_dir / "ensemble.json").read_bytes()).hexdigest()[:12]

    # 1) decode the pool exactly as ingest decodes labeled images
    candidates, quarantine = scan_folder(data_dir, f"unlabeled/{pool}", by_class=False)
    scratch = out_dir.parent / f".{out_dir.name}.pool"
    table, rejected = pack(
        candidates,
        data_dir,
        scratch,
        params.base,
        params.ingest.max_image_pixels,
        split="pool",
        desc=f"pool {pool}",
    )
    quarantine += rejected
    pool_images = np.asarray(read_array(scratch))
    shutil.rmtree(scratch)
    if not candidates:
        quarantine.append(
            {"path": f"unlabeled/{pool}", "split": "pool", "reason": "empty pool (no images)"}
        )

    # 2) never pseudo-label test images, copies of labeled images, or what is already accepted
    known = dict(zip(manifest["sha256"], manifest["split"]))
    known.update({sha: "pseudo" for sha in previous["sha256"]})
    seen: set[str] = set()
    eligible = np.ones(len(table), bool)
    for i, row in enumerate(table.itertuples()):
        why = {
            "test": "same image as a test image",
            "train": "same image as a labeled image",
            "pseudo": "already pseudo-labeled in an earlier round",
        }.get(known.get(row.sha256, ""))
        if why is None and row.sha256 in seen:
            why = "exact duplicate within the pool"
        if why:
            eligible[i] = False
            quarantine.append({"path": row.path, "split": "pool", "reason": why})
        seen.add(row.sha256)

    # 3) predict the eligible images only, and select
    eligible_images = pool_images[eligible]
    probs, member_probs = ensemble.predict(eligible_images, members=True)
    labeled_share = (
        manifest.loc[manifest["split"] == "train", "label"]
        .value_counts()
        .reindex(classes, fill_value=0)
        .to_numpy(float)
    )
    labeled_share /= max(labeled_share.sum(), 1.0)
    accepted, predicted, thresholds = select(probs, member_probs, cfg, labeled_share)
    candidates_table = (
        table[eligible]
        .reset_index(drop=True)
        .assign(
            predicted=[classes[i] for i in predicted],
            confidence=probs.max(1),
            threshold=thresholds,
            accepted=accepted,
        )
    )
    truth = read_truth(data_dir)
    candidates_table["true_label"] = [truth.get(p, "") for p in candidates_table["path"]]
    new = candidates_table[candidates_table["accepted"]]
    new_rows = pd.DataFrame(
        {
            "id": new["id"],
            "path": new["path"],
            "sha256": new["sha256"],
            "label": new["predicted"],
            "confidence": new["confidence"],
            "threshold": new["threshold"],
            "pool": pool,
            "round": round_name,
            "model": model_id,
        }
    )
    cumulative = pd.concat([previous.drop(columns="row"), new_rows], ignore_index=True)
    cumulative["row"] = np.arange(len(cumulative))
    images = (
        np.concatenate([previous_images, eligible_images[new.index.to_numpy()]])
        if len(new)
        else previous_images
    )

    metrics = pseudo_metrics(
        candidates_table, classes, len(table), len(quarantine), len(cumulative)
    )
    with atomic_dir(out_dir) as tmp:
        write_table(tmp / "table.csv", cumulative[PSEUDO_COLUMNS])
        write_array(tmp / "images.npy", np.ascontiguousarray(images))
    with atomic_dir(report_dir) as tmp:
        write_json(tmp / "metrics.json", metrics)
        write_table(tmp / "candidates.csv", candidates_table)
        write_table(tmp / "quarantine.csv", pd.DataFrame(quarantine, columns=QUARANTINE_COLUMNS))
        write_json(tmp / "params.json", {"base": to_dict(params.base), "pseudolabel": to_dict(cfg)})
        plot_confidence(tmp / "confidence.png", candidates_table)
        write_text(
            tmp / "report.html",
            render(
                round_name, pool, metrics, candidates_table, eligible_images, tmp, cfg.gallery_size
            ),
        )
    acc = metrics.get("pseudo_label_accuracy")
    log.info(
        "pseudolabel %s: %d of %d pool images accepted (%d in the cumulative set)%s",
        round_name,
        metrics["accepted"],
        metrics["pool_images"],
        len(cumulative),
        f", accuracy vs truth {acc:.3f}" if acc is not None else "",
    )
    return metrics


def pseudo_metrics(
    candidates: pd.DataFrame, classes: list[str], decoded: int, quarantined: int, cumulative: int
) -> dict:
    accepted = candidates[candidates["accepted"]]
    per_class = {}
    for c in classes:
        predicted_c = candidates[candidates["predicted"] == c]
        per_class[c] = {
            "candidates": len(predicted_c),
            "accepted": int(predicted_c["accepted"].sum()),
            "acceptance_rate": float(predicted_c["accepted"].mean()) if len(predicted_c) else 0.0,
        }
    metrics = {
        "pool_images": decoded,
        "eligible": len(candidates),
        "quarantined": quarantined,
        "accepted": len(accepted),
        "acceptance_rate": len(accepted) / max(len(candidates), 1),
        "cumulative": cumulative,
        "per_class": per_class,
    }
    known = accepted[accepted["true_label"] != ""]
    if len(known):
        metrics["pseudo_label_accuracy"] = float((known["predicted"] == known["true_label"]).mean())
        for c in classes:
            rows = known[known["predicted"] == c]
            if len(rows):
                per_class[c]["accuracy"] = float((rows["true_label"] == c).mean())
    return metrics


def plot_confidence(path: Path, candidates: pd.DataFrame) -> None:
    plt = report.pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(0, 1, 41)
    ax.hist(
        candidates.loc[candidates["accepted"], "confidence"],
        bins=bins,
        label="accepted",
        color="#2e7d32",
    )
    ax.hist(
        candidates.loc[~candidates["accepted"], "confidence"],
        bins=bins,
        label="rejected",
        color="#9e9e9e",
        alpha=0.8,
    )
    ax.set(
        xlabel="ensemble confidence", ylabel="pool images", title="confidence of pool predictions"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _tile(row, image: np.ndarray) -> str:
    truth = ""
    if row.true_label:
        ok = row.true_label == row.predicted
        truth = f"<div class='{'good' if ok else 'bad'}'>truth: {report.esc(row.true_label)}</div>"
    return (
        f"<div class='tile'><img alt='' src='{report.image_uri(image)}'>"
        f"<div>pseudo-label <b>{report.esc(row.predicted)}</b></div>"
        f"<div>confidence {row.confidence:.3f} (threshold {row.threshold:.3f})</div>{truth}"
        f"<div class='path'>{report.esc(row.path)}</div></div>"
    )


def render(round_name, pool, metrics, candidates, images, folder, limit) -> str:
    accepted = candidates[candidates["accepted"]].sort_values("confidence")
    near = candidates[~candidates["accepted"]].sort_values("confidence", ascending=False)
    cards = [
        ("pool images", metrics["pool_images"]),
        ("eligible", metrics["eligible"]),
        ("accepted", metrics["accepted"]),
        ("acceptance rate", f"{metrics['acceptance_rate']:.1%}"),
        ("cumulative pseudo-labels", metrics["cumulative"]),
    ]
    if "pseudo_label_accuracy" in metrics:
        cards.append(("accuracy vs truth", f"{metrics['pseudo_label_accuracy']:.1%}"))
    rows = [
        (c, v["candidates"], v["accepted"], v["acceptance_rate"], v.get("accuracy", ""))
        for c, v in metrics["per_class"].items()
    ]
    body = (
        f"<h1>Pseudo-labels &middot; round {report.esc(round_name)} &middot; pool {report.esc(pool)}</h1>"
        "<p class='muted'>Pool images the round's ensemble is confident about join the next round's "
        "training set. Accepted samples are shown least confident first: that is where mistakes hide.</p>"
        + report.cards(cards)
        + f"<p><img class='plot' alt='confidence histogram' src='{report.file_uri(folder / 'confidence.png')}'></p>"
        + "<h2>Per class</h2>"
        + report.table(
            ["class", "predicted", "accepted", "acceptance rate", "accuracy vs truth"], rows
        )
        + f"<h2>Accepted, least confident first ({min(limit, len(accepted))} of {len(accepted)})</h2>"
        + "<div class='gallery'>"
        + "".join(_tile(r, images[r.Index]) for r in accepted.head(limit).itertuples())
        + "</div>"
        + f"<h2>Narrowly rejected ({min(limit, len(near))} of {len(near)})</h2>"
        + "<div class='gallery'>"
        + "".join(_tile(r, images[r.Index]) for r in near.head(limit).itertuples())
        + "</div>"
    )
    return report.page(f"Pseudo-labels - {round_name}", body)
