"""train stage: the residual CNN on the cleaned table plus the round's pseudo-labels.

Reads   the cleaned training table and the validation table (clean stage) + packed images,
        classes.json, the augment stage's policy, the round's pseudo-label input folder
        (table.csv + images/: the accepted rows are trained on; none in round 0)
Writes  <model>/epoch_NNN.pt + ensemble.json  the top-k checkpoints, averaged at prediction,
                                              and the temperature fitted on validation
        <report>/diagnostics.json, diagnostics.png, warnings.json, config.json, per_class.csv
        <live>/                                dvclive metrics and per-epoch plots
Params  base, train

The loop is a few small functions: `train_one_epoch`, `evaluate`, `fit`. Every epoch reseeds
from (seed, epoch), so a run resumed from its last checkpoint equals an uninterrupted one.
The budget is `train.epochs` but at least `train.min_steps` optimizer steps: a few hundred
images get as many updates as a few thousand (epochs and patience are stretched alike).
Batches come from pipeline/feed.py (either augmentation backend); with train.nproc > 1 the
command runs under torchrun and `fit` wraps the model in DistributedDataParallel.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from pipeline import report
from pipeline.augment import reseed
from pipeline.calibration import (
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    nll,
)
from pipeline.config import AugmentConfig, ModelConfig, Params, TrainConfig, parse, to_dict
from pipeline.errors import PipelineError
from pipeline.feed import (
    Augmentation,
    Batches,
    Samples,
    Shard,
    current_shard,
    distributed,
    make_feed,
    pick_device,
    to_input,
    training_augmentation,
)
from pipeline.gpu_augment import BatchAugment
from pipeline.io import (
    atomic_dir,
    atomic_path,
    read_array,
    read_json,
    read_table,
    write_json,
    write_table,
)
from pipeline.model import ResNet, build_model

log = logging.getLogger(__name__)

DEAD_WARNING = 0.5  # share of dead units in a layer that earns a warning


# --------------------------------------------------------------------------------------------
# Optimization


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # Weight decay on conv/linear weights only: decaying norm scales and biases only hurts.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    if cfg.optimizer == "adam":
        # Adam's weight_decay is the classic L2 term added to the gradient.
        return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def lr_factor(cfg: TrainConfig, epochs: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at the start of each epoch."""
    if cfg.schedule == "step":
        return lambda e: cfg.gamma ** (e // cfg.step_every)
    if cfg.schedule == "exponential":
        return lambda e: cfg.gamma**e
    if cfg.schedule == "cosine":
        return lambda e: 0.5 * (1 + math.cos(math.pi * min(e, epochs) / epochs))
    return lambda e: 1.0


def l1_penalty(model: nn.Module) -> torch.Tensor:
    return sum(p.abs().sum() for p in model.parameters() if p.ndim > 1)


def train_one_epoch(
    model: nn.Module,
    batches: Batches,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    device: torch.device,
    *,
    net: nn.Module | None = None,
) -> dict:
    """One pass over `batches`; returns loss, accuracy, mean gradient norm, update ratios.

    `net` runs the forward pass when it differs from `model` (DistributedDataParallel or
    torch.compile around it). Figures stay on the device until the epoch ends: no step waits
    for the GPU. Under torchrun, loss and accuracy are summed over every process.
    """
    net = model if net is None else net
    net.train()
    use_amp = device.type == "cuda"
    sums = torch.zeros(2, device=device)  # loss * n, correct
    seen, grad_norms = 0, []
    last = len(batches) - 1
    ratios: dict[str, float] = {}
    for step, (x, y) in enumerate(batches):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = net(x)
            loss = F.cross_entropy(logits, y)
        objective = loss + cfg.l1 * l1_penalty(model) if cfg.l1 > 0 else loss
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        grad_norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf))
        if step == last:  # update-to-weight ratio, measured on the last step of the epoch
            before = {n: p.detach().clone() for n, p in model.named_parameters() if p.ndim > 1}
        optimizer.step()
        if step == last:
            for name, p in model.named_parameters():
                if name in before:
                    ratios[name] = (
                        (p.detach() - before[name]).norm() / (before[name].norm() + 1e-12)
                    ).item()
        sums += torch.stack([loss.detach().float() * len(y), (logits.argmax(1) == y).sum()])
        seen += len(y)
    totals = torch.cat([sums, torch.tensor([seen], device=device, dtype=sums.dtype)])
    if current_shard().world > 1:
        dist.all_reduce(totals)
    total_loss, correct, seen = totals.tolist()
    if not math.isfinite(total_loss):
        raise PipelineError(
            f"training diverged (loss is {total_loss / max(seen, 1)}): lower train.lr (it is {cfg.lr})"
        )
    return {
        "train_loss": total_loss / max(seen, 1),
        "train_acc": correct / max(seen, 1),
        "grad_norm": torch.stack(grad_norms).mean().item() if grad_norms else 0.0,
        "update_ratio": ratios,
    }


