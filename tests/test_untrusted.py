"""A dataset from elsewhere cannot run code, copy secrets in or leave half a change: the name
rule (pipeline/core/names.py), init and add-pool on hostile folders (pipeline/data/intake.py), and
add-labels, add-pool and init interrupted at every copy."""

import os
import shutil
import stat
import subprocess
import sys
import zlib

import pandas as pd
import pytest
import yaml

from pipeline.core.errors import PipelineError
from pipeline.core.io import edit_yaml
from pipeline.core.names import RESERVED, check_name, class_name_problem, name_problem, printable
from pipeline.tools.answers import add_labels
from pipeline.tools.init import run as init_run
from pipeline.tools.pools import add_pool

from .conftest import ROOT, dvc, new_project, sh, stages_ran, tree_hash, write_photos

SECRET = b"-----BEGIN OPENSSH PRIVATE KEY----- not for the dataset"
BAD_POOL = "p$(touch PWNED)"


# --------------------------------------------------------------------------------------------
# The name rule


BAD_POOLS = [BAD_POOL, "Batch 2", "=cmd", "drop", "Keep", "a/b", "..", ".hidden", "", "x" * 65,
             "quote'", "semi;colon", "new\nline", "bad\udcff", "日本"]  # fmt: skip
BAD_CLASSES = ["=cmd", "+1", "-rf", "@sum", "drop", "Reject", "a/b", "a\\b", ".hidden", "",
               " padded", "tab\there", "bad\udcff", "x" * 65]  # fmt: skip


def test_pool_names_a_shell_or_a_path_could_misread_are_refused(record):
    for name in BAD_POOLS:
        assert name_problem(name), name
        with pytest.raises(PipelineError, match="is refused: "):
            check_name(name, "pool name")
    for name in ("pool_001", "Batch-2", "v1.2", "7"):
        assert check_name(name, "pool name") == name
    record("security", "pool names: shell syntax, spaces, separators, reserved words, control "
           "characters, non-UTF-8, non-ASCII", "refused with the rule", len(BAD_POOLS))  # fmt: skip


def test_class_names_a_spreadsheet_or_a_decision_file_could_misread_are_refused(record):
    for name in BAD_CLASSES:
        assert class_name_problem(name), name
        with pytest.raises(PipelineError, match="is refused: "):
            check_name(name, "class", rule=class_name_problem)
    for name in ("cat", "golden retriever", "日本", "zwei & drei", "<b>x", "n°7"):
        assert not class_name_problem(name), name  # people's class names; escaped where shown
    assert all(class_name_problem(w) and class_name_problem(w.upper()) for w in RESERVED)
    record("security", "class names: a leading `= + - @`, reserved words, separators, control "
           "characters, non-UTF-8", "refused with the rule", len(BAD_CLASSES))  # fmt: skip


def test_printable_escapes_what_a_line_or_a_csv_cell_cannot_hold():
    assert printable("bad\udcff.png") == "bad\\xff.png"
    assert printable("a\x00b\nc") == "a\\x00b\\x0ac"
    assert printable("été.png") == "été.png"


# --------------------------------------------------------------------------------------------
# A hostile source folder


