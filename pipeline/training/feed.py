"""Where training batches come from: devices, torchrun processes, and the two augmentation
backends, each turning a set of samples into one epoch of (x, y) batches on the device.

- LoaderFeed: the albumentations policy per image (augment.backend: albumentations), in
  DataLoader workers or in this process;
- TensorFeed: the same policy as batched tensor operations (augment.backend: gpu, see
  pipeline/training/gpu_augment.py), the whole set held where the model is when it fits;
- under torchrun (train.nproc > 1) each process takes its Shard of every epoch (the command
  relaunches itself with pipeline/core/processes.py: launch).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from pipeline.core.config import AugmentConfig, BaseConfig, TrainConfig
from pipeline.core.device import to_input
from pipeline.core.errors import PipelineError
from pipeline.data.transforms import apply_policy, build_policies, load_transforms, reseed
from pipeline.training.gpu_augment import BatchAugment

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """This process's share of every epoch: rank `rank` of `world` under torchrun, else 0 of 1."""

    rank: int = 0
    world: int = 1


def current_shard() -> Shard:
    if dist.is_available() and dist.is_initialized():
        return Shard(dist.get_rank(), dist.get_world_size())
    return Shard()


@contextmanager
def distributed(device: torch.device) -> Iterator[Shard]:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPU) when it started several
    processes; yields this process's Shard. Alone, it does nothing and yields Shard(). In a
    group someone else set up and owns (Ray Train's workers), it yields that group's Shard."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield Shard()
        return
    if dist.is_available() and dist.is_initialized():
        yield current_shard()
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    shard = current_shard()
    if shard.rank > 0:
        logging.getLogger("pipeline").setLevel(logging.WARNING)  # one log, from the first
    log.info("train: %d processes (%s)", shard.world, dist.get_backend())
    try:
        yield shard
    finally:
        dist.destroy_process_group()


def epoch_order(n: int, seed: int, shard: Shard) -> torch.Tensor:
    """A seeded permutation of range(n), padded to a multiple of the world size by repeating
    its start (as DistributedSampler does), then this rank's every world-th entry."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if shard.world > 1:
        order = torch.cat([order, order[: (-n) % shard.world]])
    return order[shard.rank :: shard.world]


@dataclass
class Samples:
    """Images (N, H, W, C) uint8 and their class indices (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


class AugmentedSamples(Dataset):
    def __init__(self, samples: Samples, policies: dict | None):
        self.samples = samples
        self.policies = policies

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        image, label = self.samples.images[i], int(self.samples.labels[i])
        if self.policies is not None:
            image = apply_policy(self.policies, image, label)
        return torch.from_numpy(np.ascontiguousarray(image)), label


def _seed_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    if info.dataset.policies is not None:
        reseed(info.dataset.policies, torch.initial_seed() % 2**31)


class Batches:
    """One epoch of (x, y) batches on the device; iterable once, with a length."""

    def __init__(self, make: Callable[[], Iterator], count: int):
        self._make, self._count = make, count

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._make()


class LoaderFeed:
    """The albumentations backend: the saved policy applied per sample, in DataLoader workers
    (train.num_workers), or in this process, batch by batch, when there are none."""

    def __init__(self, samples, policies, cfg: TrainConfig, device, shard: Shard):
        self.dataset = AugmentedSamples(samples, policies)
        self.cfg, self.device, self.shard = cfg, device, shard
        self.batch_size = per_rank_batch(cfg.batch_size, shard)

    def epoch(self, seed: int) -> Batches:
        order = epoch_order(len(self.dataset), seed, self.shard).numpy()
        count = math.ceil(len(order) / self.batch_size)
        if self.cfg.num_workers == 0:
            return Batches(lambda: self._in_process(order), count)
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=order.tolist(),
            num_workers=self.cfg.num_workers,
            worker_init_fn=_seed_worker,
            generator=torch.Generator().manual_seed(seed),
            pin_memory=self.device.type == "cuda",
        )
        return Batches(lambda: self._on_device(loader), count)

    def _in_process(self, order: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        samples, policies = self.dataset.samples, self.dataset.policies
        for start in range(0, len(order), self.batch_size):
            idx = np.sort(order[start : start + self.batch_size])  # sorted: memory-map friendly
            images, labels = samples.images[idx], samples.labels[idx]
            if policies is not None:
                images = np.stack(
                    [apply_policy(policies, im, int(y)) for im, y in zip(images, labels)]
                )
            yield (
                to_input(torch.from_numpy(images), self.device),
                torch.from_numpy(labels).to(self.device),
            )

    def _on_device(self, loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in loader:
            yield to_input(images, self.device), labels.to(self.device, non_blocking=True)


class TensorFeed:
    """The gpu backend: the whole set as one uint8 tensor (on the GPU when it fits there), each
    batch augmented where it lives by BatchAugment."""

    def __init__(self, samples, augment: BatchAugment, cfg: TrainConfig, device, shard: Shard):
        images = torch.from_numpy(np.ascontiguousarray(samples.images))
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            images = images.to(device) if images.nbytes < free // 4 else images.pin_memory()
        # Labels and each epoch's order live where they are indexed: a copy from pageable host
        # memory at every step would make the host wait for the GPU's queue to drain.
        self.images = images
        self.labels = torch.from_numpy(np.asarray(samples.labels)).to(device)
        self.augment, self.device, self.shard = augment, device, shard
        self.batch_size = per_rank_batch(cfg.batch_size, shard)

    def epoch(self, seed: int) -> Batches:
        order = epoch_order(len(self.labels), seed, self.shard)
        generator = torch.Generator(self.device).manual_seed(seed)
        count = math.ceil(len(order) / self.batch_size)
        image_order, label_order = order.to(self.images.device), order.to(self.device)

        def batches():
            for start in range(0, len(order), self.batch_size):
                rows = slice(start, start + self.batch_size)
                images = self.images[image_order[rows]].to(self.device, non_blocking=True)
                labels = self.labels[label_order[rows]]
                x = self.augment(images, labels, generator).mul_(2).sub_(1)
                yield x.contiguous(memory_format=torch.channels_last), labels

        return Batches(batches, count)


def per_rank_batch(batch_size: int, shard: Shard) -> int:
    """Each of `world` processes takes an equal share of train.batch_size."""
    if batch_size < shard.world:
        raise PipelineError(
            f"train.batch_size {batch_size} is smaller than the {shard.world} training "
            f"processes (train.nproc, or cluster.workers on Ray): every process needs at least "
            f"one image per step"
        )
    return batch_size // shard.world


Augmentation = dict | BatchAugment | None  # albumentations policies by class, or the gpu backend


def make_feed(samples: Samples, augmentation: Augmentation, cfg: TrainConfig, device, shard):
    if isinstance(augmentation, BatchAugment):
        return TensorFeed(samples, augmentation, cfg, device, shard)
    return LoaderFeed(samples, augmentation, cfg, device, shard)


def resolve_backend(aug: AugmentConfig, device: torch.device) -> str:
    """augment.backend, with `auto` made concrete: gpu on CUDA, albumentations elsewhere. On a
    CPU the batched backend is faster too, but with it the low-label benchmark's cleaning found
    fewer of the wrong labels and its validation accuracy was lower, so `auto` keeps the per-image
    albumentations there (docs/results.md, "Augmentation backend on CPUs")."""
    if aug.backend != "auto":
        return aug.backend
    return "gpu" if device.type == "cuda" else "albumentations"


def training_augmentation(
    aug: AugmentConfig,
    base: BaseConfig,
    classes: list[str],
    device: torch.device,
    transforms_dir: Path | None = None,
) -> Augmentation:
    """What the training loop augments with: the gpu backend, or the albumentations policies
    (those the augment stage saved in transforms_dir, else built from params)."""
    if resolve_backend(aug, device) == "gpu":
        return BatchAugment(aug, base, classes)
    if transforms_dir is not None:
        return load_transforms(transforms_dir, classes)
    return build_policies(aug, base, classes)
