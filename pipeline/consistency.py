"""Consistency training on the pool images the pseudo-label set leaves out (FixMatch or VAT).

The pseudo-label set admits the images the previous round's model is sure of; the rest, the
hardest 13-16% of the pools in the low-label benchmark (bench/experiments/gap.py), would teach
the most and were never trained on. Two methods use them without trusting a label; the loss
(pipeline/loop.py), weighted by train.unlabeled_weight, is added to the labeled loss.

  fixmatch  (Sohn et al. 2020) every step, the model in training predicts a weakly augmented
            view of each unlabeled image; where it is confident (>= train.unlabeled_threshold),
            that prediction is the target of a strongly augmented view of the same image.
  vat       virtual adversarial training (Miyato et al. 2018): the model's prediction of the
            weak view is the target of the same view moved a small step (train.vat_eps, RMS per
            pixel value) in the direction that changes the prediction most. No confidence is needed:
            every image counts, so the model is made smooth where the pool images lie.

Views are made by the batched augmentation (pipeline/gpu_augment.py) where the batch lives:
  weak    the augment policy as the labeled images see it
  strong  (FixMatch only) the same transforms, each on more often and twice as far, plus a grey
          cutout square; VAT's second view is the weak one moved (pipeline/loop.py)
A class's `augment.exclude` cannot be honoured on an image whose class is unknown, so a
transform any class excludes is off for every unlabeled view.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator

import numpy as np
import torch

from pipeline.config import AugmentConfig, BaseConfig, TrainConfig, transform_names
from pipeline.feed import Shard, epoch_order
from pipeline.gpu_augment import BatchAugment

STRONG_P = 0.8  # a transform the policy uses is on this often in the strong view (at least)
CUTOUT = (0.25, 0.5)  # side of the cutout square, share of the image side


def unlabeled_policies(aug: AugmentConfig, base: BaseConfig) -> tuple[BatchAugment, BatchAugment]:
    """(weak, strong) batched augmentations for images of unknown class."""
    excluded = {name for names in aug.exclude.values() for name in names}
    off = {name: dataclasses.replace(getattr(aug, name), p=0.0) for name in excluded}
    weak = dataclasses.replace(aug, exclude={}, **off)

    def stronger(name: str):
        section = getattr(weak, name)
        if section.p == 0:
            return section
        changes = {"p": max(section.p, STRONG_P)}
        if name in ("rotate", "shear"):
            changes["limit"] = min(2 * section.limit, 45.0)
        elif name == "crop":
            low, high = section.scale
            changes["scale"] = (max(0.1, 1 - 2 * (1 - low)), high)
        elif name == "brightness_contrast":
            changes["brightness"] = min(2 * section.brightness, 1.0)
            changes["contrast"] = min(2 * section.contrast, 1.0)
        elif name == "hsv":
            changes.update(
                hue=min(2 * section.hue, 180.0),
                saturation=min(2 * section.saturation, 255.0),
                value=min(2 * section.value, 255.0),
            )
        elif name in ("noise", "blur", "hflip", "vflip"):
            changes["p"] = section.p  # label-safe, but not made stronger
        return dataclasses.replace(section, **changes)

    strong = dataclasses.replace(weak, **{name: stronger(name) for name in transform_names()})
    return BatchAugment(weak, base, ["?"]), BatchAugment(strong, base, ["?"])


def cutout(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One grey square per image (side a random share CUTOUT of the image side), in place."""
    n, _, h, w = x.shape
    u = torch.rand(n, 3, generator=generator, device=x.device)
    side = (CUTOUT[0] + (CUTOUT[1] - CUTOUT[0]) * u[:, 0]) * min(h, w)
    cy, cx = u[:, 1] * h, u[:, 2] * w
    rows = torch.arange(h, device=x.device)[None, :, None]
    cols = torch.arange(w, device=x.device)[None, None, :]
    half = (side / 2)[:, None, None]
    inside = ((rows - cy[:, None, None]).abs() < half) & ((cols - cx[:, None, None]).abs() < half)
    return x.masked_fill_(inside[:, None], 0.5)


class UnlabeledFeed:
    """(weak, strong) views of `ratio` x the per-process batch of unlabeled images per step,
    in seeded shuffled passes over the set (restarted as often as an epoch needs). VAT makes its
    own second view: its strong view is None."""

    def __init__(
        self,
        images: np.ndarray,
        aug: AugmentConfig,
        base: BaseConfig,
        cfg: TrainConfig,
        device: torch.device,
        shard: Shard,
    ):
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.weak, self.strong = unlabeled_policies(aug, base)
        self.batch_size = max(1, cfg.unlabeled_ratio * cfg.batch_size // shard.world)
        self.make_strong = cfg.unlabeled_method == "fixmatch"
        self.device, self.shard = device, shard

    def __len__(self) -> int:
        return len(self.images)

    def epoch(self, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """An endless stream for one epoch. Every process shuffles with the same `seed` and
        takes its own share of each pass; the views' randomness differs by process."""
        generator = torch.Generator(self.device).manual_seed(seed + 104_729 * self.shard.rank)
        order, passes = torch.zeros(0, dtype=torch.long), itertools.count()
        while True:
            while len(order) < self.batch_size:  # the next pass, its own seeded order
                share = epoch_order(len(self.images), seed + next(passes) * 1_000_003, self.shard)
                order = torch.cat([order, share])
            idx, order = order[: self.batch_size], order[self.batch_size :]
            batch = self.images[idx].to(self.device, non_blocking=True)
            labels = torch.zeros(len(idx), dtype=torch.long, device=self.device)
            weak = _as_input(self.weak(batch, labels, generator))
            if not self.make_strong:
                yield weak, None
                continue
            yield weak, _as_input(cutout(self.strong(batch, labels, generator), generator))


def _as_input(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] (N, C, H, W) -> the model's [-1, 1], channels-last (as pipeline/device.py)."""
    return x.mul_(2).sub_(1).contiguous(memory_format=torch.channels_last)
