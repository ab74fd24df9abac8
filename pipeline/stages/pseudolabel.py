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
        <report>/to_label.csv   the pool images most worth a human label (labeling_queue), with
                                an empty label column for `python -m pipeline add-labels`
Params  base, ingest.max_image_pixels, ingest.shard_mib, pseudolabel (pseudolabel.nproc > 1: the
        pool images are predicted by that many processes under torchrun, ensemble.predict_packed)

Round k's set comes from the pools of rounds <= k, predicted by round k-1's model, which
trained on the set before: an image rejected before may join, and an accepted label the new model no longer supports (another class, or under the
bar) leaves the set. The `curriculum` policy admits a growing top share of each predicted class (Curriculum
Labeling, Cascante-Bandera et al. 2021), so no class floods the training set.
Also `init_pseudo`, which writes the empty set of round r000 (human labels only), shaped like
ingest's images.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.config import Params, PseudolabelConfig, to_dict, with_image_shape
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
from pipeline.data.images import thumbnail
from pipeline.data.inputs import (
    LEAKAGE_COLUMNS,
    QUARANTINE_COLUMNS,
    SIGNATURES,
    copies_of,
    leak,
    pack,
    read_pairs,
    read_truth,
    scan_folder,
)
from pipeline.reports import report
from pipeline.training.ensemble import load_ensemble, predict_packed

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
# 1) Thresholds and selection (pure functions over pred_probs (N, K))


def curriculum_share(cfg: PseudolabelConfig, round_index: int) -> float:
    """Share of each predicted class the curriculum admits in round `round_index` (0-based)."""
    return min(cfg.share_max, cfg.share_start + cfg.share_step * round_index)


def class_thresholds(
    pred_probs: np.ndarray, cfg: PseudolabelConfig, round_index: int = 0
) -> np.ndarray:
    """Per-class confidence thresholds (K,).

    fixed: tau for every class. flexmatch: tau scaled by how well each class is learned,
    beta_c = sigma_c / max(max_c sigma_c, unused) with sigma_c the confident predictions of
    class c, mapped through x / (2 - x) so poorly learned classes get a lower bar.
    curriculum: the confidence of the last of the top share of each predicted class, and never
    below min_confidence (a class nobody is predicted as gets a bar above 1).
    """
    k = pred_probs.shape[1]
    predicted, confidence = pred_probs.argmax(1), pred_probs.max(1)
    if cfg.policy == "curriculum":
        share = curriculum_share(cfg, round_index)
        bars = np.full(k, np.inf)
        for c in range(k):
            ranked = np.sort(confidence[predicted == c])[::-1]
            take = math.floor(share * len(ranked))
            if take:
                bars[c] = max(ranked[take - 1], cfg.min_confidence)
        return bars
    tau = cfg.threshold
    if cfg.policy == "fixed":
        return np.full(k, tau)
    confident = confidence >= tau
    sigma = np.bincount(predicted[confident], minlength=k).astype(float)
    unused = float((~confident).sum())
    beta = sigma / max(sigma.max(), unused, 1.0)
    return tau * beta / (2.0 - beta)


