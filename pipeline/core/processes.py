"""Several processes under torchrun: relaunching a command, and spreading work whose parts never
talk to each other (the clean stage's K-fold folds, blocks of images to predict).

The launching process writes a job folder, reruns `python -m pipeline <command> <job>` as N
processes under `torchrun --standalone` (on GPUs each takes cuda:LOCAL_RANK, pick_device), and
reads back what each wrote there; it alone writes the stage's outputs. The parts join no process
group: a process done with its share never waits in a collective for another (a fold can take
hours, past gloo's and NCCL's timeouts), and a model trained in one trains alone, as
`feed.current_shard()` is Shard() outside a group. A part's PipelineError comes back as the
launcher's own, one line.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from pipeline.core.errors import PipelineError

log = logging.getLogger(__name__)

STOP_SIGNALS = [getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")]


def launch(nproc: int, argv: list[str], what: str = "training") -> None:
    """Run `python -m pipeline <argv>` again as `nproc` processes under torchrun --standalone."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc_per_node={nproc}", "--module", "pipeline", *argv]
    )
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # workers say why
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        torchrun(args)
    except ChildFailedError:
        raise PipelineError(
            f"{what} under torchrun ({nproc} processes) failed: the first error above says why"
        ) from None
    finally:  # torchrun leaves its own handlers installed; this process may go on working
        if threading.current_thread() is threading.main_thread():
            for sig, handler in handlers.items():
                if handler is not None:
                    signal.signal(sig, handler)


def usable(nproc: int) -> int:
    """Processes to start for `nproc`: on GPUs one per device at most (each takes
    cuda:LOCAL_RANK), so more than the machine has is fewer, with a warning."""
    if not torch.cuda.is_available() or nproc <= torch.cuda.device_count():
        return nproc
    log.warning(
        "%d processes asked for, %d GPUs: using %d",
        nproc,
        torch.cuda.device_count(),
        torch.cuda.device_count(),
    )
    return torch.cuda.device_count()


@contextmanager
def job_folder(beside: Path | None = None) -> Iterator[Path]:
    """A fresh folder for the parts' inputs and results, beside `beside` (a stage's output:
    on its disk, not in a small /tmp) or else in the temp folder; removed afterwards."""
    if beside is None:
        job = Path(tempfile.mkdtemp(prefix=".pipeline.parts."))
    else:
        beside.parent.mkdir(parents=True, exist_ok=True)
        job = Path(tempfile.mkdtemp(prefix=f".{beside.name}.parts.", dir=beside.parent))
    try:
        yield job
    finally:
        shutil.rmtree(job, ignore_errors=True)


def spread(nproc: int, command: str, job: Path, what: str) -> None:
    """Run `python -m pipeline <command> <job>` as `nproc` processes, each running part_of(job).

    Each gets an equal share of this process's CPU threads (torchrun would give each one
    thread), unless OMP_NUM_THREADS says otherwise.
    """
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = saved or str(max(1, torch.get_num_threads() // nproc))
    log.info("%s: %d processes under torchrun", what, nproc)
    try:
        launch(nproc, [command, str(job)], what)
    except PipelineError:
        failed = sorted(job.glob("error-*.txt"))
        if failed:  # the lowest rank's: the parts run the same code on the same kind of input
            raise PipelineError(failed[0].read_text()) from None
        raise
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)


@contextmanager
def part_of(job: Path) -> Iterator[tuple[int, int]]:
    """In a process `spread` started: yields (rank, world). A PipelineError is left in the job
    folder for the launcher to report, and the process exits with status 1 without a word."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if rank > 0:
        logging.getLogger("pipeline").setLevel(logging.WARNING)  # one log, from the first
    try:
        yield rank, world
    except PipelineError as exc:
        (job / f"error-{rank:03d}.txt").write_text(str(exc))
        raise SystemExit(1) from None


def block(n: int, batch_size: int, rank: int, world: int) -> slice:
    """Rank `rank`'s contiguous share of n rows, in whole batches of batch_size from row 0: the
    batches one process would make, so every row is computed exactly as there."""
    batches = -(-n // batch_size)
    first, last = (batches * r // world for r in (rank, rank + 1))
    return slice(min(first * batch_size, n), min(last * batch_size, n))
