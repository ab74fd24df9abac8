import html
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from pipeline.core.config import load_params
from pipeline.stages import clean, evaluate, ingest, pseudolabel, summarize

from .conftest import augment_and_train, chromium, train_table, write_params

HOSTILE_CLASS = "<script>alert(1)"  # no "/": a class name holds no path separator
HOSTILE_FILE = 'a"><img src=x onerror=alert(1)>'


def test_ece_is_zero_when_confidence_matches_accuracy():
    labels = np.array([0, 0, 0, 1] * 25)
    probs = np.tile([0.75, 0.25], (100, 1))  # says 0 with 75% confidence; right 75% of the time
    ece, table = evaluate.expected_calibration_error(labels, probs, 10)
    assert ece == pytest.approx(0.0, abs=1e-9)
    overconfident = np.tile([0.99, 0.01], (100, 1))
    assert evaluate.expected_calibration_error(labels, overconfident, 10)[0] == pytest.approx(0.24)


def test_summary_has_top_k_only_with_more_than_five_classes():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(7), 50)
    labels = probs.argmax(1)
    metrics = evaluate.summary_metrics(labels, probs, 10)
    assert metrics["accuracy"] == 1.0 and metrics["top3_accuracy"] == 1.0
    assert "top3_accuracy" not in evaluate.summary_metrics(labels % 2, probs[:, :2], 10)


def test_the_test_label_audit_lists_labels_the_model_confidently_contradicts():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 40)
    probs = np.full((120, 3), 0.02)
    probs[np.arange(120), labels] = 0.96
    probs += rng.uniform(0, 0.01, probs.shape)
    wrong = np.array([3, 50, 90])  # the model is sure these are another class
    probs[wrong] = probs[wrong][:, [1, 2, 0]]
    probs /= probs.sum(1, keepdims=True)
    issues, quality = evaluate.audit_test_labels(labels, probs)
    assert set(np.flatnonzero(issues)) == set(wrong)
    assert quality[wrong].max() < np.delete(quality, wrong).min()


def test_most_confused_pairs_are_ordered_by_count():
    matrix = np.array([[5, 3, 0], [1, 5, 0], [0, 7, 5]])
    pairs = evaluate.most_confused(matrix, ["a", "b", "c"])
    assert [(p["actual"], p["predicted"], p["count"]) for p in pairs] == [
        ("c", "b", 7),
        ("a", "b", 3),
        ("b", "a", 1),
    ]


@pytest.fixture(scope="module")
def hostile_report(tmp_path_factory):
    """A real round (ingest, augment, train, evaluate) on classes and files with hostile names."""
    root = tmp_path_factory.mktemp("hostile")
    write_params(root, {"train": {"epochs": 6}})
    params = load_params(root / "params.yaml")
    data = root / "data"
    (data / "labeled" / "images").mkdir(parents=True)
    digits = load_digits()
    names = {0: HOSTILE_CLASS, 1: "uno ñandú", 2: "zwei & drei 日本"}
    rows = ["path,label"]
    for digit, name in names.items():
        for n, i in enumerate(np.flatnonzero(digits.target == digit)[:40]):
            stem = f"{HOSTILE_FILE}_{digit}_{n}" if n % 4 == 0 else f"img_{digit}_{n}"
            path = data / "labeled" / "images" / f"{stem}.png"
            Image.fromarray((digits.images[i] * 16).clip(0, 255).astype(np.uint8)).save(path)
            # Every fourth image carries a wrong label, so the gallery has hostile file names.
            label = names[(digit + 1) % 3] if n % 4 == 0 else name
            rows.append(
                f'"{path.relative_to(data).as_posix().replace(chr(34), chr(34) * 2)}","{label}"'
            )
    (data / "labeled" / "labels.csv").write_text("\n".join(rows) + "\n")
    # a pool whose file names are hostile too
    pool = data / "unlabeled" / "pool_001"
    pool.mkdir(parents=True)
    for n, i in enumerate(np.flatnonzero(digits.target < 3)[300:330]):
        image = (digits.images[i] * 16).clip(0, 255).astype(np.uint8)
        Image.fromarray(image).save(pool / f"{HOSTILE_FILE}_{n}.png")
    ingest_dir = root / "ingest"
    ingest.run(data, ingest_dir, params)
    clean.run(ingest_dir, data, root / "clean", params)
    augment_and_train(root, ingest_dir, train_table(ingest_dir), params)
    reports = root / "reports" / "r000"
    reports.mkdir(parents=True)
    (reports / "train").symlink_to(root / "train", target_is_directory=True)
    metrics = evaluate.run(
        root / "model", ingest_dir, root / "train", reports / "evaluate", params, "r000", data
    )
    pseudolabel.init_pseudo(root / "init", ingest_dir / "images")
    pseudolabel.run(
        round_name="r000",
        pool="pool_001",
        data_dir=data,
        model_dir=root / "model",
        ingest_dir=ingest_dir,
        pseudo_in=root / "init",
        out_dir=root / "pseudo",
        report_dir=reports / "pseudolabel",
        params=params,
    )
    summarize.run(root / "reports", root / "clean", ingest_dir, root / "summary")
    return reports / "evaluate", metrics


