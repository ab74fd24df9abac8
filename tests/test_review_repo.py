"""`review` in a real DVC project after `dvc repro`: clicks land in data/ and the page names
the stages they make stale, as `dvc status` does."""

import shutil

import pandas as pd
import pytest

from .conftest import CHROMIUM_ARGS, chromium, dvc, relabel_then_reject, review_server, stale

pytestmark = pytest.mark.slow


def test_clicks_in_a_real_project_make_clean_and_the_pool_round_stale(demo_repo, tmp_path):
    browser_path = chromium()
    if browser_path is None:
        pytest.skip("no chromium on this machine (CI installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    project = tmp_path / "project"
    shutil.copytree(demo_repo[0], project, symlinks=True)
    # other tests edit the shared demo project: start from its committed, reproduced state
    dvc(project, "checkout", "--force")
    if stale(project):
        dvc(project, "repro")
    assert stale(project) == {}
    with review_server(project) as (base, token), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(f"{base}/?token={token}")
        seen = relabel_then_reject(page, "7")
        browser.close()

    relabeled, rejected = seen["relabeled"], seen["rejected"]
    after_relabel, after_reject = seen["status_after_relabel"], seen["status_after_reject"]
    overrides = pd.read_csv(project / "data" / "overrides.csv", dtype=str)
    assert [relabeled, "7"] in overrides.values.tolist()
    pseudo_overrides = pd.read_csv(project / "data" / "pseudo_overrides.csv", dtype=str)
    assert pseudo_overrides.values.tolist() == [[rejected, "reject"]]
    status = stale(project)  # what `dvc status` says now, the page's source
    assert "clean" in status and "pseudolabel@r001" in status, status
    assert "clean" in after_relabel and "pseudolabel@r001" not in after_relabel
    assert "clean" in after_reject and "pseudolabel@r001" in after_reject
