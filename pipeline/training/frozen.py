"""A pretrained backbone's frozen features: computed once, then linear models on top of them.

`features` runs the body once over a set of images (no augmentation, eval mode). `fit_head`
trains only the network's linear head on those features, with the train stage's recipe
(train.lr, weight decay, mixup, label smoothing, epochs of at least train.min_steps steps,
early stopping and the top-k checkpoints), and returns what loop.fit returns, so the ensemble,
calibration, pseudo-labeling and reports downstream do not know the difference. A step costs a
matrix product instead of a pass through the body: on 2 CPU cores the features are the cost.
`linear_kfold` gives the clean stage out-of-sample probabilities from a logistic regression on
the features, one per fold (cleanlab's recommended path for images).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from pipeline.core.config import TrainConfig
from pipeline.core.device import to_input
from pipeline.core.errors import PipelineError
from pipeline.training.diagnostics import diagnose
from pipeline.training.feed import Samples
from pipeline.training.loop import (
    FitResult,
    keep_top_k,
    lr_factor,
    make_optimizer,
    passes_per_epoch,
    should_stop,
)


@torch.inference_mode()
def features(
    model: torch.nn.Module,
    images: np.ndarray,
    device: torch.device,
    *,
    desc: str = "features",
    batch_size: int = 64,
) -> np.ndarray:
    """model.embed over images (N, H, W, C) uint8, in batches: (N, D) float32."""
    model.eval().to(device, memory_format=torch.channels_last)
    out = []
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", mininterval=1.0, disable=len(starts) < 4):
        x = to_input(
            torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])), device
        )
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(model.embed(x).float().cpu())
    if not out:
        return np.zeros((0, model.embedding_dim), np.float32)
    return torch.cat(out).numpy()


def fit_head(
    model: torch.nn.Module,
    train: Samples,
    val: Samples,
    cfg: TrainConfig,
    *,
    seed: int,
    device: torch.device,
    state_dir: Path,
    desc: str = "train (head)",
) -> FitResult:
    """Train model.head on the frozen body's features of `train`; the top-k checkpoints (the
    whole model) are kept in state_dir as loop.fit keeps them."""
    state_dir.mkdir(parents=True, exist_ok=True)
    x_train = torch.from_numpy(features(model, train.images, device, desc=f"{desc}: features"))
    x_val = torch.from_numpy(features(model, val.images, device, desc=f"{desc}: validation"))
    y_train = torch.as_tensor(np.asarray(train.labels), dtype=torch.long)
    y_val = torch.as_tensor(np.asarray(val.labels), dtype=torch.long)
    # The head learns on standardized features; each kept checkpoint holds it folded back into
    # model.head, which predicts from the raw features: (f - mean) / std . W = f . (W / std) - ...
    mean, std = x_train.mean(0), x_train.std(0, correction=0).clamp_min(1e-6)
    x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    head = torch.nn.Linear(x_train.shape[1], model.head.out_features)
    optimizer = make_optimizer(head, cfg)  # a bare Linear: no body group
    factor = lr_factor(cfg, cfg.epochs)
    passes = passes_per_epoch(cfg, len(x_train), cfg.epochs)
    mix = torch.distributions.Beta(cfg.mixup, cfg.mixup) if cfg.mixup > 0 else None
    history: list[dict] = []
    kept: list[dict] = []
    for epoch in tqdm(range(cfg.epochs), desc=desc, unit="epoch", mininterval=0.5):
        if should_stop(history, cfg.monitor, cfg.patience):
            break
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * group["lr_scale"] * factor(epoch)
        head.train()
        sums, seen, norms = [0.0, 0.0], 0, []
        before = head.weight.detach().clone()
        for _ in range(passes):
            order = torch.randperm(len(x_train), generator=generator)
            for batch in order.split(cfg.batch_size):
                x = F.dropout(x_train[batch], cfg.model.dropout, training=True)
                y = y_train[batch]
                if mix is not None:
                    share = float(mix.sample())
                    partner = torch.randperm(len(y), generator=generator)
                    x = share * x + (1 - share) * x[partner]
                logits = head(x)
                loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
                if mix is not None:
                    loss = share * loss + (1 - share) * F.cross_entropy(
                        logits, y[partner], label_smoothing=cfg.label_smoothing
                    )
                if cfg.l1 > 0:
                    loss = loss + cfg.l1 * head.weight.abs().sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                norms.append(float(head.weight.grad.norm()))
                optimizer.step()
                sums[0] += float(loss) * len(y)
                sums[1] += float((logits.argmax(1) == y).sum())
                seen += len(y)
        if not math.isfinite(sums[0]):
            raise PipelineError(f"training diverged: lower train.lr (it is {cfg.lr})")
        head.eval()
        with torch.no_grad():
            val_logits = head(x_val)
        record = {
            "epoch": epoch + 1,
            "lr": cfg.lr * factor(epoch),
            "train_loss": sums[0] / max(seen, 1),
            "train_acc": sums[1] / max(seen, 1),
            "grad_norm": float(np.mean(norms)) if norms else 0.0,
            "update_ratio": {
                "head.weight": float(
                    (head.weight.detach() - before).norm() / (before.norm() + 1e-12)
                )
            },
            "activations": {},
            "val_loss": float(F.cross_entropy(val_logits, y_val)),
            "val_acc": float((val_logits.argmax(1) == y_val).float().mean()),
        }
        history.append(record)
        with torch.no_grad():
            model.head.weight.copy_(head.weight / std)
            model.head.bias.copy_(head.bias - (head.weight / std) @ mean)
        kept = keep_top_k(state_dir, model, record, kept, cfg)
    return FitResult(history, kept, diagnose(history, cfg))


def linear_kfold(
    feats: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    splits: list[tuple[np.ndarray, np.ndarray]],
) -> np.ndarray:
    """Out-of-sample probabilities (N, K): each fold's rows from a logistic regression fitted on
    the other folds' standardized features only."""
    pred_probs = np.zeros((len(labels), n_classes), np.float32)
    for train_idx, held_idx in tqdm(splits, desc="clean: K-fold on embeddings", unit="fold"):
        scaler = StandardScaler().fit(feats[train_idx])
        model = LogisticRegression(max_iter=2000)
        model.fit(scaler.transform(feats[train_idx]), labels[train_idx])
        probs = model.predict_proba(scaler.transform(feats[held_idx]))
        pred_probs[np.ix_(held_idx, model.classes_)] = probs  # a class a fold lacks stays 0
    return pred_probs
