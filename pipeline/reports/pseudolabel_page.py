"""The pseudolabel stage's page, <report>/report.html ("Pseudo-labels - <round>"), and its
confidence histogram, confidence.png: the round's figures, the set per predicted class and per
pool, and galleries of the images that joined, left, are in the set, were narrowly rejected, and
are worth a human label (to_label.csv).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.data.images import thumbnail
from pipeline.reports import report


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