def write_big_png(path, side=30_000):
    """A valid 1-bit PNG of side x side pixels in a few hundred KB: rows of zeros, deflated."""

    def chunk(kind, data):
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    header = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])
    packer, row = zlib.compressobj(9), bytes(1 + (side + 7) // 8)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def write_hostile(src, outside):
    """A folder with every trap a downloaded dataset can hold, beside good photos; returns the
    good images' count (labeled, pool)."""
    good = write_photos(src, 8)  # roof/, garden/, petals/, leaves/
    pool = write_photos(src / "unlabeled" / "pool_a", 3, seed=3, flat=True)
    for bad in (BAD_POOL, "Batch 2"):
        write_photos(src / "unlabeled" / bad, 2, seed=4, flat=True)
    for bad in ("=cmd", "drop"):
        write_photos(src / bad, 2, seed=5, flat=True)
    outside.mkdir()
    (outside / "id_rsa").write_bytes(SECRET)
    write_photos(outside / "photos", 2, seed=6, flat=True)
    os.symlink(outside / "id_rsa", src / "roof" / "key.png")  # a file link out of the source
    os.symlink(outside / "photos", src / "roof" / "more")  # a folder link inside a class
    os.symlink(outside / "photos", src / "linked")  # a class folder that is a link
    os.symlink(outside / "photos", src / "unlabeled" / "pool_link")  # a pool that is a link
    (src / "roof" / ".env").write_bytes(b"AWS_SECRET_ACCESS_KEY=" + SECRET)
    (src / "roof" / "notes.txt").write_text("not an image")
    os.mkfifo(src / "garden" / "pipe.png")  # a copy would block on it
    with open(os.path.join(os.fsencode(src / "petals"), b"old\xffzip.png"), "wb") as f:
        f.write((src / "petals" / "0.png").read_bytes())
    (src / "leaves" / "eps.png").write_text(
        "%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto showpage\n"
    )
    write_big_png(src / "leaves" / "huge.png")
    (src / "truth.csv").write_bytes(b"path,true_label\nlabeled/roof/0.png,roof\nx\x00.png,roof\n")
    return len(good) + 2, len(pool)  # + eps.png and huge.png: ingest quarantines them


@pytest.fixture
def project(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "overrides.csv").write_text("path,label\n")
    return tmp_path


def init(project, source, **kwargs):
    return init_run(
        source,
        data_dir=project / "data",
        params_path=project / "params.yaml",
        register=False,
        **kwargs,
    )


def files_holding(root, needle: bytes) -> list[str]:
    return [p for p, _ in tree_hash(root).items() if needle in _read(root / p)]


def _read(path) -> bytes:
    return path.read_bytes() if path.is_file() and not path.is_symlink() else b""


def test_init_takes_only_the_good_images_of_a_hostile_folder(project, tmp_path, record):
    labeled, pooled = write_hostile(tmp_path / "src", tmp_path / "outside")
    summary = init(project, tmp_path / "src")

    data = project / "data"
    assert sorted(summary["classes"]) == ["garden", "leaves", "petals", "roof"]
    assert sum(summary["classes"].values()) == labeled
    assert summary["pools"] == {"pool_a": pooled}
    assert yaml.safe_load((project / "params.yaml").read_text())["rounds"] == {
        "r001": {"pool": "pool_a", "previous": "r000"}
    }
    assert not files_holding(data, SECRET[:20]), "a secret was copied into data/"
    assert not any(os.path.islink(p) for p, _, _ in os.walk(data))
    assert not list(data.rglob(".env")) and not list(data.rglob("*.txt"))
    skipped = "\n".join(summary["skipped"])
    expected = {
        BAD_POOL: "--pool NAME='",
        "Batch 2": "--pool NAME=",
        "=cmd": "not a class name",
        "drop": "decision files use",
        "key.png": "symbolic link",
        "more": "symbolic link",
        "linked": "symbolic link",
        "pool_link": "symbolic link",
        ".env": "hidden file",
        "notes.txt": "not an image file",
        "pipe.png": "not a regular file",
        "old\\xffzip.png": "not valid UTF-8",
    }
    for name, why in expected.items():
        lines = [line for line in summary["skipped"] if line.split(": ")[0].endswith("/" + name)]
        assert len(lines) == 1 and why in lines[0], f"{name}: {lines or skipped}"
    assert not (project / "PWNED").exists() and not (tmp_path / "PWNED").exists()
    record(
        "security",
        "init from a hostile folder: `$(...)` and spaced pool names, classes "
        "`=cmd` and `drop`, links to a secret file and to folders outside, `.env`, a FIFO, "
        "a non-UTF-8 name",
        "each skipped with its reason; the good images copied; nothing from outside the source",
        len(expected),
    )


def test_init_and_add_pool_refuse_a_source_that_holds_the_project(project, tmp_path):
    write_photos(project / "data" / "labeled", 2)
    for command in (
        lambda: init(project, project),
        lambda: add_pool(
            project, data_dir=project / "data", params_path=project / "params.yaml", register=False
        ),
    ):
        with pytest.raises(PipelineError, match="contains the project's"):
            command()


def test_add_pool_copies_image_files_only_and_never_follows_a_link(project, tmp_path):
    src = tmp_path / "incoming"
    write_photos(src, 2, flat=True)
    (tmp_path / "secret").write_bytes(SECRET)
    os.symlink(tmp_path / "secret", src / "x.png")
    os.symlink(tmp_path, src / "up")  # a folder link: would copy the project into itself
    (src / ".env").write_bytes(SECRET)
    result = add_pool(
        src, data_dir=project / "data", params_path=project / "params.yaml", register=False
    )
    pool = project / "data" / "unlabeled" / result["pool"]
    assert sorted(p.name for p in pool.iterdir()) == sorted(p.name for p in src.glob("*_*"))
    assert not files_holding(pool, SECRET[:20])
    assert len(result["skipped"]) == 3


def test_a_pool_placed_by_hand_with_a_link_out_is_refused(project, tmp_path):
    pool = project / "data" / "unlabeled" / "by_hand"
    write_photos(pool, 1, flat=True)
    (tmp_path / "secret").write_bytes(SECRET)
    os.symlink(tmp_path / "secret", pool / "x.png")  # `dvc add` would cache it and push it
    with pytest.raises(PipelineError, match="holds links"):
        add_pool(
            pool, data_dir=project / "data", params_path=project / "params.yaml", register=False
        )


# --------------------------------------------------------------------------------------------
# Interrupted at every copy: all or nothing


class Interrupt:
    """shutil.copy2 that raises KeyboardInterrupt (Ctrl-C) at its `at`-th call."""

    def __init__(self, at):
        self.at, self.calls, self.copy = at, 0, shutil.copy2

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.copy(*args, **kwargs)


def interrupt_each_copy(monkeypatch, command, roots, files) -> int:
    """Run `command` interrupted at copy 1, 2, ... until it finishes; every interrupted run
    must leave `roots` and `files` byte for byte as they were. Returns the copies made."""
    before = {root: tree_hash(root) for root in roots}
    before_files = {path: path.read_bytes() for path in files}
    at = 1
    while True:
        fault = Interrupt(at)
        monkeypatch.setattr(shutil, "copy2", fault)
        try:
            command()
        except KeyboardInterrupt:
            for root in roots:
                assert tree_hash(root) == before[root], f"copy {at} left a change in {root}"
            for path, data in before_files.items():
                assert path.read_bytes() == data, f"copy {at} left {path} changed"
            at += 1
            continue
        finally:
            monkeypatch.setattr(shutil, "copy2", fault.copy)
        return at - 1


def test_add_pool_interrupted_at_each_copy_leaves_data_as_before(project, tmp_path, record):
    write_photos(tmp_path / "incoming", 1, flat=True)
    data = project / "data"
    copies = interrupt_each_copy(
        monkeypatch := pytest.MonkeyPatch(),
        lambda: add_pool(
            tmp_path / "incoming",
            data_dir=data,
            params_path=project / "params.yaml",
            register=False,
        ),
        [data],
        [project / "params.yaml"],
    )
    monkeypatch.undo()
    assert copies == 4 and len(list((data / "unlabeled" / "pool_003").iterdir())) == 4
    assert "pool: pool_003" in (project / "params.yaml").read_text()
    record(
        "fault",
        "add-pool interrupted (Ctrl-C) at each copy",
        "data/ and params.yaml as before; the rerun finishes",
        copies,
    )


def test_init_interrupted_at_each_copy_or_after_the_swap_leaves_everything_as_before(
    project, tmp_path, monkeypatch, record
):
    write_photos(tmp_path / "old", 2)
    init(project, tmp_path / "old")
    write_photos(tmp_path / "new", 1)
    copies = interrupt_each_copy(
        monkeypatch,
        lambda: init(project, tmp_path / "new", force=True),
        [project],
        [],
    )
    assert copies == 4
    aside = [p for p in project.iterdir() if p.name.startswith("data-before-init-")]
    assert len(aside) == 1 and len(list((aside[0] / "labeled").rglob("*.*"))) == 8
    record(
        "fault",
        "init --force interrupted (Ctrl-C) at each copy",
        "the project byte for byte as before; the rerun finishes",
        copies,
    )


def test_init_stopped_after_the_swap_puts_the_old_dataset_back(project, tmp_path, monkeypatch):
    write_photos(tmp_path / "old", 2)
    init(project, tmp_path / "old")
    write_photos(tmp_path / "new", 1)
    before = tree_hash(project)

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(
        "pipeline.tools.init_params.write_rounds", stop
    )  # after data/ and half of params
    with pytest.raises(KeyboardInterrupt):
        init(project, tmp_path / "new", force=True)
    assert tree_hash(project) == before


def test_add_labels_interrupted_at_each_copy_leaves_data_as_before(tmp_path, record):
    data = tmp_path / "data"
    write_photos(data / "labeled", 2)
    pool = write_photos(data / "unlabeled" / "pool_001", 1, seed=7, flat=True)
    answers = tmp_path / "answers.csv"
    rows = [f"{p.relative_to(data).as_posix()},{p.name.split('_')[0]}" for p in pool]
    answers.write_text("path,label\n" + "\n".join(rows) + "\n")
    monkeypatch = pytest.MonkeyPatch()
    copies = interrupt_each_copy(
        monkeypatch, lambda: add_labels(answers, data_dir=data, register=False), [data], []
    )
    monkeypatch.undo()
    assert copies == 4
    assert len(pd.read_csv(data / "added_labels.csv")) == 4
    record(
        "fault",
        "add-labels interrupted (Ctrl-C) at each copy",
        "data/ as before; the rerun finishes",
        copies,
    )


def test_add_labels_rerun_after_a_kill_takes_over_the_copies_left_behind(tmp_path):
    data = tmp_path / "data"
    write_photos(data / "labeled", 2)
    pool = write_photos(data / "unlabeled" / "pool_001", 1, seed=7, flat=True)
    answers = tmp_path / "answers.csv"
    rows = [(p, p.name.split("_")[0]) for p in pool]
    answers.write_text(
        "path,label\n" + "".join(f"{p.relative_to(data).as_posix()},{label}\n" for p, label in rows)
    )
    for p, label in rows[:2]:  # what a SIGKILL after two copies leaves: copies, no log
        target = data / "labeled" / label / "added" / "pool_001" / p.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, target)
    assert add_labels(answers, data_dir=data, register=False)["added"] == 4
    assert len(pd.read_csv(data / "added_labels.csv")) == 4
    with pytest.raises(PipelineError, match="already labeled"):  # a real second answer
        add_labels(answers, data_dir=data, register=False)


