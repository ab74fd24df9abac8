"""Fault injection: `dvc repro` killed (SIGKILL) at random moments, then rerun to the end.

The interrupted project must end up exactly where an uninterrupted one does: `dvc status`
clean, the same metrics (CPU, same seed), and raw data untouched.
"""

import os
import random
import signal
import subprocess
import sys

import pytest

from .conftest import GIT_IDENTITY, demo_metrics, make_repo, sh, stages_ran, tree_hash

pytestmark = pytest.mark.slow


def _kill_repro_after(root, seconds: float) -> bool:
    """Start `dvc repro`, SIGKILL its whole process group after `seconds`; True if it was killed."""
    env = {**os.environ, **GIT_IDENTITY}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro"],
        cwd=root,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        proc.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


def test_repro_killed_at_random_moments_finishes_with_identical_results(
    demo_repo, tmp_path_factory, record
):
    expected = demo_repo[3]  # the same project, run once without faults

    faulty, raw_hash = make_repo(tmp_path_factory.mktemp("faulty"))
    rng = random.Random(20261128)
    kills = 0
    for _ in range(4):
        kills += _kill_repro_after(faulty, rng.uniform(4, 30))
    assert kills >= 3, "the pipeline finished before the faults could be injected"
    final = sh(faulty, sys.executable, "-m", "dvc", "repro")
    assert (
        "summarize" in stages_ran(final.stdout)
        or (faulty / "artifacts/summary/metrics.json").is_file()
    )
    assert "up to date" in sh(faulty, sys.executable, "-m", "dvc", "status").stdout
    assert demo_metrics(faulty) == expected
    assert tree_hash(faulty / "data") == raw_hash
    record(
        "fault",
        "SIGKILL of `dvc repro` (its whole process group) at a random moment",
        "rerun finished; `dvc status` clean; metrics identical to an uninterrupted run; data/ unchanged",
        cases=kills,
    )
