"""The clean stage's K-fold and the train stage's fit on a Ray cluster (cluster.engine: ray).

K-fold: one Ray task per fold, cluster.cpus_per_worker CPUs and cluster.gpus_per_worker GPUs
each, at most cluster.workers at a time. A task runs the very `fold_predictions` a local process
runs, seeded by its fold number, with as many threads as it has CPUs: on CPUs the out-of-fold
probabilities equal a local run's with the same threads, bit for bit. The labeled images, labels
and folds reach the workers through Ray's object store (put once for every budget), so the
K-fold needs no shared path. A task whose worker dies is run again (Ray's task retries, RETRIES
times); an error of the pipeline's own is one line and is not retried.

Train: Ray Train's TorchTrainer starts cluster.workers workers in one process group (gloo on
CPUs, NCCL on GPUs), and each runs the train stage's own `run`: the DistributedDataParallel
`fit` that train.nproc > 1 runs under torchrun, each worker one shard of every epoch. The
workers read the packed images and the first one writes the checkpoints, the model and the
report at the project's own paths, so the project must be on a path every node mounts at the
same place (`check_nodes`, before any work). A lost worker restarts the whole group (Ray Train's
FailureConfig, RETRIES times), and `fit` resumes from the last epoch checkpoint in the model's
state folder, as after a crash of a local run; an error of the pipeline's own is passed to the
driver and is not retried.

Ray is imported only here and in ray_predict.py, and only when chosen: pip install -e '.[ray]'.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.core.config import ClusterConfig, Params
from pipeline.core.errors import PipelineError
from pipeline.core.processes import job_folder
from pipeline.training.ray_predict import (
    check_nodes,
    connect,
    connected,
    one_line,
    only_granted_gpus,
)

log = logging.getLogger(__name__)

RETRIES = 3  # a fold's task, or the training group, started again after a lost worker


def _fold(fold_predictions, images, labels, splits, fold, params, classes, min_steps, threads):
    """A Ray task: one fold's (probs, embeddings) for the rows it held out."""
    only_granted_gpus(params.cluster.gpus_per_worker)
    import torch

    torch.set_num_threads(threads)
    return next(
        fold_predictions(images, labels, splits, range(fold, fold + 1), params, classes, min_steps)
    )


@dataclass
class KFoldOnRay:
    """A connected Ray and the K-fold's inputs in its object store, put there once for every
    budget and read by every task."""

    ray: Any
    images: Any
    labels: Any
    splits: Any
    folds: int


@contextlib.contextmanager
def kfold_inputs_on_ray(images: np.ndarray, labels: np.ndarray, splits: list, cluster):
    """KFoldOnRay for the clean stage's budgets; a Ray instance started for them is shut down
    at the end, before cleanlab forks its workers from this process."""
    with connected(cluster) as ray:
        yield KFoldOnRay(
            ray,
            ray.put(np.ascontiguousarray(images)),
            ray.put(labels),
            ray.put(splits),
            len(splits),
        )