# --------------------------------------------------------------------------------------------
# Smaller points


def test_rewritten_files_keep_their_permissions(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("base:\n  seed: 0\n")
    os.chmod(path, 0o644)
    edit_yaml(path, lambda doc: doc["base"].__setitem__("seed", 1))
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # mkstemp's 0600 used to stick


def test_a_bad_option_is_a_usage_error_without_a_traceback():
    for args in (["ingest", "--bogus"], ["add-pool"], ["ingest", "--data-dir"]):
        result = subprocess.run(
            [sys.executable, "-m", "pipeline", *args], cwd=ROOT, capture_output=True, text=True
        )
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("Error: ")


# --------------------------------------------------------------------------------------------
# The whole way: init + dvc repro on the hostile folder


@pytest.mark.slow
def test_init_and_dvc_repro_on_a_hostile_folder_run_nothing_from_it(tmp_path, record):
    root = new_project(tmp_path / "project")
    (root / "data").mkdir()
    (root / "data" / "overrides.csv").write_text("path,label\n")
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "project")
    labeled, pooled = write_hostile(tmp_path / "src", tmp_path / "outside")

    out = sh(root, sys.executable, "-m", "pipeline", "init", str(tmp_path / "src"))
    assert "Traceback" not in out.stderr and "skipped" in out.stdout
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "hostile data")
    repro = dvc(root, "repro")
    assert "Traceback" not in repro.stdout + repro.stderr
    assert {"ingest", "clean", "train", "pseudolabel@r001", "summarize"} <= stages_ran(repro.stdout)
    assert not list(tmp_path.rglob("PWNED"))

    quarantine = pd.read_csv(root / "artifacts/ingest/quarantine.csv", dtype=str)
    reasons = dict(zip(quarantine["path"], quarantine["reason"]))
    assert "EPS" in reasons["labeled/leaves/eps.png"]
    assert "pixels" in reasons["labeled/leaves/huge.png"]
    manifest = pd.read_csv(root / "artifacts/ingest/manifest.csv", dtype=str)
    assert len(manifest[manifest["split"] != "pool"]) == labeled - 2
    assert (root / "artifacts/reports/r001/evaluate/report.html").is_file()
    assert not files_holding(root / "data", SECRET[:20])

    write_photos(tmp_path / "second", 2, seed=9)  # a new dataset over this one
    sh(root, sys.executable, "-m", "pipeline", "init", "--force", str(tmp_path / "second"))
    status = sh(root, "git", "status", "--porcelain", "--untracked-files=all").stdout
    outside_data = [
        line
        for line in status.splitlines()
        if not line[3:].startswith("data/") and line[3:] not in ("params.yaml", "dvc.lock")
    ]
    assert not outside_data, outside_data
    record(
        "security",
        "init + dvc repro on the hostile folder (EPS as PNG, a 30,000 x 30,000 "
        "PNG of a few hundred KB, a NUL in truth.csv, and the traps above), then init --force",
        "no command from the data ran; bad files quarantined with the reason; the good "
        "images trained; git status shows no image outside data/",
    )
