"""lr-find: a learning-rate range test (Smith 2015) on the cleaned training table.

The learning rate grows exponentially from 1e-7 to 1 over a short run, one batch per step; the
smoothed loss is recorded until it explodes. The suggestion is the rate a tenth below the
minimum of the curve, a safe point on its steep descending part.
Writes <out>/lr_find.csv and lr_find.png. Params: base, train (model, optimizer, batch size).
"""

from __future__ import annotations

import itertools
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.core.config import Params, with_image_shape
from pipeline.core.device import pick_device
from pipeline.core.io import atomic_dir, edit_yaml, read_array, read_json, read_table, write_table
from pipeline.reports import report
from pipeline.training.feed import (
    Augmentation,
    Samples,
    Shard,
    make_feed,
    training_augmentation,
)
from pipeline.training.loop import make_optimizer
from pipeline.training.model import build_model

log = logging.getLogger(__name__)


def lr_range_test(
    samples: Samples,
    n_classes: int,
    params: Params,
    *,
    start: float = 1e-7,
    end: float = 1.0,
    steps: int = 100,
    augmentation: Augmentation = None,
) -> pd.DataFrame:
    """Loss per step while the learning rate ramps from start to end: columns lr, loss, smoothed."""
    params = with_image_shape(params, samples.images.shape)
    device = pick_device()
    torch.manual_seed(params.base.seed)
    model = build_model(params.train.model, params.base.channels, n_classes, pretrained=True)
    model = model.to(device)
    optimizer = make_optimizer(model, params.train)
    feed = make_feed(samples, augmentation, params.train, device, Shard())
    batches = itertools.chain.from_iterable(
        feed.epoch(params.base.seed + epoch) for epoch in itertools.count()
    )
    rows, avg, best = [], 0.0, math.inf
    model.train()
    for step in tqdm(range(steps), desc="lr-find", unit="step"):
        lr = start * (end / start) ** (step / (steps - 1))
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        x, y = next(batches)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = loss.item()
        avg = 0.9 * avg + 0.1 * value  # exponential smoothing, bias-corrected below
        smoothed = avg / (1 - 0.9 ** (step + 1))
        rows.append((lr, value, smoothed))
        best = min(best, smoothed)
        if not math.isfinite(value) or smoothed > 4 * best:
            break  # the loss exploded: the rest of the curve says nothing
    return pd.DataFrame(rows, columns=["lr", "loss", "smoothed"])


def suggest(curve: pd.DataFrame) -> float:
    """A tenth of the learning rate at the smoothed loss's minimum."""
    return float(curve["lr"].iloc[int(curve["smoothed"].idxmin())] / 10)


def plot(path: Path, curve: pd.DataFrame, suggestion: float) -> None:
    plt = report.pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(curve["lr"], curve["loss"], alpha=0.3, label="loss")
    ax.plot(curve["lr"], curve["smoothed"], label="smoothed")
    ax.axvline(suggestion, color="C3", ls="--", label=f"suggested {suggestion:.2g}")
    ax.set(
        xscale="log",
        xlabel="learning rate",
        ylabel="training loss",
        title="learning-rate range test",
    )
    top = np.nanpercentile(curve["smoothed"], 95)
    ax.set_ylim(top=min(top * 1.5, curve["loss"].max()))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(
    table_path: Path,
    ingest_dir: Path,
    out_dir: Path,
    params: Params,
    *,
    steps: int,
    write: Path | None,
) -> float:
    classes = read_json(ingest_dir / "classes.json")
    table = read_table(table_path)
    if "split" in table:
        table = table[table["split"] == "train"]
    images = read_array(ingest_dir / "images")
    params = with_image_shape(params, images.shape)
    samples = Samples(
        np.ascontiguousarray(images[table["row"].astype(int).to_numpy()]),
        table["label"].map(classes.index).to_numpy(np.int64),
    )
    augmentation = training_augmentation(params.augment, params.base, classes, pick_device())
    curve = lr_range_test(samples, len(classes), params, steps=steps, augmentation=augmentation)
    suggestion = suggest(curve)
    with atomic_dir(out_dir) as tmp:
        write_table(tmp / "lr_find.csv", curve)
        plot(tmp / "lr_find.png", curve, suggestion)
    log.info("lr-find: suggested train.lr = %.3g (curve: %s)", suggestion, out_dir / "lr_find.png")
    if write is not None:

        def set_lr(doc) -> None:
            doc["train"]["lr"] = float(f"{suggestion:.3g}")

        edit_yaml(write, set_lr)
        log.info("lr-find: wrote train.lr = %.3g to %s", suggestion, write)
    return suggestion