def test_report_escapes_hostile_class_and_file_names(hostile_report, record):
    folder, metrics = hostile_report
    page = (folder / "report.html").read_text()
    assert "<script" not in page.lower()
    assert "onerror=alert" not in page.replace("onerror=alert(1)&gt;", "")  # only escaped copies
    assert html.escape(HOSTILE_CLASS) in page
    assert html.escape(HOSTILE_FILE, quote=True) in page
    predictions = pd.read_csv(folder / "predictions.csv", dtype=str, keep_default_na=False)
    assert HOSTILE_CLASS in set(predictions["actual"])
    assert metrics["test_images"] == len(predictions)
    for name in ("metrics.json", "per_class.csv", "slices.csv", "confusion.png", "reliability.png"):
        assert (folder / name).is_file()
    per_class = pd.read_csv(folder / "per_class.csv", dtype=str, keep_default_na=False)
    assert set(per_class["class"]) == {HOSTILE_CLASS, "uno ñandú", "zwei & drei 日本"}
    record(
        "security",
        'class named `<script>alert(1)`, file named `a"><img src=x onerror=alert(1)>`',
        "escaped in the evaluate report",
    )
    record(
        "input",
        "class names with `<`, spaces, `&` and non-Latin letters",
        "kept exactly, through ingest, train and evaluate",
    )


def test_clean_pseudolabel_and_summary_pages_escape_hostile_names(hostile_report, record):
    root = hostile_report[0].parents[2]
    pages = {
        "clean": root / "clean" / "report.html",
        "pseudolabel": root / "reports" / "r000" / "pseudolabel" / "report.html",
        "summarize": root / "summary" / "index.html",
    }
    shown = {  # the hostile text each page shows (the summary lists rounds and links only)
        "clean": [HOSTILE_CLASS, HOSTILE_FILE],
        "pseudolabel": [HOSTILE_CLASS, HOSTILE_FILE],
        "summarize": [],
    }
    for name, path in pages.items():
        page = path.read_text()
        assert "<script" not in page.lower(), name
        assert "onerror=alert" not in page.replace("onerror=alert(1)&gt;", ""), name
        for text in shown[name]:
            assert html.escape(text, quote=True) in page, (name, text)
    record(
        "security",
        'class named `<script>alert(1)`, file named `a"><img src=x onerror=alert(1)>`',
        "escaped in the clean and pseudolabel pages; no live markup in the summary page",
    )


@pytest.mark.slow  # the browser
def test_report_renders_in_a_real_browser_without_console_errors(hostile_report, tmp_path, record):
    browser_path = chromium()
    if browser_path is None:
        pytest.skip("no chromium on this machine (CI installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    folder, _ = hostile_report
    wrong = (pd.read_csv(folder / "predictions.csv", dtype=str)["correct"] == "False").sum()
    assert wrong > 0
    errors, dialogs = [], []
    args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",  # fresh profile: playwright
    ]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=args)
        page = browser.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto((folder / "report.html").resolve().as_uri())
        tiles = page.locator("#gallery .tile").count()
        originals = page.evaluate(  # each tile: the user's file beside the model input
            "[...document.querySelectorAll('#gallery .tile img.original')]"
            ".filter(i => i.complete && i.naturalWidth > 0).length"
        )
        broken = page.evaluate(
            "[...document.images].filter(i => !i.complete || i.naturalWidth === 0).length"
        )
        scripts = page.locator("script").count()
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert tiles == min(wrong, 200) and originals == tiles
    assert broken == 0 and scripts == 0
    assert errors == [] and dialogs == []
    record(
        "security",
        "the hostile report opened in headless chromium",
        "no script ran, no dialog, no console error",
    )
    shutil.copy(tmp_path / "report.png", folder / "screenshot.png")
