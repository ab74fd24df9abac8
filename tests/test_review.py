"""`review`: the local page whose clicks land in the files the pipeline reads."""

import html
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from pipeline import clean, evaluate, ingest, pseudolabel
from pipeline.config import load_params

from .conftest import (
    CHROMIUM_ARGS,
    augment_and_train,
    chromium,
    relabel_then_reject,
    review_server,
    train_table,
    write_digits,
    write_params,
)

HOSTILE_CLASS = "<b>bold</b>"
HOSTILE_FILE = "x'><img src=y onerror=alert(2)>"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A real workspace after one pool round: artifacts/ laid out as `dvc repro` writes them."""
    root = tmp_path_factory.mktemp("review")
    write_params(root, {"train": {"epochs": 6}})
    params = load_params(root / "params.yaml")
    data, art = root / "data", root / "artifacts"
    write_digits(data, {0: "zero", 1: HOSTILE_CLASS, 2: "two"}, 30, flip=0.2, test_per_class=10)
    first = next((data / "labeled" / "zero").iterdir())
    first.rename(first.with_name(f"{HOSTILE_FILE}.png"))
    pool = data / "unlabeled" / "pool_001"
    pool.mkdir(parents=True)
    digits = load_digits()
    for i in np.flatnonzero(digits.target < 3)[200:260]:
        image = (digits.images[i] * 16).clip(0, 255).astype(np.uint8)
        Image.fromarray(image).save(pool / f"p{i}.png")
    ingest.run(data, art / "ingest", params)
    clean.run(art / "ingest", data, art / "clean", params)
    model = augment_and_train(
        art / "rounds" / "r000", art / "ingest", train_table(art / "ingest"), params
    )
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
        params=replace(params, pseudolabel=replace(params.pseudolabel, min_confidence=0.0)),
    )
    for name in ("r000", "r001"):  # r001's own model is r000's here: only the layout matters
        evaluate.run(
            model, art / "ingest", None, art / "reports" / name / "evaluate", params, name, data
        )
    return root


@pytest.fixture
def server(workspace):
    with review_server(workspace) as address:
        yield address


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _post(base, fields):
    data = urllib.parse.urlencode(fields).encode()
    try:
        with urllib.request.urlopen(base + "/action", data=data, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_requests_need_the_token_and_names_are_escaped(server, workspace, record):
    base, token = server
    assert _get(base + "/")[0] == 403 and _get(base + "/?token=wrong")[0] == 403
    assert _post(base, {"kind": "train", "path": "x", "action": "drop"})[0] == 403
    status, page = _get(f"{base}/?token={token}")
    assert status == 200 and all(f"data-kind='{k}'" in page for k in ("train", "pseudo", "test"))
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page
    assert "onerror=alert(2)>" not in page
    outside = {"token": token, "kind": "train", "path": "../../etc/passwd", "action": "drop"}
    assert _post(base, outside)[0] == 400
    assert not (workspace / "data" / "overrides.csv").exists()
    record("security", "review: no token, a wrong token, a path not on the page", "refused", 4)
    record("security", "review: a class named `<b>bold</b>` and a hostile file name", "escaped")


def test_each_action_lands_in_its_file_and_a_later_one_replaces_it(server, workspace):
    base, token = server
    status, page = _get(f"{base}/?token={token}")
    paths = {
        kind: re.findall(rf"data-kind='{kind}'.*?name='path' value='([^']*)'", page)
        for kind in ("train", "pseudo", "test")
    }
    assert all(paths.values()), paths
    train, pseudo, test = paths["train"][-1], paths["pseudo"][-1], paths["test"][-1]
    post = {"token": token}
    for fields in (
        {"kind": "train", "path": train, "action": "drop"},
        {"kind": "train", "path": train, "action": "keep"},  # replaces the drop
        {"kind": "pseudo", "path": pseudo, "action": "confirm", "label": "zero"},
        {"kind": "test", "path": test, "action": "flag"},
    ):
        assert _post(base, post | {k: html.unescape(v) for k, v in fields.items()})[0] == 200
    data = workspace / "data"
    overrides = pd.read_csv(data / "overrides.csv", dtype=str).set_index("path")["label"]
    assert overrides[html.unescape(train)] == "keep"
    pseudo_rows = pd.read_csv(data / "pseudo_overrides.csv", dtype=str).set_index("path")
    assert pseudo_rows.loc[html.unescape(pseudo), "label"] == "zero"
    audit = pd.read_csv(data / "test_audit.csv", dtype=str)
    assert audit["path"].tolist() == [html.unescape(test)]
    bad_class = {"kind": "pseudo", "path": html.unescape(pseudo), "action": "confirm", "label": "x"}
    assert _post(base, post | bad_class)[0] == 400
    for name in ("overrides.csv", "pseudo_overrides.csv", "test_audit.csv"):
        (data / name).unlink()


def test_clicks_relabel_a_label_issue_and_reject_a_pseudo_label(server, workspace, tmp_path):
    browser_path = chromium()
    if browser_path is None:
        pytest.skip("no chromium on this machine (CI installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    base, token = server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(f"{base}/?token={token}")
        seen = relabel_then_reject(page, "two")
        page.screenshot(path=str(tmp_path / "review.png"), full_page=True)
        browser.close()
    relabeled, rejected, shown = seen["relabeled"], seen["rejected"], seen["message"]
    overrides = pd.read_csv(workspace / "data" / "overrides.csv", dtype=str)
    assert overrides.values.tolist() == [[relabeled, "two"]]
    pseudo_overrides = pd.read_csv(workspace / "data" / "pseudo_overrides.csv", dtype=str)
    assert pseudo_overrides.values.tolist() == [[rejected, "reject"]]
    assert rejected in shown


def test_the_server_listens_on_localhost_only(server):
    base, _ = server
    port = int(base.rsplit(":", 1)[1])
    # the kernel's table of listening TCP sockets: local address 0100007F is 127.0.0.1
    listening = [
        line.split()[1]
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
        if line.split()[3] == "0A" and int(line.split()[1].split(":")[1], 16) == port
    ]
    assert listening == [f"0100007F:{port:04X}"]
