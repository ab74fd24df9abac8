"""pseudolabel stage: every pool so far is re-scored; confident predictions join this round's set.

Reads   data/unlabeled/<pool>/** (the round's new pool), the previous round's ensemble
        (calibrated on validation) and pseudo-label set (every earlier pool's images and
        decisions), <ingest>/manifest.csv + classes.json + images/ (their shape),
        data/truth.csv (optional)
Writes  <out>/table.csv + images/   every pool image so far (eligible ones), its prediction, and
                                    whether it is in the set this round trains on, with
                                    provenance: pool, the round it joined, the round it left
        <out>/pools.json            the pools scored so far, in round order
        <report>/metrics.json, candidates.csv, quarantine.csv, confidence.png, report.html,
        <report>/to_label.csv   the pool images most worth a human label
                                (pipeline/training/selection.py labeling_queue), with an empty
                                label column for `python -m pipeline add-labels`
Params  base, ingest.max_image_pixels, ingest.shard_mib, pseudolabel (pseudolabel.nproc > 1: the
        pool images are predicted by that many processes under torchrun, ensemble.predict_packed)

Round k's set comes from the pools of rounds <= k, predicted by round k-1's model, which
trained on the set before: an image rejected before may join, and an accepted label the new model no longer supports (another class, or under the
bar) leaves the set. The `curriculum` policy admits a growing top share of each predicted class (Curriculum
Labeling, Cascante-Bandera et al. 2021), so no class floods the training set.
Also `init_pseudo`, which writes the empty set of round r000 (human labels only), shaped like
ingest's images.

The stage runs library code: decoding the pool and its eligibility in pipeline/data/pool_images.py,
thresholds, selection, the labeling queue and provenance in pipeline/training/selection.py, the
page in pipeline/reports/pseudolabel_page.py.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.config import Params, with_image_shape
from pipeline.core.errors import PipelineError
from pipeline.core.io import (
    ShardWriter,
    atomic_dir,
    read_array,
    read_json,
    read_table,
    write_json,
    write_table,
    write_text,
)
from pipeline.core.typed import to_dict
from pipeline.data.inputs import read_truth
from pipeline.data.near_copies import LEAKAGE_COLUMNS
from pipeline.data.pool_images import decode_pool
from pipeline.data.scan import QUARANTINE_COLUMNS
from pipeline.reports.pseudolabel_page import plot_confidence, render
from pipeline.training.ensemble import load_ensemble, predict_packed
from pipeline.training.selection import labeling_queue, provenance, read_pseudo_overrides, select

log = logging.getLogger(__name__)

PSEUDO_COLUMNS = [
    "id",
    "path",
    "sha256",
    "pool",
    "row",
    "predicted",
    "confidence",
    "threshold",
    "accepted",  # in the set this round trains on
    "label",  # the accepted label ("" when not accepted)
    "joined",  # round the current label joined ("" if never accepted)
    "left",  # round the row last left the set ("" if it never left)
    "round",  # round that scored this row last
    "model",  # that round's ensemble (hash of ensemble.json)
    "human",  # a person's decision from data/pseudo_overrides.csv: reject or a class ("" if none)
]
CHUNK = 8192  # images per read while copying packed sets


# --------------------------------------------------------------------------------------------
# 1) Thresholds and selection: pipeline/training/selection.py (pure functions over
#    pred_probs (N, K))

# --------------------------------------------------------------------------------------------
# 2) The stages


def init_pseudo(out_dir: Path, ingest_images: Path) -> None:
    """The empty pseudo-label set, shaped like ingest's images: round r000 trains on human
    labels only."""
    with atomic_dir(out_dir) as tmp:
        write_table(tmp / "table.csv", pd.DataFrame(columns=PSEUDO_COLUMNS))
        ShardWriter(tmp / "images", read_array(ingest_images).shape[1:]).close()
        write_json(tmp / "pools.json", [])


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
    truth_path: Path | None = None,
    overrides_path: Path | None = None,
) -> dict:
    """Round `round_name`'s pseudo-label set and report; returns its metrics."""
    params = with_image_shape(params, read_array(ingest_dir / "images").shape)
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
    # every pool scored so far, even one that gave no eligible image (it still counts a round)
    pools = [*read_json(pseudo_in / "pools.json"), pool]
    if pool in pools[:-1]:
        raise PipelineError(
            f"pool {pool!r} was already scored by an earlier round; each round adds a new pool"
        )
    previous_images = read_array(pseudo_in / "images")
    model_id = hashlib.sha256((model_dir / "ensemble.json").read_bytes()).hexdigest()[:12]

    # 1) decode the new pool exactly as ingest decodes labeled images
    known = dict(zip(manifest["sha256"], manifest["split"]))
    known.update({sha: "pool" for sha in previous["sha256"]})
    scratch = out_dir.parent / f".{out_dir.name}.pool"
    new, eligible, quarantine, leaks = decode_pool(
        data_dir, pool, scratch, params, known, ingest_dir
    )
    new_images, decoded = read_array(scratch), len(new)
    new = new[eligible].reset_index(drop=True).assign(pool=pool)
    new_rows = np.flatnonzero(eligible)

    # 2) every pool so far: earlier pools' images, then the new pool's, re-scored by this model
    shape = (params.base.image_size, params.base.image_size, params.base.channels)
    with atomic_dir(out_dir) as tmp:
        writer = ShardWriter(tmp / "images", shape, params.ingest.shard_mib)
        for start in range(0, len(previous_images), CHUNK):
            writer.extend(previous_images[start : start + CHUNK])
        for start in range(0, len(new_rows), CHUNK):
            writer.extend(new_images[new_rows[start : start + CHUNK]])
        writer.close()
        probs, member_probs, embeddings = predict_packed(
            ensemble,
            tmp / "images",
            nproc=cfg.nproc,
            beside=out_dir,
            members=True,
            embeddings=True,
            cluster=params.cluster,
        )
        probs = probs.astype(np.float64)  # bars and confidences compare equal once written
        labeled_share = (
            manifest.loc[manifest["split"] == "train", "label"]
            .value_counts()
            .reindex(classes, fill_value=0)
            .to_numpy(float)
        )
        labeled_share /= max(labeled_share.sum(), 1.0)
        accepted, predicted, thresholds = select(
            probs, member_probs, cfg, labeled_share, round_index=len(pools) - 1
        )
        names = [classes[i] for i in predicted]
        labels = np.where(accepted, names, "").astype(object)
        # a person's word wins over the model's: rejected never joins, confirmed joins as said
        paths = [*previous["path"], *new["path"]]
        human = read_pseudo_overrides(overrides_path or data_dir / "pseudo_overrides.csv", classes)
        decided = np.array([human.get(p, "") for p in paths], dtype=object)
        unmatched = len(set(human) - set(paths))  # not an eligible pool image (yet)
        accepted = np.where(decided == "reject", False, accepted | (decided != ""))
        labels = np.where((decided != "") & (decided != "reject"), decided, labels)
        moves = provenance(previous, accepted, list(labels), round_name)
        table = pd.concat(
            [previous[["id", "path", "sha256", "pool"]], new[["id", "path", "sha256", "pool"]]],
            ignore_index=True,
        ).assign(
            row=np.arange(len(probs)),
            predicted=names,
            confidence=probs.max(1),
            threshold=thresholds,
            accepted=accepted,
            label=labels,
            joined=moves["joined"],
            left=moves["left"],
            round=round_name,
            model=model_id,
            human=decided,
        )
        write_table(tmp / "table.csv", table[PSEUDO_COLUMNS])
        write_json(tmp / "pools.json", pools)
    shutil.rmtree(scratch)

    # 3) report: every candidate with its move this round and, where known, its true label
    truth = read_truth(truth_path or data_dir / "truth.csv")
    candidates = table.assign(
        true_label=[truth.get(p, "") for p in table["path"]],
        previous_label=moves["previous_label"],
        move=np.select(
            [moves["joins"] & moves["leaves"], moves["joins"], moves["leaves"], moves["stayed"]],
            ["relabeled", "joined", "left", "stayed"],
            "",
        ),
    )
    metrics = pseudo_metrics(candidates, classes, pool, decoded, len(new_rows), len(quarantine))
    queue = candidates.iloc[labeling_queue(probs, embeddings, accepted, cfg.queue_size)]
    top2 = np.sort(probs[queue.index], axis=1)[:, -2:]
    queue = queue.assign(
        rank=np.arange(1, len(queue) + 1), margin=top2[:, 1] - top2[:, 0], label=""
    )[["rank", "path", "pool", "predicted", "confidence", "margin", "label", "true_label"]]
    metrics["queue"] = len(queue)
    metrics["test_leakage"] = len(leaks)  # pool images that are copies of test images
    metrics["human_decisions"] = int((table["human"] != "").sum())
    metrics["human_decisions_unmatched"] = unmatched
    images = read_array(out_dir / "images")
    with atomic_dir(report_dir) as tmp:
        write_json(tmp / "metrics.json", metrics)
        write_table(tmp / "candidates.csv", candidates)
        write_table(tmp / "to_label.csv", queue)
        write_table(tmp / "quarantine.csv", pd.DataFrame(quarantine, columns=QUARANTINE_COLUMNS))
        write_table(tmp / "leakage.csv", pd.DataFrame(leaks, columns=LEAKAGE_COLUMNS))
        write_json(tmp / "params.json", {"base": to_dict(params.base), "pseudolabel": to_dict(cfg)})
        plot_confidence(tmp / "confidence.png", candidates)
        write_text(
            tmp / "report.html",
            render(
                round_name,
                pools,
                metrics,
                candidates,
                queue,
                images,
                tmp,
                cfg.gallery_size,
                data_dir,
            ),
        )
    acc = metrics.get("pseudo_label_accuracy")
    log.info(
        "pseudolabel %s: %d of %d images in the set (%d joined, %d left; %d pools)%s",
        round_name,
        metrics["accepted"],
        metrics["candidates"],
        metrics["joined"],
        metrics["left"],
        len(pools),
        f", accuracy vs truth {acc:.3f}" if acc is not None else "",
    )
    return metrics