@torch.inference_mode()
def evaluate(
    models: list[nn.Module], samples: Samples, device: torch.device, batch_size: int = 1024
) -> dict:
    """Loss and accuracy of the models' averaged probabilities, without augmentation."""
    probs = predict_proba(models, samples.images, device, batch_size)
    labels = torch.as_tensor(np.array(samples.labels))
    loss = F.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-12)), labels).item()
    return {"val_loss": loss, "val_acc": float((probs.argmax(1) == samples.labels).mean())}


@torch.inference_mode()
def predict_proba(
    models: list[nn.Module],
    images: np.ndarray,
    device: torch.device,
    batch_size: int = 1024,
    *,
    members: bool = False,
    embeddings: bool = False,
):
    """Average softmax of `models` over images (N, H, W, C), streamed in chunks.

    Returns probs (N, K); with members, also each model's probs (M, N, K); with embeddings,
    also the averaged penultimate features (N, D).
    """
    for m in models:
        m.eval()
    outs, member_outs, embeds = [], [], []
    for start in range(0, len(images), batch_size):
        x = to_input(
            torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])), device
        )
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            feats = [m.embed(x) for m in models]
            logits = [m.head(f).float() for m, f in zip(models, feats)]
        per_model = torch.stack([F.softmax(z, dim=1) for z in logits])
        outs.append(per_model.mean(0).cpu())
        if members:
            member_outs.append(per_model.cpu())
        if embeddings:
            embeds.append(torch.stack(feats).mean(0).float().cpu())
    k = models[0].head.out_features
    probs = torch.cat(outs).numpy() if outs else np.zeros((0, k), np.float32)
    result = [probs]
    if members:
        result.append(
            torch.cat(member_outs, dim=1).numpy() if member_outs else np.zeros((len(models), 0, k))
        )
    if embeddings:
        dim = models[0].embedding_dim
        result.append(torch.cat(embeds).numpy() if embeds else np.zeros((0, dim), np.float32))
    return result[0] if len(result) == 1 else tuple(result)


# --------------------------------------------------------------------------------------------
# Diagnostics


@torch.inference_mode()
def activation_stats(model: nn.Module, x: torch.Tensor, bins: np.ndarray) -> dict:
    """Per activation layer: pre-activation mean/std/histogram and the share of dead units."""
    stats, hooks = {}, []

    def hook(name):
        def record(module, inputs, output):
            pre = inputs[0].float()
            alive = (pre > 0).any(dim=(0, 2, 3)) if pre.ndim == 4 else (pre > 0).any(dim=0)
            stats[name] = {
                "mean": pre.mean().item(),
                "std": pre.std().item(),
                "dead_fraction": 1.0 - alive.float().mean().item(),
                # evenly spaced bins: torch.histc counts them without sorting the values
                "hist": torch.histc(pre, len(bins) - 1, float(bins[0]), float(bins[-1]))
                .long()
                .tolist(),
            }

        return record

    for name, module in model.named_modules():
        if isinstance(module, nn.ReLU | nn.LeakyReLU):
            hooks.append(module.register_forward_hook(hook(name)))
    model.eval()
    model(x)
    for h in hooks:
        h.remove()
    return stats


