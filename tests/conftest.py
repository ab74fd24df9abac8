"""Shared fixtures: a tiny real image set (scikit-learn digits) with known flipped labels."""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from sklearn.datasets import load_digits, load_sample_images

from pipeline.core.config import load_params

ROOT = Path(__file__).resolve().parents[1]

# The tests train tiny models, where torch's default of one thread per core gains little and,
# on a shared 2-core machine, oversubscribes the cores: a conv step ran 4x slower with 2 threads
# than with 1 beside one other busy process. Subprocesses (dvc repro, torchrun) inherit it; a
# value set by the caller wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# No test reaches the Hugging Face hub, and none finds weights a developer cached: the cache is
# an empty folder of this test session's (set before anything imports huggingface_hub).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="pipeline-tests-hf-")
atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)

# Small and fast, but the same code paths as the demo.
FAST = {
    "base": {"image_size": 8},
    "clean": {"folds": 3, "epochs": 8, "min_steps": 0, "batch_size": 32, "embedding_steps": 60},
    "train": {
        "epochs": 4,
        "min_steps": 0,
        "batch_size": 32,
        "model": {"width": 8, "blocks": [1, 1]},
        "top_k": 2,
    },
    "augment": {"preview_rows": 3, "preview_copies": 2},
}


def deep_update(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = deep_update(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def write_params(folder: Path, extra: dict | None = None) -> Path:
    """params.yaml = the project's, made fast, plus `extra`."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw = deep_update(deep_update(raw, FAST), extra or {})
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def write_digits(
    data_dir: Path,
    names: dict[int, str],
    per_class: int,
    *,
    flip: float = 0.0,
    test_per_class: int = 0,
    seed: int = 0,
) -> dict[str, str]:
    """Write digits as data/labeled/<name>/ (+ data/test/); returns {path: true class name}.

    `names` maps a digit to its class name, so tests can use names whose orders differ.
    A `flip` share of labeled images is written under a wrong class.
    """
    digits = load_digits()
    rng = np.random.default_rng(seed)
    digit_ids = sorted(names)
    truth = {}
    for split, count in (("labeled", per_class), ("test", test_per_class)):
        for digit in digit_ids:
            pool = np.flatnonzero(digits.target == digit)
            start = 0 if split == "labeled" else per_class
            for i in pool[start : start + count]:
                given = digit
                if split == "labeled" and rng.random() < flip:
                    given = rng.choice([d for d in digit_ids if d != digit])
                rel = f"{split}/{names[given]}/img_{i:04d}.png"
                path = data_dir / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.clip(digits.images[i] * 16, 0, 255).astype(np.uint8)).save(path)
                truth[rel] = names[digit]
    return truth


# Regions of the two colour photographs scikit-learn ships (china.jpg, flower.jpg), as
# (photo, top, bottom, left, right) fractions: crops of one region form a class.
REGIONS = {
    "roof": (0, 0.0, 0.35, 0.0, 1.0),
    "garden": (0, 0.6, 1.0, 0.0, 1.0),
    "petals": (1, 0.2, 0.8, 0.25, 0.75),
    "leaves": (1, 0.0, 0.3, 0.0, 0.4),
}


def write_photos(folder, per_class, *, seed=0, flat=False, split=""):
    """Random crops of real colour photos, 40-120 px, as JPEG and PNG; returns the paths."""
    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    paths = []
    for name, (index, top, bottom, left, right) in REGIONS.items():
        photo = photos[index]
        h, w = photo.shape[:2]
        y0, y1, x0, x1 = int(top * h), int(bottom * h), int(left * w), int(right * w)
        for i in range(per_class):
            side = int(rng.integers(40, min(y1 - y0, x1 - x0, 120)))
            y, x = rng.integers(y0, y1 - side), rng.integers(x0, x1 - side)
            crop = Image.fromarray(photo[y : y + side, x : x + side])
            crop = crop.resize((side, int(side * rng.uniform(0.8, 1.2))))
            target = folder / (f"{name}_{i}" if flat else f"{name}/{split}{i}")
            target.parent.mkdir(parents=True, exist_ok=True)
            suffix = ".png" if i % 3 == 0 else ".jpg"
            crop.save(target.with_suffix(suffix))
            paths.append(target.with_suffix(suffix))
    return paths


def write_truth(data_dir: Path, truth: dict[str, str]) -> None:
    lines = ["path,true_label"] + [f"{p},{t}" for p, t in truth.items()]
    (data_dir / "truth.csv").write_text("\n".join(lines) + "\n")


def tree_hash(root: Path) -> dict[str, str]:
    """Content hash of every file (and link target) under root."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                out[key] = "link:" + os.readlink(path)
            elif not path.is_file():  # a FIFO would block a read
                out[key] = f"special:{path.stat().st_mode}"
            else:
                out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A work folder with fast params.yaml; tests chdir into it."""
    write_params(tmp_path)
    old = Path.cwd()
    os.chdir(tmp_path)
    yield tmp_path
    os.chdir(old)


@pytest.fixture
def fast_params(project: Path):
    return load_params(project / "params.yaml")


@contextlib.contextmanager
def review_server(cwd: Path):
    """`python -m pipeline review --port 0` in cwd: yields (base URL, token), stops it after."""
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "review", "--port", "0"],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()  # blocks until the server prints its address
        match = re.search(r"(http://127\.0\.0\.1:\d+)/\?token=(\S+)", line)
        assert match, (line, process.stderr.read() if process.poll() is not None else "")
        yield match.group(1), match.group(2)
    finally:
        process.terminate()
        process.wait(timeout=60)


CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip


def relabel_then_reject(page, label: str) -> dict:
    """On the review page: relabel the first training tile to `label`, then reject the first
    pseudo-label. Returns their paths and the status line and message after each click."""
    seen = {}
    issue = page.locator(".tile[data-kind='train']").first
    seen["relabeled"] = issue.locator("input[name='path']").get_attribute("value")
    issue.locator("select").select_option(label)
    issue.locator("button[value='relabel']").click()
    page.wait_for_selector("#message")
    seen["status_after_relabel"] = page.locator("#status").inner_text()
    pseudo = page.locator(".tile[data-kind='pseudo']").first
    seen["rejected"] = pseudo.locator("input[name='path']").get_attribute("value")
    pseudo.locator("button[value='reject']").click()
    page.wait_for_selector("#message")
    seen["status_after_reject"] = page.locator("#status").inner_text()
    seen["message"] = page.locator("#message").inner_text()
    return seen


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def ingested(project: Path) -> Path:
    """Ingest outputs for 3 digit classes (30 labeled, 10 test each) under project/artifacts."""
    return ingest_digits(project)


def ingest_digits(root: Path) -> Path:
    """3 digit classes (30 labeled, 10 test each) in root/data, ingested with root/params.yaml
    into root/artifacts/ingest (returned)."""
    from pipeline.stages import ingest

    data = root / "data"
    truth = write_digits(data, {0: "zero", 1: "one", 2: "two"}, 30, test_per_class=10)
    write_truth(data, truth)
    ingest.run(data, root / "artifacts" / "ingest", load_params(root / "params.yaml"))
    return root / "artifacts" / "ingest"


def train_table(ingest_dir: Path) -> Path:
    """The ingest manifest's training rows split as clean splits them, without cleaning:
    train.csv, and val.csv beside it (every validation row scored). Returns train.csv."""
    import pandas as pd

    from pipeline.data.inputs import stratified_holdout

    manifest = pd.read_csv(ingest_dir / "manifest.csv", dtype=str, keep_default_na=False)
    rows = manifest[manifest["split"] == "train"].assign(scored="True")
    is_val = stratified_holdout(rows["label"], 0.2, 0, minimum=5)
    path = ingest_dir.parent / "train.csv"
    rows[~is_val].to_csv(path, index=False)
    rows[is_val].to_csv(val_table(path), index=False)
    return path


def val_table(table: Path) -> Path:
    return table.with_name("val.csv")


def augment_and_train(root: Path, ingest_dir: Path, table: Path, params) -> Path:
    """The augment and train stages under root (root/augment, root/model, ...); returns the model."""
    from pipeline.stages import augment, train

    images, classes = ingest_dir / "images", ingest_dir / "classes.json"
    augment.run(table, images, classes, root / "augment", params)
    train.run(
        table_path=table,
        val_path=val_table(table),
        images_path=images,
        classes_path=classes,
        augment_dir=root / "augment",
        pseudo_dir=None,
        model_dir=root / "model",
        report_dir=root / "train",
        live_dir=root / "live",
        state_dir=root / ".state",
        params=params,
    )
    return root / "model"


def write_pool(pool: Path, start: int, stop: int) -> None:
    """Digits 0-2 that write_digits' sets do not hold (rows start:stop of those digits in
    scikit-learn's order) as pool PNGs."""
    digits = load_digits()
    pool.mkdir(parents=True, exist_ok=True)
    for i in np.flatnonzero(digits.target < 3)[start:stop]:
        image = (digits.images[i] * 16).clip(0, 255).astype(np.uint8)
        Image.fromarray(image).save(pool / f"p{i}.png")


def run_pool_round(root: Path, params, *, cleaned: bool, pseudo_params=None) -> Path:
    """The stages of one pool round under root/artifacts, laid out as `dvc repro` writes them:
    ingest and clean of root/data, r000 trained on clean's rows (cleaned) or on the uncleaned
    split (train_table), the empty set, then pseudolabel@r001 over data/unlabeled/pool_001 with
    `pseudo_params` (default: params). Returns r000's model folder."""
    from pipeline.stages import clean, ingest, pseudolabel

    data, art = root / "data", root / "artifacts"
    ingest.run(data, art / "ingest", params)
    clean.run(art / "ingest", data, art / "clean", params)
    table = art / "clean" / "train.csv" if cleaned else train_table(art / "ingest")
    model = augment_and_train(art / "rounds" / "r000", art / "ingest", table, params)
    pseudolabel.init_pseudo(art / "rounds" / "r000" / "pseudo", art / "ingest" / "images")
    pseudolabel.run(
        round_name="r001",
        pool="pool_001",
        data_dir=data,
        model_dir=model,
        ingest_dir=art / "ingest",
        pseudo_in=art / "rounds" / "r000" / "pseudo",
        out_dir=art / "rounds" / "r001" / "pseudo",
        report_dir=art / "reports" / "r001" / "pseudolabel",
        params=pseudo_params or params,
    )
    return model


# --------------------------------------------------------------------------------------------
# A real project: git + DVC + the demo data, for the end-to-end tests

# demo-data writes the demo's budgets into train.min_steps, clean.min_steps and
# clean.embedding_steps: these keep the end-to-end project short, on half the digits labeled (a few steps on the quick start's tenth
# would train nothing worth pseudo-labeling with)
E2E = {
    "demo": {"labeled_fraction": 0.5, "train_min_steps": 0, "clean_min_steps": 0},
    "clean": {"folds": 3, "epochs": 4, "min_steps": 0},
    "train": {"epochs": 4, "min_steps": 0},
}


def new_project(root: Path) -> Path:
    """A git + DVC project at root with this checkout's code and dvc.yaml, params.yaml made
    short (E2E) and no rounds, as a user has it before `init` brings their data."""
    root.mkdir()
    for name in ("pipeline", "dvc.yaml", ".gitignore"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / name)
    raw = deep_update(yaml.safe_load((ROOT / "params.yaml").read_text()), E2E)
    raw["rounds"] = {}
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    sh(root, "git", "init", "-q")
    dvc(root, "init", "-q")
    return root


GIT_IDENTITY = {
    f"GIT_{who}_{what}": value
    for who in ("AUTHOR", "COMMITTER")
    for what, value in (("NAME", "pipeline tests"), ("EMAIL", "tests@example.invalid"))
}


# The stages' own command line, one CPU thread a process: training's float rounding depends on
# the thread count, so runs compared number for number run at the same threads
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def pipeline_cli(cwd: Path, command: str) -> subprocess.CompletedProcess:
    """`python -m pipeline <command>` in cwd, one thread per process; it must succeed."""
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", *command.split()],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=ONE_THREAD,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def sh(cwd, *args, check=True):
    env = {**os.environ, **GIT_IDENTITY}
    result = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, env=env)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def dvc(cwd, *args, check=True):
    return sh(cwd, sys.executable, "-m", "dvc", *args, check=check)


def stages_ran(output: str) -> set[str]:
    """Stages `dvc repro` ran, less `audit`: it runs on every repro by design (dvc.yaml)."""
    ran = {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}
    return ran - {"audit"}


def stale(root) -> dict:
    """`dvc status --json`, less `audit`'s standing "always changed"."""
    status = json.loads(dvc(root, "status", "--json").stdout or "{}")
    if status.get("audit") == ["always changed"]:
        del status["audit"]
    return status


def make_repo(root: Path) -> tuple[Path, dict]:
    """A git + DVC project with the demo data written; returns (root, hash of data/)."""
    for name in ("pipeline", "dvc.yaml", ".gitignore", "data"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / name)
    shutil.rmtree(root / "pipeline" / "__pycache__", ignore_errors=True)
    raw = deep_update(yaml.safe_load((ROOT / "params.yaml").read_text()), E2E)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    sh(root, "git", "init", "-q")
    dvc(root, "init", "-q")
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "project")
    sh(root, sys.executable, "-m", "pipeline", "demo-data")
    return root, tree_hash(root / "data")