def kfold_on_ray(
    fold_predictions,
    inputs: KFoldOnRay,
    params: Params,
    classes: list[str],
    min_steps: int,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each fold's (probs (H, K), embeddings (H, D)) in fold order, every fold a Ray task
    running `fold_predictions` (pipeline.training.kfold's) for that fold alone."""
    cluster: ClusterConfig = params.cluster
    ray = inputs.ray
    task = ray.remote(_fold).options(
        num_cpus=cluster.cpus_per_worker,
        num_gpus=cluster.gpus_per_worker,
        max_retries=RETRIES,
        retry_exceptions=False,
    )
    threads = max(1, int(cluster.cpus_per_worker))
    todo, running, done = list(range(inputs.folds)), {}, {}
    log.info(
        "clean: K-fold at %d steps on Ray, %d folds, at most %d at a time",
        min_steps,
        inputs.folds,
        cluster.workers,
    )
    with tqdm(
        total=inputs.folds, desc=f"clean: K-fold on Ray, {min_steps} steps", unit="fold"
    ) as bar:
        try:
            while todo or running:
                while todo and len(running) < cluster.workers:
                    fold = todo.pop(0)
                    ref = task.remote(
                        fold_predictions,
                        inputs.images,
                        inputs.labels,
                        inputs.splits,
                        fold,
                        params,
                        classes,
                        min_steps,
                        threads,
                    )
                    running[ref] = fold
                ready, _ = ray.wait(list(running), num_returns=1)
                for ref in ready:
                    done[running.pop(ref)] = ray.get(ref)
                    bar.update()
        except Exception as exc:
            for ref in running:
                ray.cancel(ref, force=True)
            raise one_line(exc, "the clean stage's K-fold on Ray") from None
    return [done[fold] for fold in range(inputs.folds)]


def _train_worker(config: dict) -> None:
    """A Ray Train worker: the train stage's run, in the process group Ray Train set up (it
    sets RANK, WORLD_SIZE and LOCAL_RANK, which pick_device and `distributed` read)."""
    only_granted_gpus(config["stage_args"]["params"].cluster.gpus_per_worker)
    import torch

    torch.set_num_threads(config["threads"])
    try:
        config["run"](**config["stage_args"])
    except PipelineError as exc:
        # Ray Train would start the group again for any error; the pipeline's own (bad inputs,
        # a diverged run: every worker meets it at the same point) goes to the driver instead
        rank = os.environ.get("RANK", "0")
        (Path(config["errors"]) / f"error-{rank}.txt").write_text(str(exc))


def train_on_ray(run, stage_args: dict) -> None:
    """The train stage, `run(**stage_args)` (pipeline.stages.train.run), as a Ray Train
    TorchTrainer of cluster.workers workers; its outputs are written where a local run writes
    them, by the first worker."""
    params: Params = stage_args["params"]
    cluster = params.cluster
    if cluster.gpus_per_worker not in (0, 1):
        raise PipelineError(
            f"cluster.gpus_per_worker {cluster.gpus_per_worker:g}: training on Ray takes 0 or 1 "
            f"GPU a worker (one DistributedDataParallel process per GPU, as under torchrun)"
        )
    ray = connect(cluster)
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    stage_args = {
        key: Path(value).resolve() if isinstance(value, Path) else value
        for key, value in stage_args.items()
    }
    inputs = [
        stage_args[k]
        for k in ("table_path", "val_path", "images_path", "classes_path", "augment_dir")
    ]
    if stage_args["pseudo_dir"] is not None:
        inputs.append(stage_args["pseudo_dir"])
    outputs = [stage_args[k].parent for k in ("model_dir", "report_dir", "live_dir", "state_dir")]
    for folder in outputs:
        folder.mkdir(parents=True, exist_ok=True)
    check_nodes(ray, inputs + outputs)
    resources = {"CPU": cluster.cpus_per_worker}
    if cluster.gpus_per_worker:
        resources["GPU"] = cluster.gpus_per_worker
    log.info("train: %d workers on Ray (DistributedDataParallel)", cluster.workers)
    # Ray Train's own run folder (it checks that every worker sees it), beside the model, not
    # in ~/ray_results; removed afterwards
    with job_folder(stage_args["model_dir"]) as storage:
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config={
                "run": run,
                "stage_args": stage_args,
                "threads": max(1, int(cluster.cpus_per_worker)),
                "errors": str(storage),
            },
            scaling_config=ScalingConfig(
                num_workers=cluster.workers,
                use_gpu=cluster.gpus_per_worker > 0,
                resources_per_worker=resources,
            ),
            run_config=RunConfig(
                name="train",
                storage_path=str(storage),
                failure_config=FailureConfig(max_failures=RETRIES),
            ),
        )
        try:
            trainer.fit()
        except Exception as exc:
            raise one_line(exc, "training on Ray") from None
        for error in sorted(storage.glob("error-*.txt")):
            raise PipelineError(error.read_text())
