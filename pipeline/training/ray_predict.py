"""Prediction on a Ray cluster (cluster.engine: ray): `predict_packed`'s work as Ray Data
`map_batches` over the packed images, for evaluate's test images and pseudolabel's pools.

The dataset is the list of batch starts, one item each, so every worker predicts exactly the
batches one local process makes (the first PREDICT_BATCH rows, the next, ...): on CPUs the
numbers equal the local run's bit for bit. Each worker is an actor that loads the ensemble once
and reads its rows from the memory-mapped shards, so the project (its artifacts/) must be on a
path every node mounts at the same place; `check_nodes` refuses a cluster where a node cannot
read it, in one line, before any work starts. A worker lost mid-stage is restarted by Ray Data
and its batch predicted again (its actors' default: restarts and task retries without limit; an
error of the pipeline's own is not retried); results are gathered in input order and only this
process writes the stage's outputs.

Ray is imported only here, and only when chosen: `pip install -e '.[ray]'`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from pathlib import Path

import numpy as np

from pipeline.core.config import ClusterConfig
from pipeline.core.errors import PipelineError

log = logging.getLogger(__name__)


def connect(cluster: ClusterConfig):
    """ray, connected to cluster.address ("auto": RAY_ADDRESS, else a new local instance)."""
    # Processes this one forks (cleanlab's pool) inherit Ray's crash handler, which prints a
    # stack trace when their pool ends them with SIGTERM: a scare, not an error. Ray reads the
    # switch once, when it is first imported.
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    try:
        import ray
        import ray.data  # noqa: F401  (the extra's ray[data], not bare ray)
    except ImportError:
        raise PipelineError(
            "cluster.engine is ray but Ray is not installed: pip install -e '.[ray]' "
            "(or set cluster.engine: local)"
        ) from None
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its plans and timings: noise here
    if not ray.is_initialized():
        address = cluster.address
        if address == "auto":
            address = os.environ.get("RAY_ADDRESS") or None  # None: start a local instance
        try:
            ray.init(
                address=address,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise PipelineError(
                f"cluster.address {address}: cannot connect to Ray ({exc}); start the cluster "
                f"(`ray start --head`, docs/scaling.md) or set cluster.engine: local"
            ) from None
    check_capacity(ray, cluster)
    return ray


@contextlib.contextmanager
def connected(cluster: ClusterConfig):
    """connect(cluster); a Ray instance this process started is shut down at the end."""
    started_here = "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    ray = connect(cluster)
    try:
        yield ray
    finally:
        if started_here:
            ray.shutdown()


def check_capacity(ray, cluster: ClusterConfig) -> None:
    """The cluster's CPUs and GPUs hold cluster.workers workers at once, or a PipelineError: Ray
    would wait for them without end (a training group starts only whole). Counts the nodes that
    are up now; an autoscaling cluster's nodes must be started first."""
    have = ray.cluster_resources()
    for resource, each in (("CPU", cluster.cpus_per_worker), ("GPU", cluster.gpus_per_worker)):
        need = cluster.workers * each
        if need > have.get(resource, 0):
            raise PipelineError(
                f"cluster: {cluster.workers} workers x {each:g} {resource} each need "
                f"{need:g} {resource}s, the Ray cluster has {have.get(resource, 0):g}: lower "
                f"cluster.workers or cluster.{resource.lower()}s_per_worker, or add nodes"
            )


def _missing(paths: list[str]) -> tuple[str, list[str]]:
    return socket.gethostname(), [p for p in paths if not Path(p).exists()]