DEMO_METRICS = [
    "artifacts/ingest/metrics.json",
    "artifacts/clean/metrics.json",
    "artifacts/reports/r000/evaluate/metrics.json",
    "artifacts/reports/r001/evaluate/metrics.json",
    "artifacts/reports/r002/evaluate/metrics.json",
    "artifacts/reports/r001/pseudolabel/metrics.json",
    "artifacts/reports/r002/pseudolabel/metrics.json",
    "artifacts/summary/metrics.json",
]


def demo_metrics(root: Path) -> dict:
    return {name: json.loads((root / name).read_text()) for name in DEMO_METRICS}


@pytest.fixture(scope="session")
def demo_repo(tmp_path_factory):
    """The demo project after its first `dvc repro`: (root, repro output, data hash, metrics)."""
    root, raw_hash = make_repo(tmp_path_factory.mktemp("repo"))
    first = dvc(root, "repro")
    return root, first.stdout, raw_hash, demo_metrics(root)


S3_BUCKET, S3_REGION = "dvc-tests", "us-east-1"


@pytest.fixture
def s3_endpoint(tmp_path, monkeypatch):
    """A real S3 endpoint: moto's server (as DVC's own tests use) in this process on a free
    127.0.0.1 port, S3_BUCKET created, dummy credentials in the environment that `dvc`
    subprocesses inherit and no ~/.aws read. Yields (endpoint URL, keys() -> stored keys)."""
    pytest.importorskip("dvc_s3", reason="needs the s3 extra: pip install -e '.[dev]'")
    moto_server = pytest.importorskip("moto.server", reason="needs moto[server] (dev extra)")
    import boto3

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
    }.items():
        monkeypatch.setenv(name, value)
    werkzeug_log = logging.getLogger("werkzeug")  # one line per request otherwise
    old_level = werkzeug_log.level
    werkzeug_log.setLevel(logging.WARNING)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        client = boto3.client("s3", endpoint_url=url, region_name=S3_REGION)
        client.create_bucket(Bucket=S3_BUCKET)

        def keys() -> list[str]:
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET)
            return [item["Key"] for page in pages for item in page.get("Contents", [])]

        yield url, keys
    finally:
        server.stop()
        werkzeug_log.setLevel(old_level)