def pseudo_metrics(
    candidates: pd.DataFrame,
    classes: list[str],
    pool: str,
    decoded: int,
    eligible: int,
    quarantined: int,
) -> dict:
    """Figures over every candidate so far (all pools), and this round's moves."""
    accepted = candidates[candidates["accepted"]]
    joins = candidates["move"].isin(["joined", "relabeled"])
    leaves = candidates["move"].isin(["left", "relabeled"])
    per_class = {}
    for c in classes:
        predicted_c = candidates[candidates["predicted"] == c]
        per_class[c] = {
            "candidates": len(predicted_c),
            "accepted": int(predicted_c["accepted"].sum()),
            "joined": int(joins[predicted_c.index].sum()),
            "acceptance_rate": float(predicted_c["accepted"].mean()) if len(predicted_c) else 0.0,
        }
    per_pool = {
        name: {"candidates": len(rows), "accepted": int(rows["accepted"].sum())}
        for name, rows in candidates.groupby("pool", sort=True)
    }
    metrics = {
        "pool": pool,
        "pool_images": decoded,  # decoded from the new pool
        "eligible": eligible,  # of those, not copies of labeled, test or earlier pool images
        "quarantined": quarantined,
        "candidates": len(candidates),
        "accepted": len(accepted),
        "acceptance_rate": len(accepted) / max(len(candidates), 1),
        "joined": int(joins.sum()),  # a changed label leaves and joins again: "relabeled"
        "left": int(leaves.sum()),
        "relabeled": int((candidates["move"] == "relabeled").sum()),
        "stayed": int((candidates["move"] == "stayed").sum()),
        "per_class": per_class,
        "per_pool": per_pool,
    }
    known = accepted[accepted["true_label"] != ""]
    if len(known):
        metrics["pseudo_label_accuracy"] = float((known["label"] == known["true_label"]).mean())
        for c in classes:
            rows = known[known["label"] == c]
            if len(rows):
                per_class[c]["accuracy"] = float((rows["true_label"] == c).mean())
    left = candidates[leaves & (candidates["true_label"] != "")]
    if len(left):
        # Removals should mostly take out mistakes: the share of labels that left that were wrong.
        metrics["left_were_wrong"] = float((left["previous_label"] != left["true_label"]).mean())
    return metrics