def select(
    pred_probs: np.ndarray,
    member_probs: np.ndarray,
    cfg: PseudolabelConfig,
    labeled_share: np.ndarray,
    round_index: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which rows to accept: (accepted (N,) bool, predicted (N,), threshold used (N,))."""
    predicted = pred_probs.argmax(1)
    confidence = pred_probs.max(1)
    thresholds = class_thresholds(pred_probs, cfg, round_index)[predicted]
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


def read_pseudo_overrides(path: Path, classes: list[str]) -> dict[str, str]:
    """data/pseudo_overrides.csv (path,label) as {path: "reject" or a class}; absent: {}."""
    decisions = read_pairs(path, "label")
    for rel, label in decisions.items():
        if label != "reject" and label not in classes:
            raise PipelineError(
                f"{path}: {rel}: {label!r} is not reject or a class ({', '.join(classes)})"
            )
    return decisions


def labeling_queue(
    pred_probs: np.ndarray, embeddings: np.ndarray, accepted: np.ndarray, size: int
) -> np.ndarray:
    """Rows most worth a human label, in order: uncertain first, then spread out.

    Among the rows not accepted, the 4 * size with the smallest margin between the calibrated
    top two classes are candidates; greedy k-center in embedding space (cosine) then picks,
    from the most uncertain one on, each next row farthest from those already picked, so the
    queue does not spend a human's time on many near-identical images.
    """
    candidates = np.flatnonzero(~accepted)
    if size <= 0 or not len(candidates):
        return np.zeros(0, np.int64)
    top2 = np.sort(pred_probs[candidates], axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    shortlist = candidates[np.argsort(margin, kind="stable")[: 4 * size]]
    feats = embeddings[shortlist].astype(np.float64)
    feats /= np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    picked = [0]
    distance = 1.0 - feats @ feats[0]
    while len(picked) < min(size, len(shortlist)):
        distance[picked] = -np.inf
        nxt = int(np.argmax(distance))
        picked.append(nxt)
        distance = np.minimum(distance, 1.0 - feats @ feats[nxt])
    return shortlist[picked]


def provenance(
    previous: pd.DataFrame, accepted: np.ndarray, labels: list[str], round_name: str
) -> pd.DataFrame:
    """joined / left columns for this round's decision over rows that start with `previous`'s
    (N_prev rows, then new ones). A row whose label changes leaves and joins again."""
    n = len(accepted)
    was = np.zeros(n, bool)
    was[: len(previous)] = previous["accepted"].to_numpy() == "True"
    old_label = np.array([""] * n, dtype=object)
    old_label[: len(previous)] = previous["label"].to_numpy()
    joined = np.array([""] * n, dtype=object)
    left = np.array([""] * n, dtype=object)
    joined[: len(previous)] = previous["joined"].to_numpy()
    left[: len(previous)] = previous["left"].to_numpy()
    labels = np.asarray(labels, dtype=object)
    stays = was & accepted & (old_label == labels)
    leaves = was & ~stays
    joins = accepted & ~stays
    left[leaves] = round_name
    joined[joins] = round_name
    return pd.DataFrame(
        {
            "joined": joined,
            "left": left,
            "previous_label": old_label,
            "stayed": stays,
            "joins": joins,
            "leaves": leaves,
        }
    )


# --------------------------------------------------------------------------------------------
# 2) The stages


def init_pseudo(out_dir: Path, ingest_images: Path) -> None:
    """The empty pseudo-label set, shaped like ingest's images: round r000 trains on human
    labels only."""
    with atomic_dir(out_dir) as tmp:
        write_table(tmp / "table.csv", pd.DataFrame(columns=PSEUDO_COLUMNS))
        ShardWriter(tmp / "images", read_array(ingest_images).shape[1:]).close()
        write_json(tmp / "pools.json", [])


def decode_pool(
    data_dir: Path,
    pool: str,
    scratch: Path,
    params: Params,
    known: dict[str, str],
    ingest_dir: Path,
) -> tuple[pd.DataFrame, np.ndarray, list[dict], list[dict]]:
    """Decode a new pool into `scratch`: (table, eligible (N,) bool, quarantine rows, leakage
    rows).

    Test images, copies of labeled images and copies of earlier pools' images are not
    eligible; neither is the second copy of an image within the pool, nor a near copy of a
    test or labeled image (ingest's signatures and cutoff: re-encoded, resized, cropped).
    """
    candidates, quarantine = scan_folder(
        data_dir, f"unlabeled/{pool}", by_class=False, split="pool"
    )
    table, rejected = pack(
        candidates,
        data_dir,
        scratch,
        params.base,
        params.ingest.max_image_pixels,
        split="pool",
        shard_mib=params.ingest.shard_mib,
        desc=f"pool {pool}",
    )
    quarantine += rejected
    if not candidates:
        quarantine.append(
            {"path": f"unlabeled/{pool}", "split": "pool", "reason": "empty pool (no images)"}
        )
    reasons = {
        "test": "same image as a test image",
        "train": "same image as a labeled image",
        "pool": "same image as an image of an earlier pool",
    }
    seen: set[str] = set()
    manifest = read_table(ingest_dir / "manifest.csv")
    tests = manifest[manifest["split"] == "test"]
    tests_by_sha = dict(zip(tests["sha256"], tests["path"]))
    leaks: list[dict] = []
    eligible = np.ones(len(table), bool)
    for i, row in enumerate(table.itertuples()):
        why = reasons.get(known.get(row.sha256, ""))
        if why is None and row.sha256 in seen:
            why = "exact duplicate within the pool"
        if why:
            eligible[i] = False
            quarantine.append({"path": row.path, "split": "pool", "reason": why})
            if known.get(row.sha256) == "test":
                test_copy = tests_by_sha.get(row.sha256, "")
                leaks.append(
                    leak(row.path, "pool", test_copy, "test", 0.0, "exact", "never pseudo-labeled")
                )
        seen.add(row.sha256)
    cutoff = read_json(ingest_dir / "metrics.json").get("near_copy_cutoff", 0.0)
    if cutoff > 0 and len(table):
        partner, distance = copies_of(
            np.load(scratch / SIGNATURES), read_array(ingest_dir / SIGNATURES), cutoff
        )
        for i in np.flatnonzero(eligible & (partner >= 0)):
            other = manifest.iloc[partner[i]]
            kind = "test" if other["split"] == "test" else "labeled"
            eligible[i] = False
            quarantine.append(
                {
                    "path": table["path"].iloc[i],
                    "split": "pool",
                    "reason": f"near copy of {kind} image {other['path']} "
                    f"(distance {distance[i]:.4f} <= {cutoff:.4f})",
                }
            )
            if kind == "test":
                leaks.append(
                    leak(
                        table["path"].iloc[i],
                        "pool",
                        other["path"],
                        "test",
                        float(distance[i]),
                        "near",
                        "never pseudo-labeled",
                    )
                )
    return table, eligible, quarantine, leaks


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
            ensemble, tmp / "images", nproc=cfg.nproc, beside=out_dir, members=True, embeddings=True
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
    ax.set(xlabel="ensemble confidence", ylabel="images", title="confidence of pool predictions")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _tile(row, image: np.ndarray, data_dir: Path) -> str:
    truth = ""
    if row.true_label:
        ok = row.true_label == row.predicted
        truth = f"<div class='{'good' if ok else 'bad'}'>truth: {report.esc(row.true_label)}</div>"
    was = (
        f"<div>was <b>{report.esc(row.previous_label)}</b> until this round</div>"
        if row.previous_label
        else ""
    )
    return (
        "<div class='tile'>"
        + report.pictures(image, thumbnail(data_dir / row.path))
        + f"<div>predicted <b>{report.esc(row.predicted)}</b></div>{was}"
        f"<div>confidence {row.confidence:.3f} (bar {row.threshold:.3f})</div>{truth}"
        f"<div class='path'>{report.esc(row.path)}</div></div>"
    )


def _gallery(title: str, rows: pd.DataFrame, images, limit: int, data_dir: Path) -> str:
    tiles = "".join(_tile(r, images[int(r.row)], data_dir) for r in rows.head(limit).itertuples())
    return f"<h2>{title} ({min(limit, len(rows))} of {len(rows)})</h2><div class='gallery'>{tiles}</div>"


def render(round_name, pools, metrics, candidates, queue, images, folder, limit, data_dir) -> str:
    accepted = candidates[candidates["accepted"]]
    joined = candidates[candidates["move"].isin(["joined", "relabeled"])]
    left = candidates[candidates["move"].isin(["left", "relabeled"])]
    near = candidates[~candidates["accepted"]].sort_values("confidence", ascending=False)
    queued = candidates.loc[queue.index]
    cards = [
        ("new pool images", metrics["pool_images"]),
        ("images scored so far", metrics["candidates"]),
        ("in the set", metrics["accepted"]),
        ("share in the set", f"{metrics['acceptance_rate']:.1%}"),
        ("joined this round", metrics["joined"]),
        ("left this round", metrics["left"]),
    ]
    if "pseudo_label_accuracy" in metrics:
        cards.append(("accuracy vs truth", f"{metrics['pseudo_label_accuracy']:.1%}"))
    rows = [
        (
            c,
            v["candidates"],
            v["accepted"],
            v["joined"],
            v["acceptance_rate"],
            v.get("accuracy", ""),
        )
        for c, v in metrics["per_class"].items()
    ]
    pool_rows = [(p, v["candidates"], v["accepted"]) for p, v in metrics["per_pool"].items()]
    body = (
        f"<h1>Pseudo-labels &middot; round {report.esc(round_name)} &middot; pools "
        f"{report.esc(', '.join(pools))}</h1>"
        "<p class='muted'>The previous round's ensemble (temperature-calibrated on validation) "
        "re-scores every pool so far. The images it is confident about form the set this round "
        "trains on: some join, and labels it no longer supports leave. Accepted samples are shown "
        "least confident first: that is where mistakes hide.</p>"
        + report.cards(cards)
        + f"<p><img class='plot' alt='confidence histogram' src='{report.file_uri(folder / 'confidence.png')}'></p>"
        + "<h2>Per predicted class</h2>"
        + report.table(
            ["class", "predicted", "in the set", "joined", "share", "accuracy vs truth"], rows
        )
        + "<h2>Per pool</h2>"
        + report.table(["pool", "images", "in the set"], pool_rows)
        + "".join(
            _gallery(title, rows, images, limit, data_dir)
            for title, rows in (
                ("Joined this round, least confident first", joined.sort_values("confidence")),
                ("Left the set this round", left.sort_values("confidence")),
                ("In the set, least confident first", accepted.sort_values("confidence")),
                ("Narrowly rejected", near),
                ("Worth a human label (to_label.csv): uncertain and diverse", queued),
            )
        )
    )
    return report.page(f"Pseudo-labels - {round_name}", body)
