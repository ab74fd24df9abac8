"""DVC remote round trip: `dvc push` the demo's outputs, `dvc pull` them into a fresh clone."""

import shutil
import sys

import pytest

from .conftest import ROOT, dvc, sh, stages_ran, tree_hash

pytestmark = pytest.mark.slow


def test_push_then_pull_into_a_fresh_clone_restores_every_output(demo_repo, tmp_path, record):
    project = tmp_path / "project"
    shutil.copytree(demo_repo[0], project, symlinks=True)
    dvc(project, "repro")  # whatever earlier tests left, bring it up to date first
    # The repository's own remote setting, as a clone of it gets it: ../dvc-storage.
    shutil.copy(ROOT / ".dvc" / "config", project / ".dvc" / "config")
    remote = dvc(project, "remote", "list").stdout.split()
    assert remote[0] == "storage" and remote[1].endswith("dvc-storage")
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "a finished round")
    pushed = dvc(project, "push")
    assert (tmp_path / "dvc-storage").is_dir(), pushed.stdout

    clone = tmp_path / "clone"  # a sibling: the same ../dvc-storage
    sh(tmp_path, "git", "clone", "-q", str(project), str(clone))
    assert not (clone / "artifacts" / "rounds" / "r000" / "model").exists()
    dvc(clone, "pull")
    for folder in ("data", "artifacts"):
        assert tree_hash(clone / folder) == tree_hash(project / folder), folder
    assert "up to date" in dvc(clone, "status").stdout
    assert stages_ran(dvc(clone, "repro").stdout) == set()
    loaded = sh(
        clone,
        sys.executable,
        "-c",
        "from pipeline.train import load_ensemble; "
        "print(len(load_ensemble('artifacts/rounds/r001/model').models))",
    )
    assert int(loaded.stdout) >= 1
    record(
        "fault",
        "a fresh clone with nothing but git: `dvc pull` from the local remote",
        "every output and data file restored byte for byte; `dvc repro` has nothing to do",
    )