# --------------------------------------------------------------------------------------------
# The reliability record: tests that try faults and bad input report what they tried, and a
# full run of the suite writes docs/reliability.md from those reports.

RECORD_PATH = ROOT / "docs" / "reliability.md"
_record: dict[tuple[str, str], dict] = {}


@pytest.fixture
def record(request):
    """record(kind, what, outcome, cases=1): one line of the reliability record.

    Calls with the same kind and `what` add up, counted by outcome. Call it after the test's
    assertions: the record is only written when every test passed.
    """
    entries = []

    def add(kind: str, what: str, outcome: str, cases: int = 1) -> None:
        entries.append((kind, what, outcome, cases))

    yield add
    test = request.node.nodeid.split("[")[0]
    for kind, what, outcome, cases in entries:
        line = _record.setdefault((kind, what), {"outcomes": {}, "tests": set()})
        line["outcomes"][outcome] = line["outcomes"].get(outcome, 0) + cases
        line["tests"].add(test)


def pytest_addoption(parser):
    parser.addoption(
        "--slow",
        action="store_true",
        help="also run the slow tests (whole `dvc repro` runs, kills, torchrun, the browser, "
        "the DVC queue): what .ci/run runs",
    )
    parser.addoption(
        "--write-record",
        action="store_true",
        help="write docs/reliability.md from what the fault and bad-input tests tried "
        "(with --slow, on a run of the whole suite that passes)",
    )