def check_nodes(ray, paths: list[Path]) -> None:
    """Every live node with CPUs reads `paths` (absolute), or a PipelineError naming the first
    node and path that it cannot."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    wanted = [str(p) for p in paths]
    probe = ray.remote(num_cpus=0)(_missing)
    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    answers = ray.get(
        [
            probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(wanted)
            for n in nodes
        ]
    )
    for host, missing in answers:
        if missing:
            raise PipelineError(
                f"cluster: node {host} cannot read {missing[0]}; with cluster.engine: ray every "
                f"node must see the project at the same path (a shared filesystem, "
                f"docs/scaling.md)"
            )


def only_granted_gpus(gpus: float) -> None:
    """In a Ray worker: with no GPU granted (cluster.gpus_per_worker: 0), hide the node's GPUs,
    which Ray leaves visible, so torch stays on the CPUs Ray counted. Before torch touches CUDA."""
    if not gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def one_line(exc: Exception, what: str) -> PipelineError:
    """A failure on Ray as one line: a worker's own PipelineError as it is (a RayTaskError
    wraps it as `cause`; Ray Train's WorkerGroupError holds each worker's in
    `worker_failures`), anything else named with `what`."""
    failures = list(getattr(exc, "worker_failures", {}).values())
    for cause in [exc, getattr(exc, "cause", None), *failures]:
        cause = getattr(cause, "cause", None) or cause  # a worker's RayTaskError
        if isinstance(cause, PipelineError):
            return PipelineError(str(cause))
    cause = failures[0] if failures else exc  # a worker's own error, not the group's summary
    cause = getattr(cause, "cause", None) or cause
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    return PipelineError(f"{what} failed: {type(cause).__name__}: {first}")


class _Predictor:
    """A Ray Data worker: the ensemble loaded once; each item is one batch start."""

    def __init__(
        self,
        model: str,
        images: str,
        rows: np.ndarray,
        batch_size: int,
        options: dict,
        threads: int,
        gpus: float,
    ):
        only_granted_gpus(gpus)
        import torch

        from pipeline.core.device import pick_device
        from pipeline.core.io import read_array
        from pipeline.training.ensemble import load_ensemble

        torch.set_num_threads(threads)
        self.ensemble = load_ensemble(Path(model))
        self.packed = read_array(Path(images))
        self.rows, self.batch_size, self.options = rows, batch_size, options
        self.device = pick_device()

    def __call__(self, batch: dict) -> dict:
        from pipeline.core.io import Rows

        out: dict[str, list] = {}
        for start in batch["start"]:
            mine = self.rows[start : start + self.batch_size]
            result = self.ensemble.predict(
                Rows(self.packed, mine), self.device, batch_size=self.batch_size, **self.options
            )
            parts = result if isinstance(result, tuple) else (result,)
            names = ["probs"] + [k for k in ("members", "embeddings") if self.options[k]]
            for name, part in zip(names, parts):
                if name == "members":  # (M, n, K) -> one row per image
                    part = np.moveaxis(part, 1, 0)
                out.setdefault(name, []).append(part)
        return {name: np.concatenate(parts) for name, parts in out.items()}


def predict_on_ray(
    cluster: ClusterConfig,
    model: Path,
    images: Path,
    rows: np.ndarray,
    *,
    batch_size: int,
    options: dict,
):
    """`predict_packed`'s result for `rows` of the packed folder `images`, predicted by
    cluster.workers Ray Data actors with the ensemble saved in `model`."""
    ray = connect(cluster)
    model, images = Path(model).resolve(), Path(images).resolve()  # the same on every node
    check_nodes(ray, [model, images])
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # results in input order
    context.enable_progress_bars = False
    starts = [{"start": s} for s in range(0, len(rows), batch_size)]
    log.info(
        "prediction: %d images on Ray, %d workers (%d batches of at most %d)",
        len(rows),
        cluster.workers,
        len(starts),
        batch_size,
    )
    dataset = ray.data.from_items(starts, override_num_blocks=len(starts)).map_batches(
        _Predictor,
        fn_constructor_args=(
            str(model),
            str(images),
            rows,
            batch_size,
            options,
            max(1, int(cluster.cpus_per_worker)),
            cluster.gpus_per_worker,
        ),
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cluster.workers),
        num_cpus=cluster.cpus_per_worker,
        num_gpus=cluster.gpus_per_worker,
    )
    collected: dict[str, list] = {}
    try:
        for part in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for name, values in part.items():
                collected.setdefault(name, []).append(values)
    except Exception as exc:
        raise one_line(exc, "prediction on Ray") from None
    out = [np.concatenate(collected["probs"])]
    if options["members"]:
        out.append(np.moveaxis(np.concatenate(collected["members"]), 0, 1))
    if options["embeddings"]:
        out.append(np.concatenate(collected["embeddings"]))
    return out[0] if len(out) == 1 else tuple(out)
