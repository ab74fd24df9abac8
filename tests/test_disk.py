"""Full disks and read-only folders: one clear error naming the path, and no partial outputs.

Each test mounts a real, tiny tmpfs (root only: CI runs as root) and runs the stage's command
line in a subprocess, so the error the user would see is the one asserted.
"""

import os
import subprocess
import sys
from contextlib import contextmanager

import pytest

from pipeline.core.config import load_params

from .conftest import ROOT, train_table, tree_hash, val_table, write_digits, write_params

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="mounting a small tmpfs needs root (CI runs as root)"
)


@contextmanager
def tmpfs(path, size: str, *, read_only: bool = False):
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)])
    if mounted.returncode != 0:
        pytest.skip("this machine does not allow mounting a tmpfs")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def remount_read_only(path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


def fill(path) -> None:
    """Write into `path` until its file system is full."""
    fd = os.open(path / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)


def pipeline_cli(cwd, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True, env=env
    )


def assert_one_line_error(result, *expected: str) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: cannot write"), result.stderr
    for text in expected:
        assert text in line
    return line


def files_under(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def digits_project(project):
    write_digits(project / "data", {0: "zero", 1: "one", 2: "two"}, 40, test_per_class=10)
    write_params(project, {"base": {"image_size": 16}})
    return project


def test_ingest_onto_a_full_disk_names_the_path_and_leaves_nothing(digits_project, record):
    with tmpfs(digits_project / "small", "16k") as disk:
        result = pipeline_cli(digits_project, "ingest", "--out", str(disk / "ingest"))
        assert_one_line_error(result, str(disk / "ingest"), "No space left on device")
        assert files_under(disk) == []
    record(
        "fault",
        "disk full while ingest writes its packed images",
        "one error line, nothing left behind",
    )


def test_a_full_disk_keeps_the_previous_outputs_intact(digits_project, record):
    with tmpfs(digits_project / "small", "1m") as disk:
        out = disk / "ingest"
        assert pipeline_cli(digits_project, "ingest", "--out", str(out)).returncode == 0
        before = tree_hash(out)
        write_digits(digits_project / "data", {3: "three"}, 40)  # new data: ingest must rewrite
        fill(disk)
        result = pipeline_cli(digits_project, "ingest", "--out", str(out))
        assert_one_line_error(result, str(out), "No space left on device")
        assert tree_hash(out) == before
        assert files_under(disk) == ["filler", *(f"ingest/{name}" for name in sorted(before))]
    record(
        "fault",
        "disk full while ingest rewrites earlier outputs",
        "one error line, earlier outputs unchanged",
    )


def test_ingest_into_a_read_only_folder_names_the_path(digits_project, record):
    with tmpfs(digits_project / "ro", "1m") as disk:
        remount_read_only(disk)
        result = pipeline_cli(digits_project, "ingest", "--out", str(disk / "ingest"))
        assert_one_line_error(result, str(disk / "ingest"), "Read-only file system")
    record("fault", "read-only output folder (ingest)", "one error line naming the path")


@pytest.mark.parametrize("problem", ["full", "read-only"])
def test_train_onto_a_full_or_read_only_disk_names_the_path(ingested, project, problem, record):
    from pipeline.stages import augment

    params = load_params(project / "params.yaml")
    table = train_table(ingested)
    augment.run(table, ingested / "images", ingested / "classes.json", project / "augment", params)
    with tmpfs(project / "small", "8k") as disk:
        if problem == "read-only":
            remount_read_only(disk)
        result = pipeline_cli(
            project,
            "train",
            "--table", str(table),
            "--val", str(val_table(table)),
            "--augment", str(project / "augment"),
            "--model", str(disk / "model"),
            "--report", str(disk / "report"),
            "--live", str(disk / "live"),
        )  # fmt: skip
        reason = "No space left on device" if problem == "full" else "Read-only file system"
        assert_one_line_error(result, str(disk), reason)
        assert files_under(disk) == []
    record(
        "fault",
        f"{problem} disk under the train stage's outputs",
        "one error line naming the path, nothing left behind",
    )
