"""The clean stage's K-fold: out-of-sample probabilities for every labeled row, at each budget.

`kfold_pred_probs` trains one model per fold on the other folds' rows (train.model with the clean
stage's own short recipe, `recipe`) and predicts the rows it held out, so every row is judged by
a model that never saw its label. With several budgets in clean.min_steps it runs once per
budget and keeps the run whose out-of-fold predictions agree best with the given labels: too
long a run memorizes the wrong labels it should find (digits), too short a one leaves hard
images underfit (photos). With clean.nproc > 1 the folds are spread over processes under
torchrun (`kfold_part`, the hidden `kfold-part` command); with cluster.engine: ray each fold is
a Ray task (pipeline/training/ray_fit.py), and clean.nproc is not used.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold
from tqdm import tqdm

from pipeline.core.config import Params, TrainConfig, with_image_shape
from pipeline.core.device import pick_device
from pipeline.core.errors import PipelineError
from pipeline.core.io import read_json, write_json
from pipeline.core.processes import job_folder, part_of, spread, usable
from pipeline.core.typed import parse, to_dict
from pipeline.training.ensemble import predict_proba
from pipeline.training.feed import Samples, training_augmentation
from pipeline.training.frozen import linear_kfold
from pipeline.training.loop import fit, passes_per_epoch
from pipeline.training.model import build_model

log = logging.getLogger(__name__)


def recipe(params: Params, min_steps: int) -> TrainConfig:
    """The clean stage's own short recipe: AdamW with a cosine schedule, no early stopping."""
    return TrainConfig(
        model=params.train.model,
        lr=params.clean.lr,
        weight_decay=params.clean.weight_decay,
        batch_size=params.clean.batch_size,
        epochs=params.clean.epochs,
        min_steps=min_steps,
        mixup=params.clean.mixup,
        num_workers=params.train.num_workers,
    )


