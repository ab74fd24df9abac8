"""Training diagnostics from the tuning checklist: pre-activation statistics, dead units, and
plain-language warnings about the learning rate. Computed by the training loop every epoch."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipeline.core.config import TrainConfig

DEAD_WARNING = 0.5  # share of dead units in a layer that earns a warning


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

    A rise is judged on the mean of the last fifth of the epochs against the lowest mean of as
    many consecutive epochs before it, and must give back a tenth of what was gained and 3.5
    standard errors of the loss's epoch-to-epoch noise; the last epoch above the first is a rise
    when it is above by 3 standard errors. The noise is estimated from second differences
    (median |l[e+1] - 2 l[e] + l[e-1]| / 1.65: a steady fall or rise is not noise), so the
    noise of a long run on a small set, near zero loss, of a few mixup steps an epoch, or of a
    frozen backbone's head that has converged within its first epoch, is not a rise (one lucky
    epoch is not the level the loss had reached): on a flat loss with Gaussian noise it warns
    in about 2 runs of 100 (tests/test_train.py).
    """
    warnings = []
    losses = np.array([h["train_loss"] for h in history])
    sigma = float(np.median(np.abs(np.diff(losses, 2)))) / 1.65 if len(losses) > 2 else 0.0
    tail = max(3, len(losses) // 5)
    if len(losses) > tail:
        before = losses[:-tail]
        width = min(tail, len(before))
        recent = losses[-tail:].mean()
        best = np.convolve(before, np.ones(width) / width, mode="valid").min()
        noise_of_means = 3.5 * sigma * np.sqrt(2 / tail)
        given_back = recent - best > max(0.1 * (losses[0] - best), noise_of_means) + 1e-3
        if given_back or losses[-1] - losses[0] > 3 * sigma * np.sqrt(2):
            warnings.append(
                f"Training loss rose (lowest {width}-epoch mean {best:.3f}, last {tail} epochs "
                f"{recent:.3f}): the "
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