def pytest_collection_modifyitems(config, items):
    """Without --slow (or an explicit -m), the slow tests are left out: the default run is
    the fast feedback loop."""
    if config.getoption("--slow") or config.option.markexpr:
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


def pytest_sessionfinish(session, exitstatus):
    """Write the record when asked (--write-record), and only from a run of the whole suite
    (--slow; no -k, -m or chosen files)."""
    config = session.config
    whole = (
        config.getoption("--write-record")
        and config.getoption("--slow")
        and config.args_source == pytest.Config.ArgsSource.TESTPATHS
        and not config.option.keyword
        and not config.option.markexpr
        and not getattr(config.option, "lf", False)
    )
    if not _record or not whole or session.testsfailed or exitstatus != pytest.ExitCode.OK:
        return  # a partial, failing or interrupted run leaves the record alone
    RECORD_PATH.parent.mkdir(exist_ok=True)
    RECORD_PATH.write_text(render_record(_record, session.testscollected), encoding="utf-8")


KIND_TITLES = {
    "fault": "Faults: kills, full disks, read-only folders",
    "input": "Bad input: images, manifests, labels, pools",
    "params": "Bad params",
    "security": "Security",
}


def render_record(lines: dict, tests_run: int) -> str:
    out = [
        "# Reliability record",
        "",
        "Written by the whole test suite (`python -m pytest --slow --write-record`) from what",
        "each fault and bad-input test tried; do not edit by hand. A case counts once per example",
        "run, so fuzz tests add up every example hypothesis generated. Last written by a run of",
        f"{tests_run} tests.",
        "",
    ]
    for kind, title in KIND_TITLES.items():
        rows = sorted((what, line) for (k, what), line in lines.items() if k == kind)
        if not rows:
            continue
        out += [f"## {title}", "", "| tried | cases | outcome | test |", "|---|---:|---|---|"]
        for what, line in rows:
            cases = sum(line["outcomes"].values())
            outcomes = "; ".join(
                f"{text} ({count})" if len(line["outcomes"]) > 1 else text
                for text, count in sorted(line["outcomes"].items(), key=lambda kv: -kv[1])
            )
            tests = ", ".join(f"`{t}`" for t in sorted(line["tests"]))
            out.append(f"| {_cell(what)} | {cases} | {_cell(outcomes)} | {tests} |")
        out.append("")
    return "\n".join(out)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
