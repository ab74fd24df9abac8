"""Fault injection: `dvc repro` killed (SIGKILL) inside random stages, then rerun to the end.

The interrupted project must end up exactly where an uninterrupted one does: `dvc status`
clean, the same metrics (CPU, same seed), and raw data untouched.
"""

import os
import random
import signal
import subprocess
import sys

import pytest

from .conftest import GIT_IDENTITY, demo_metrics, make_repo, sh, stages_ran, stale, tree_hash

pytestmark = pytest.mark.slow


def _kill_repro_during_stage(root, stage: int, delay: float) -> bool:
    """Start `dvc repro` and SIGKILL its whole process group `delay` seconds after its
    `stage`-th stage starts (counted without `audit`); True if it was killed. Kills land
    inside the pipeline on a fast machine and a slow one alike: no wall-time guess."""
    env = {**os.environ, **GIT_IDENTITY}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro"],
        cwd=root,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    started = 0
    for line in proc.stdout:
        if line.startswith("Running stage") and "'audit'" not in line:
            started += 1
            if started == stage:
                try:
                    proc.wait(timeout=delay)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return True
                break
    proc.stdout.close()
    proc.wait()
    return False


def test_repro_killed_at_random_moments_finishes_with_identical_results(
    demo_repo, tmp_path_factory, record
):
    expected = demo_repo[3]  # the same project, run once without faults

    faulty, raw_hash = make_repo(tmp_path_factory.mktemp("faulty"))
    rng = random.Random(20261128)
    kills = 0
    # 11 stages. An attempt finishes the stages before its chosen one, plus at most one that
    # completes within the delay (a stage spends longer than that importing torch), so the
    # first three attempts leave stages to kill in on any machine.
    for _ in range(4):
        kills += _kill_repro_during_stage(faulty, rng.randint(1, 3), rng.uniform(0.0, 1.0))
    assert kills >= 3, "the pipeline finished before the faults could be injected"
    final = sh(faulty, sys.executable, "-m", "dvc", "repro")
    assert (
        "summarize" in stages_ran(final.stdout)
        or (faulty / "artifacts/summary/metrics.json").is_file()
    )
    assert stale(faulty) == {}
    assert demo_metrics(faulty) == expected
    assert tree_hash(faulty / "data") == raw_hash
    record(
        "fault",
        "SIGKILL of `dvc repro` (its whole process group) at a random moment",
        "rerun finished; `dvc status` clean; metrics identical to an uninterrupted run; data/ unchanged",
        cases=kills,
    )