def diagnose(history: list[dict], cfg: TrainConfig) -> list[str]:
    """Plain-language warnings from the tuning checklist.

    A rise is judged on the mean of the last fifth of the epochs against the lowest loss
    before it, and must give back a tenth of what was gained: the epoch-to-epoch noise of a long
    run on a small set, near zero loss, is not a rise.
    """
    warnings = []
    losses = np.array([h["train_loss"] for h in history])
    tail = max(3, len(losses) // 5)
    if len(losses) > tail:
        recent, best = losses[-tail:].mean(), losses[:-tail].min()
        if recent > best + 0.1 * (losses[0] - best) + 1e-3 or losses[-1] > losses[0]:
            warnings.append(
                f"Training loss rose (lowest {best:.3f}, last {tail} epochs {recent:.3f}): the "
                f"learning rate train.lr={cfg.lr:g} is probably too high. Try a third of it, or "
                f"run `python -m pipeline lr-find`."
            )
    if len(losses) >= 3 and abs(losses[0] - losses[-1]) < 0.01 * abs(losses[0]):
        warnings.append(
            f"Training loss stayed flat ({losses[0]:.3f} -> {losses[-1]:.3f}): the learning rate "
            f"train.lr={cfg.lr:g} is probably too low, or the model cannot fit the labels."
        )
    if history and history[-1].get("activations"):
        for layer, s in history[-1]["activations"].items():
            if s["dead_fraction"] >= DEAD_WARNING:
                warnings.append(
                    f"{s['dead_fraction']:.0%} of the units after layer {layer} never activate "
                    f"(dead ReLUs): lower the learning rate or use train.model.activation: leaky_relu."
                )
    return warnings


# --------------------------------------------------------------------------------------------
# Checkpoints and the ensemble


def save_torch(path: Path, obj: dict) -> None:
    """torch.save, atomically. Serialized in memory first: torch's own file writer reports a
    full disk as a RuntimeError without the path, a plain write reports it as an OSError."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def save_checkpoint(path: Path, model: nn.Module, meta: dict) -> None:
    save_torch(path, {"state_dict": model.state_dict(), "meta": meta})


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses pickled code with an UnpicklingError
        raise PipelineError(
            f"refusing to load {path}: not a plain weights checkpoint ({type(exc).__name__})"
        ) from None


@dataclass
class Ensemble:
    models: list[ResNet]
    classes: list[str]
    info: dict

    @property
    def temperature(self) -> float:
        return float(self.info.get("temperature", 1.0))

    def predict(self, images, device: torch.device | None = None, *, calibrated: bool = True, **kw):
        """predict_proba of the members; the averaged probabilities are temperature-scaled
        unless calibrated=False (members' own probabilities never are)."""
        device = device or pick_device()
        for m in self.models:
            m.to(device)
        out = predict_proba(self.models, images, device, **kw)
        t = self.temperature if calibrated else 1.0
        if isinstance(out, tuple):
            return (apply_temperature(out[0], t), *out[1:])
        return apply_temperature(out, t)


def load_ensemble(model_dir: Path) -> Ensemble:
    """The top-k checkpoints a train run kept, ready to predict."""
    model_dir = Path(model_dir)
    if not (model_dir / "ensemble.json").is_file():
        raise PipelineError(
            f"missing input {model_dir / 'ensemble.json'}: run the train stage first"
        )
    info = read_json(model_dir / "ensemble.json")
    cfg = parse(ModelConfig, info["model"], "ensemble.json model")
    models = []
    for member in info["members"]:
        ckpt = load_checkpoint(model_dir / member["file"])
        model = build_model(cfg, info["channels"], len(info["classes"]))
        model.load_state_dict(ckpt["state_dict"])
        models.append(model)
    return Ensemble(models, info["classes"], info)


def _better(a: dict, b: dict, monitor: str) -> bool:
    return a[monitor] > b[monitor] if monitor == "val_acc" else a[monitor] < b[monitor]


# --------------------------------------------------------------------------------------------
# The loop


@dataclass
class FitResult:
    history: list[dict]
    kept: list[dict] = field(default_factory=list)  # [{epoch, file, val_loss, val_acc}] best first
    warnings: list[str] = field(default_factory=list)


def fit(
    model: ResNet,
    train: Samples,
    val: Samples | None,
    cfg: TrainConfig,
    *,
    seed: int,
    device: torch.device,
    augmentation: Augmentation = None,
    state_dir: Path | None = None,
    fingerprint: str = "",
    desc: str = "train",
    epochs: int | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> FitResult:
    """Train for cfg.epochs (or `epochs`), early-stopping on `val`; keeps the top-k in state_dir.

    With state_dir, every epoch saves a resumable state there; a later call with the same
    fingerprint continues after the last finished epoch. Under torchrun every process trains
    on its share of each epoch through DistributedDataParallel; the first process validates,
    diagnoses and writes, and sends each epoch's record to the others so all stop together.
    """
    epochs, patience = budget(cfg, len(train), epochs or cfg.epochs)
    shard = current_shard()
    lead = shard.rank == 0
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg)
    factor = lr_factor(cfg, epochs)
    history: list[dict] = []
    kept: list[dict] = []
    start = 0
    if state_dir is not None:
        state = _load_state(state_dir, fingerprint)
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            history, kept, start = state["history"], state["kept"], state["epoch"] + 1
            log.info("%s: resuming after epoch %d from %s", desc, state["epoch"] + 1, state_dir)
    net = model
    if shard.world > 1:
        net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
    feed = make_feed(train, augmentation, cfg, device, shard)
    probe = (val if val is not None and len(val) else train).images[:256]
    bins = np.linspace(-4, 4, 41)
    bar = tqdm(
        range(start, epochs),
        desc=desc,
        unit="epoch",
        initial=start,
        total=epochs,
        mininterval=0.5,
        **({} if lead else {"disable": True}),  # one bar, from the first process
    )
    for epoch in bar:
        if _should_stop(history, cfg.monitor, patience):
            break
        # 1) reseed everything from (seed, epoch): resuming reproduces an uninterrupted run
        torch.manual_seed(seed * 100_003 + epoch)
        if isinstance(augmentation, dict):
            reseed(augmentation, seed * 100_003 + epoch)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * factor(epoch)
        # 2) train, 3) validate, 4) diagnose
        record = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"]}
        batches = feed.epoch(seed * 7919 + epoch)
        record.update(train_one_epoch(model, batches, optimizer, cfg, device, net=net))
        if lead:
            if val is not None and len(val):
                record.update(evaluate([model], val, device))
            x = to_input(torch.from_numpy(np.ascontiguousarray(probe)), device)
            record["activations"] = activation_stats(model, x, bins)
        record = _from_lead(record, shard)
        history.append(record)
        bar.set_postfix(
            {k: f"{record[k]:.3f}" for k in ("train_loss", "val_loss", "val_acc") if k in record}
        )
        # 5) keep the top-k checkpoints and a resumable state
        if lead and state_dir is not None:
            if "val_loss" in record:
                kept = _keep_top_k(state_dir, model, record, kept, cfg)
            _save_state(state_dir, model, optimizer, epoch, history, kept, fingerprint)
        if on_epoch:
            on_epoch(record)
    bar.close()
    return FitResult(history, kept, diagnose(history, cfg))


def _from_lead(record: dict, shard: Shard) -> dict:
    """The first process's record, on every process."""
    if shard.world == 1:
        return record
    box = [record]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def budget(cfg: TrainConfig, n: int, epochs: int) -> tuple[int, int]:
    """(epochs, patience) for n training images: stretched alike until the run has at least
    cfg.min_steps optimizer steps."""
    steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
    stretch = max(1.0, cfg.min_steps / (epochs * steps_per_epoch))
    return math.ceil(epochs * stretch), math.ceil(cfg.patience * stretch)


def _should_stop(history: list[dict], monitor: str, patience: int) -> bool:
    if not history or monitor not in history[-1]:
        return False
    best = 0
    for i, record in enumerate(history):
        if _better(record, history[best], monitor):
            best = i
    return len(history) - 1 - best >= patience


def _keep_top_k(
    state_dir: Path, model: nn.Module, record: dict, kept: list[dict], cfg: TrainConfig
) -> list[dict]:
    entry = {k: record[k] for k in ("epoch", "val_loss", "val_acc")}
    entry["file"] = f"epoch_{record['epoch']:03d}.pt"
    ranked = sorted(
        [*kept, entry],
        key=lambda e: -e[cfg.monitor] if cfg.monitor == "val_acc" else e[cfg.monitor],
    )
    ranked, dropped = ranked[: cfg.top_k], ranked[cfg.top_k :]
    if entry in ranked:
        save_checkpoint(state_dir / entry["file"], model, entry)
    for old in dropped:
        (state_dir / old["file"]).unlink(missing_ok=True)
    return ranked


def _save_state(state_dir, model, optimizer, epoch, history, kept, fingerprint) -> None:
    save_torch(
        state_dir / "last.pt",
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "history": history,
            "kept": kept,
            "fingerprint": fingerprint,
        },
    )


def _load_state(state_dir: Path, fingerprint: str) -> dict | None:
    path = state_dir / "last.pt"
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a torn or foreign file: start over rather than trust it
        log.warning("ignoring unreadable resume state %s", path)
        return None
    if state.get("fingerprint") != fingerprint:
        log.info("resume state in %s is for other data or params: starting over", state_dir)
        return None
    return state


def fingerprint_of(*parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(
            part.tobytes()
            if isinstance(part, np.ndarray)
            else json.dumps(part, sort_keys=True).encode()
        )
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# The stage


def load_training_samples(
    table_path: Path,
    val_path: Path,
    images_path: Path,
    classes: list[str],
    pseudo_dir: Path | None,
    augment_dir: Path | None,
) -> tuple[Samples, Samples, pd.DataFrame]:
    """Cleaned human rows, offline copies and accepted pseudo-labels; the scored validation rows.

    Returns (train, val, counts): counts per class of human and pseudo-labeled training rows.
    """
    table, val_table = read_table(table_path), read_table(val_path)
    val_table = val_table[val_table["scored"] == "True"]
    images = read_array(images_path)
    for path, t in ((table_path, table), (val_path, val_table)):
        unknown = sorted(set(t["label"]) - set(classes))
        if unknown:
            raise PipelineError(f"{path}: label {unknown[0]!r} is not in classes.json")
    overlap = set(table["id"]) & set(val_table["id"])
    if overlap:
        raise PipelineError(
            f"{table_path} holds validation rows ({sorted(overlap)[0]}): rerun clean"
        )
    parts_x = [images[table["row"].astype(int).to_numpy()]]
    parts_y = [table["label"].map(classes.index).to_numpy(np.int64)]
    counts = pd.DataFrame(0, index=classes, columns=["human", "offline", "pseudo"])
    counts["human"] = table["label"].value_counts().reindex(classes, fill_value=0)
    if augment_dir is not None and (augment_dir / "offline" / "table.csv").is_file():
        offline = read_table(augment_dir / "offline" / "table.csv")
        offline = offline[offline["source_id"].isin(table["id"])]  # copies of training rows only
        if len(offline):
            parts_x.append(
                read_array(augment_dir / "offline" / "images.npy")[
                    offline["row"].astype(int).to_numpy()
                ]
            )
            parts_y.append(offline["label"].map(classes.index).to_numpy(np.int64))
            counts["offline"] = offline["label"].value_counts().reindex(classes, fill_value=0)
    if pseudo_dir is not None and (pseudo_dir / "table.csv").is_file():
        pseudo = read_table(pseudo_dir / "table.csv")
        pseudo = pseudo[(pseudo["accepted"] == "True") & pseudo["label"].isin(classes)]
        if len(pseudo):
            parts_x.append(read_array(pseudo_dir / "images")[pseudo["row"].astype(int).to_numpy()])
            parts_y.append(pseudo["label"].map(classes.index).to_numpy(np.int64))
            counts["pseudo"] = pseudo["label"].value_counts().reindex(classes, fill_value=0)
    train = Samples(np.concatenate(parts_x), np.concatenate(parts_y))
    val = Samples(
        np.ascontiguousarray(images[val_table["row"].astype(int).to_numpy()]),
        val_table["label"].map(classes.index).to_numpy(np.int64),
    )
    return train, val, counts


def run(
    *,
    table_path: Path,
    val_path: Path,
    images_path: Path,
    classes_path: Path,
    augment_dir: Path,
    pseudo_dir: Path | None,
    model_dir: Path,
    report_dir: Path,
    live_dir: Path,
    state_dir: Path,
    params: Params,
) -> dict:
    cfg, base = params.train, params.base
    classes = read_json(classes_path)
    train, val, per_class = load_training_samples(
        table_path, val_path, images_path, classes, pseudo_dir, augment_dir
    )
    counts = {k: int(v) for k, v in per_class.sum().items()} | {"val": len(val)}
    device = pick_device()
    saved = read_json(augment_dir / "params.json")["augment"]  # the policy the augment stage saved
    augmentation = training_augmentation(
        parse(AugmentConfig, saved, f"{augment_dir / 'params.json'}: augment"),
        base,
        classes,
        device,
        transforms_dir=augment_dir / "transforms",
    )
    torch.manual_seed(base.seed)
    model = build_model(cfg.model, base.channels, len(classes))
    config = {"base": to_dict(base), "train": to_dict(cfg), "classes": classes, "counts": counts}
    fingerprint = fingerprint_of(config, train.images, train.labels, val.labels)
    log.info(
        "train: %d human + %d offline + %d pseudo images, %d validation, device %s, %s augmentation",
        counts["human"],
        counts["offline"],
        counts["pseudo"],
        counts["val"],
        device,
        "gpu" if isinstance(augmentation, BatchAugment) else "albumentations",
    )
    with distributed(device) as shard:
        result = fit(
            model,
            train,
            val,
            cfg,
            seed=base.seed,
            device=device,
            augmentation=augmentation,
            state_dir=state_dir,
            fingerprint=fingerprint,
        )
    if shard.rank > 0:
        return {}  # the first process writes every output
    if not result.kept:
        raise PipelineError("training kept no checkpoint: the validation split is empty")

    # The ensemble's own validation score, next to the best single checkpoint's.
    with atomic_dir(model_dir) as tmp:
        for entry in result.kept:
            shutil.copy2(state_dir / entry["file"], tmp / entry["file"])
        info = {
            "members": result.kept,
            "classes": classes,
            "model": to_dict(cfg.model),
            "channels": base.channels,
            "image_size": base.image_size,
            "config": config,
        }
        write_json(tmp / "ensemble.json", info)
        # 6) calibrate: one temperature for the averaged probabilities, fitted on validation
        ensemble = load_ensemble(tmp)
        raw = ensemble.predict(val.images, device, calibrated=False)
        info["temperature"] = fit_temperature(val.labels, raw)
        write_json(tmp / "ensemble.json", info)
    calibrated = apply_temperature(raw, info["temperature"])
    summary = {
        "epochs_run": len(result.history),
        "epochs_budget": budget(cfg, len(train), cfg.epochs)[0],
        "best_val_acc": max(h["val_acc"] for h in result.history),
        "ensemble_val_acc": float((raw.argmax(1) == val.labels).mean()),
        "ensemble_val_loss": nll(val.labels, calibrated),
        "temperature": info["temperature"],
        "val_ece_before": expected_calibration_error(val.labels, raw)[0],
        "val_ece_after": expected_calibration_error(val.labels, calibrated)[0],
        "train_size": len(train),
        **{f"train_size_{k}": v for k, v in counts.items()},
    }
    write_live(live_dir, result.history, summary)
    write_report(report_dir, result, config, summary, per_class)
    shutil.rmtree(state_dir, ignore_errors=True)
    for warning in result.warnings:
        log.warning("warning: %s", warning)
    log.info(
        "train: ensemble of %d checkpoints, validation accuracy %.3f, temperature %.2f "
        "(validation ECE %.3f -> %.3f)",
        len(result.kept),
        summary["ensemble_val_acc"],
        summary["temperature"],
        summary["val_ece_before"],
        summary["val_ece_after"],
    )
    return summary


def write_live(live_dir: Path, history: list[dict], summary: dict) -> None:
    """dvclive metrics and per-epoch plots, written as a whole once training has finished."""
    from dvclive import Live

    with atomic_dir(live_dir) as tmp:
        live = Live(dir=str(tmp), dvcyaml=None, save_dvc_exp=False, report=None)
        for record in history:
            live.log_metric("lr", record["lr"], plot=True)
            for key in ("train_loss", "train_acc", "val_loss", "val_acc", "grad_norm"):
                if key in record:
                    live.log_metric(key.replace("_", "/", 1), record[key])
            live.next_step()
        for key, value in summary.items():
            live.summary[key] = value
        live.end()


def write_report(
    report_dir: Path, result: FitResult, config: dict, summary: dict, per_class: pd.DataFrame
) -> None:
    with atomic_dir(report_dir) as tmp:
        write_json(tmp / "config.json", config)
        shares = per_class.assign(
            pseudo_per_human=per_class["pseudo"] / per_class["human"].clip(lower=1)
        )
        write_table(tmp / "per_class.csv", shares.rename_axis("class").reset_index())
        write_json(
            tmp / "diagnostics.json",
            {"history": result.history, "kept": result.kept, "summary": summary},
        )
        write_json(tmp / "warnings.json", result.warnings)
        plot_diagnostics(tmp / "diagnostics.png", result.history)


def plot_diagnostics(path: Path, history: list[dict]) -> None:
    """Loss curves, gradient norm, update ratios, dead units and pre-activation histograms."""
    plt = report.pyplot()
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, key, title in ((axes[0, 0], "loss", "loss"), (axes[0, 1], "acc", "accuracy")):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], label="train")
        if history and f"val_{key}" in history[0]:
            ax.plot(epochs, [h[f"val_{key}"] for h in history], label="validation")
        ax.set(title=title, xlabel="epoch")
        ax.legend()
    ax = axes[0, 2]
    ax.plot(epochs, [h["grad_norm"] for h in history])
    ax.set(title="mean gradient norm", xlabel="epoch")
    ax = axes[1, 0]
    layers = list(history[-1]["update_ratio"]) if history else []
    for name in layers:
        ax.plot(epochs, [h["update_ratio"].get(name, np.nan) for h in history], lw=0.8)
    ax.axhline(1e-3, color="k", ls="--", lw=0.8)
    ax.set(title="update / weight ratio per layer (guide: ~1e-3)", xlabel="epoch", yscale="log")
    ax = axes[1, 1]
    acts = list(history[-1]["activations"]) if history else []
    for name in acts:
        ax.plot(
            epochs, [h["activations"][name]["dead_fraction"] for h in history], label=name, lw=0.8
        )
    ax.set(title="dead units after each activation", xlabel="epoch", ylim=(0, 1))
    ax = axes[1, 2]
    centers = np.linspace(-4, 4, 41)
    centers = (centers[1:] + centers[:-1]) / 2
    for name in acts:
        stats = history[-1]["activations"][name]
        ax.plot(
            centers,
            stats["hist"],
            label=f"{name} (mean {stats['mean']:.2f}, std {stats['std']:.2f})",
            lw=0.8,
        )
    ax.set(title="pre-activation histogram, last epoch", yscale="log")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