def kfold_pred_probs(
    images: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    params: Params,
    classes: list[str],
    *,
    beside: Path | None = None,
    features: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """pred_probs (N, K) and embeddings (N, D), each row from the fold model that never saw it,
    and the K-fold budgets tried (`budget_scores`).

    With several budgets (clean.min_steps) the K-fold runs once per budget and keeps the run
    whose out-of-fold predictions agree best with the given labels (`better`): held-out rows
    are never trained on, so this is a cross-validated choice, made before any label is judged.
    With a pretrained backbone's frozen `features` (N, D), a logistic regression per fold on
    them is tried first (method "embeddings"); a frozen backbone (train.model.frozen) tries
    nothing else, a fine-tuned one also fine-tunes the folds at each budget.
    """
    params = with_image_shape(params, images.shape)
    folds = params.clean.folds
    counts = np.bincount(labels, minlength=n_classes)
    if counts.min() < folds:
        raise PipelineError(
            f"class {classes[int(counts.argmin())]!r} has {int(counts.min())} labeled images, "
            f"fewer than clean.folds ({folds}): lower clean.folds or add images to that class"
        )
    splits = fold_splits(labels, params)
    budgets = distinct_budgets(params, [len(train_idx) for train_idx, _ in splits])
    nproc = 1 if params.cluster.engine == "ray" else usable(min(params.clean.nproc, folds))
    tried, best = [], None
    if features is not None:
        pred_probs = linear_kfold(features, labels, n_classes, splits)
        tried.append({"method": "embeddings", "min_steps": 0, **budget_scores(labels, pred_probs)})
        best = (tried[-1], pred_probs, features)
        if params.train.model.frozen:
            budgets = []
    with contextlib.ExitStack() as stack:
        job = None
        if params.cluster.engine == "ray" and budgets:  # in Ray's object store, once
            from pipeline.training.ray_fit import kfold_inputs_on_ray

            job = stack.enter_context(kfold_inputs_on_ray(images, labels, splits, params.cluster))
        elif nproc > 1:  # the processes' inputs, written once for every budget
            job = stack.enter_context(job_folder(beside))
            np.save(job / "images.npy", images)
            np.save(job / "labels.npy", labels)
        for min_steps in budgets:
            pred_probs, embeddings = one_kfold(
                images, labels, n_classes, splits, params, classes, min_steps, job, nproc
            )
            tried.append(
                {"method": "finetune", "min_steps": min_steps, **budget_scores(labels, pred_probs)}
            )
            if best is None or better(tried[-1], best[0]):
                best = (tried[-1], pred_probs, embeddings)
    chosen, pred_probs, embeddings = best
    for score in tried:
        score["chosen"] = score is chosen
        score["name"] = budget_name(score)
    if len(tried) > 1:
        log.info(
            "clean: K-fold budgets, out-of-fold agreement with the given labels: %s; keeping %s",
            ", ".join(
                f"{budget_name(s)} {s['accuracy']:.1%} (log loss {s['log_loss']:.3f})"
                for s in tried
            ),
            budget_name(chosen),
        )
    return pred_probs, embeddings, tried


def budget_name(score: dict) -> str:
    """How a tried K-fold is named in logs and reports."""
    if score.get("method") == "embeddings":
        return "a linear model on frozen embeddings"
    return f"{score['min_steps']} steps"


def distinct_budgets(params: Params, fold_sizes: list[int]) -> list[int]:
    """clean.min_steps, smallest first, less those that train every fold (of fold_sizes training
    rows) exactly as a smaller one does: a set large enough makes every budget in clean.epochs
    on its own."""
    budgets, seen = [], set()
    for min_steps in sorted(set(params.clean.min_steps)):
        fold_recipe = recipe(params, min_steps)
        passes = tuple(passes_per_epoch(fold_recipe, n, params.clean.epochs) for n in fold_sizes)
        if passes not in seen:
            seen.add(passes)
            budgets.append(min_steps)
    return budgets


def budget_scores(labels: np.ndarray, pred_probs: np.ndarray) -> dict:
    """How well out-of-fold predictions agree with the given labels: accuracy and log loss."""
    given = pred_probs[np.arange(len(labels)), labels]
    return {
        "accuracy": float((pred_probs.argmax(1) == labels).mean()),
        "log_loss": float(-np.log(np.clip(given, 1e-12, None)).mean()),
    }


def better(a: dict, b: dict) -> bool:
    """Budget score a beats b: higher accuracy against the given labels, then lower log loss; on
    a tie the budget tried first (the smaller) stays. When labels are flipped at random, the
    expected accuracy against them rises with accuracy against the truth; a systematic
    confusion (every 7 labeled 1) can favour a model that learned it."""
    return (a["accuracy"], -a["log_loss"]) > (b["accuracy"], -b["log_loss"])


def one_kfold(
    images: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    splits: list[tuple[np.ndarray, np.ndarray]],
    params: Params,
    classes: list[str],
    min_steps: int,
    job,
    nproc: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The K-fold at one budget: (pred_probs (N, K), embeddings (N, D)).

    With cluster.engine: ray `job` is a ray_fit.KFoldOnRay and the folds run as Ray tasks
    (ray_fit.kfold_on_ray); with a job folder (clean.nproc > 1; images.npy and labels.npy in
    it) in `nproc` processes under torchrun (fold f in process f mod nproc: kfold_part). Each is
    seeded and trained as here, so on a CPU the numbers are the same bit for bit (given the
    same threads per process).
    """
    folds = params.clean.folds
    if params.cluster.engine == "ray":
        from pipeline.training.ray_fit import kfold_on_ray

        results = kfold_on_ray(fold_predictions, job, params, classes, min_steps)
    elif job is not None:
        write_json(
            job / "job.json",
            {"params": to_dict(params), "classes": classes, "min_steps": min_steps},
        )
        spread(nproc, "kfold-part", job, "the clean stage's K-fold")
        results = [read_npz(job / f"fold-{fold:03d}.npz") for fold in range(folds)]
    else:
        folds_run = fold_predictions(
            images, labels, splits, range(folds), params, classes, min_steps
        )
        results = list(folds_run)  # run to the end, so the progress bar closes at folds/folds
    pred_probs = np.zeros((len(labels), n_classes), np.float32)
    embeddings = None
    for (_, held_idx), (probs, feats) in zip(splits, results):
        pred_probs[held_idx] = probs
        if embeddings is None:
            embeddings = np.zeros((len(labels), feats.shape[1]), np.float32)
        embeddings[held_idx] = feats
    return pred_probs, embeddings


def fold_splits(labels: np.ndarray, params: Params) -> list[tuple[np.ndarray, np.ndarray]]:
    """(training rows, held-out rows) of each fold: stratified, seeded by base.seed."""
    splitter = StratifiedKFold(
        n_splits=params.clean.folds, shuffle=True, random_state=params.base.seed
    )
    return list(splitter.split(np.zeros(len(labels)), labels))


def fold_predictions(
    images: np.ndarray,
    labels: np.ndarray,
    splits: list[tuple[np.ndarray, np.ndarray]],
    folds: range,
    params: Params,
    classes: list[str],
    min_steps: int,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """For each fold in `folds`: a model trained on its training rows for at least `min_steps`
    steps, then its (probs (H, K), embeddings (H, D)) for the H rows it held out. Each fold is
    seeded by its number alone."""
    device = pick_device()
    augmentation = training_augmentation(params.augment, params.base, classes, device)
    fold_recipe = recipe(params, min_steps)
    for fold in tqdm(folds, desc=f"clean: K-fold, {min_steps} steps", unit="fold"):
        train_idx, held_idx = splits[fold]
        torch.manual_seed(params.base.seed + fold)
        model = build_model(params.train.model, params.base.channels, len(classes), pretrained=True)
        fit(
            model,
            Samples(images[train_idx], labels[train_idx]),
            None,
            fold_recipe,
            seed=params.base.seed + fold,
            device=device,
            augmentation=augmentation,
            desc=f"  fold {fold + 1}/{params.clean.folds}",
        )
        yield predict_proba([model], images[held_idx], device, embeddings=True)


def kfold_part(job: Path) -> None:
    """Under torchrun: folds rank, rank + world, ... of kfold_pred_probs, each saved as
    job/fold-<f>.npz for the launching process."""
    with part_of(job) as (rank, world):
        spec = read_json(job / "job.json")
        params = parse(Params, spec["params"], "params")
        images = np.load(job / "images.npy", mmap_mode="r")
        labels = np.load(job / "labels.npy")
        mine = range(rank, params.clean.folds, world)
        splits = fold_splits(labels, params)
        results = fold_predictions(
            images, labels, splits, mine, params, spec["classes"], spec["min_steps"]
        )
        for fold, (probs, feats) in zip(mine, results):
            np.savez(job / f"fold-{fold:03d}.npz", probs=probs, embeddings=feats)


def read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as saved:
        return saved["probs"], saved["embeddings"]
