"""The training loop: `train_one_epoch`, `evaluate`, `fit`, and the optimizer and schedule.

Shared by the train stage, clean's K-fold models and lr-find. Every epoch reseeds from
(seed, epoch), so a run resumed from its last checkpoint equals an uninterrupted one. A run
makes at least `min_steps` optimizer steps: a small set is passed over several times in each
epoch (with fresh augmentation each time), so a few hundred images get as many updates as a few
thousand while the epochs, patience and schedule keep their meaning and their cost per epoch. Under torchrun every
process trains on its share of each epoch through DistributedDataParallel; the first process
validates, diagnoses and writes.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from pipeline.core.config import TrainConfig
from pipeline.core.device import to_input
from pipeline.core.errors import PipelineError
from pipeline.data.transforms import reseed
from pipeline.training.diagnostics import activation_stats, diagnose
from pipeline.training.ensemble import predict_proba, save_checkpoint, save_torch
from pipeline.training.feed import Augmentation, Batches, Samples, Shard, current_shard, make_feed
from pipeline.training.model import ResNet

log = logging.getLogger(__name__)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Weight decay on conv/linear weights only: decaying norm scales and biases only hurts. A
    pretrained body learns at train.model.body_lr times the rate of the new head (`lr_scale`)."""
    body = getattr(model, "body", None) if cfg.model.pretrained else None
    in_body = {id(p) for p in body.parameters()} if body is not None else set()
    groups = []
    for scale, part in ((1.0, False), (cfg.model.body_lr, True)):
        params = [p for p in model.parameters() if (id(p) in in_body) == part and p.requires_grad]
        for decay, chosen in (
            (cfg.weight_decay, [p for p in params if p.ndim > 1]),
            (0.0, [p for p in params if p.ndim <= 1]),
        ):
            if chosen:
                groups.append({"params": chosen, "weight_decay": decay, "lr_scale": scale})
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


def gradient_norm(model: nn.Module) -> torch.Tensor:
    """The global L2 norm of the gradients, on the device. Only read: clip_grad_norm_(inf) would
    also rescale every gradient by 1.0, a second pass over them each step."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6: foreach kernels
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


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
    mix = torch.distributions.Beta(cfg.mixup, cfg.mixup) if cfg.mixup > 0 else None
    for step, (x, y) in enumerate(batches):
        if mix is not None:  # blend each image and its label with another of the batch
            share = mix.sample().item()
            partner = torch.randperm(len(y), device=device)  # no host copy: no wait
            x = share * x + (1 - share) * x[partner]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = net(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            if mix is not None:
                loss = share * loss + (1 - share) * F.cross_entropy(
                    logits, y[partner], label_smoothing=cfg.label_smoothing
                )
        objective = loss + cfg.l1 * l1_penalty(model) if cfg.l1 > 0 else loss
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        grad_norms.append(gradient_norm(model))
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


def _better(a: dict, b: dict, monitor: str) -> bool:
    return a[monitor] > b[monitor] if monitor == "val_acc" else a[monitor] < b[monitor]


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
    epochs = epochs or cfg.epochs
    passes = passes_per_epoch(cfg, len(train), epochs)
    shard = current_shard()
    lead = shard.rank == 0
    # Channels-last on every device: oneDNN's CPU convolutions run this ResNet about 30% faster
    # in it too, and a mixup blend of channels-last inputs would otherwise lose the layout.
    model.to(device, memory_format=torch.channels_last)
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
        if should_stop(history, cfg.monitor, cfg.patience):
            break
        # 1) reseed everything from (seed, epoch): resuming reproduces an uninterrupted run
        torch.manual_seed(seed * 100_003 + epoch)
        if isinstance(augmentation, dict):
            reseed(augmentation, seed * 100_003 + epoch)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * group["lr_scale"] * factor(epoch)
        # 2) train, 3) validate, 4) diagnose
        record = {"epoch": epoch + 1, "lr": cfg.lr * factor(epoch)}
        batches = epoch_batches(feed, seed * 7919 + epoch, passes)
        record.update(train_one_epoch(model, batches, optimizer, cfg, device, net=net))
        if lead:
            if val is not None and len(val):
                record.update(evaluate([model], val, device))
            x = to_input(torch.from_numpy(np.ascontiguousarray(probe)), device)
            record["activations"] = activation_stats(model, x, bins)
        record = from_lead(record, shard)
        history.append(record)
        bar.set_postfix(
            {k: f"{record[k]:.3f}" for k in ("train_loss", "val_loss", "val_acc") if k in record}
        )
        # 5) keep the top-k checkpoints and a resumable state
        if lead and state_dir is not None:
            if "val_loss" in record:
                kept = keep_top_k(state_dir, model, record, kept, cfg)
            _save_state(state_dir, model, optimizer, epoch, history, kept, fingerprint)
        if on_epoch:
            on_epoch(record)
    bar.close()
    return FitResult(history, kept, diagnose(history, cfg))


def from_lead(value, shard: Shard):
    """The first process's `value` (anything picklable), on every process."""
    if shard.world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def passes_per_epoch(cfg: TrainConfig, n: int, epochs: int) -> int:
    """Passes over n training images in each epoch: enough for `epochs` epochs to make at least
    cfg.min_steps optimizer steps (1 for a set large enough on its own)."""
    steps = max(1, math.ceil(n / cfg.batch_size))
    return max(1, math.ceil(cfg.min_steps / (epochs * steps)))


def epoch_batches(feed, seed: int, passes: int) -> Batches:
    """One epoch: `passes` shuffled passes over the set, each with its own order."""
    if passes == 1:
        return feed.epoch(seed)
    parts = [feed.epoch(seed + p * 1_000_003) for p in range(passes)]
    return Batches(lambda: itertools.chain.from_iterable(parts), sum(map(len, parts)))


def should_stop(history: list[dict], monitor: str, patience: int) -> bool:
    if not history or monitor not in history[-1]:
        return False
    best = 0
    for i, record in enumerate(history):
        if _better(record, history[best], monitor):
            best = i
    return len(history) - 1 - best >= patience


def keep_top_k(
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
