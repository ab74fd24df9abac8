"""`review`: the local page whose clicks land in the files the pipeline reads."""

import html
import logging
import re
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from pipeline.core.config import load_params
from pipeline.stages import evaluate
from pipeline.tools import review

from .conftest import (
    CHROMIUM_ARGS,
    chromium,
    relabel_then_reject,
    review_server,
    run_pool_round,
    write_digits,
    write_params,
    write_pool,
)

HOSTILE_CLASS = "<b>bold"  # no "/": a class name holds no path separator
HOSTILE_FILE = "x'><img src=y onerror=alert(2)>"
# hand edits that broke a decision file -> (its bytes, what the answer must say)
MALFORMED = {
    "wrong columns": (b"file,decision\nx.png,keep\n", "needs the columns path,label; it has file"),
    "undecodable bytes": (b"path,label\n\xff\xfe.png,keep\n", ":2: not UTF-8 text"),
    "a NUL byte": (b"path,label\nx.png,ke\x00ep\n", ":2: a NUL byte"),
    "a ragged row": (b"path,label\nx.png,keep\ny.png,drop,z\n", ":3: 3 fields where the first"),
}


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
    write_pool(data / "unlabeled" / "pool_001", 200, 260)
    everything = replace(params.pseudolabel, min_confidence=0.0)
    model = run_pool_round(
        root, params, cleaned=False, pseudo_params=replace(params, pseudolabel=everything)
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


@pytest.fixture
def local_server(workspace, monkeypatch):
    """The server in this process, so a test can lower SOCKET_TIMEOUT and read its log: yields
    (port, token). Its cwd is the workspace, as `review`'s is."""
    monkeypatch.chdir(workspace)
    monkeypatch.setattr(review, "SOCKET_TIMEOUT", 1)  # read when the handler class is made
    ws = review.Workspace(Path("data"), Path("artifacts"))
    httpd = review.make_server(ws, 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1], ws.token
    finally:
        httpd.shutdown()
        httpd.server_close()


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


def _raw(port: int, request: str) -> tuple[int, str]:
    """Send hand-written bytes (http.client would normalise the headers); returns the status and
    body the server answers before it closes. No answer within 30 s fails the test."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request.encode("latin-1"))
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/"), answer
    return int(head.split()[1]), body.decode()


def _port(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def _shown_paths(base: str, token: str) -> dict[str, str]:
    """kind -> the path of the last tile of that gallery, as the form posts it."""
    page = _get(f"{base}/?token={token}")[1]
    return {
        kind: html.unescape(
            re.findall(rf"data-kind='{kind}'.*?name='path' value='([^']*)'", page)[-1]
        )
        for kind in ("train", "pseudo", "test")
    }


def test_requests_need_the_token_and_names_are_escaped(server, workspace, record):
    base, token = server
    assert _get(base + "/")[0] == 403 and _get(base + "/?token=wrong")[0] == 403
    assert _post(base, {"kind": "train", "path": "x", "action": "drop"})[0] == 403
    status, page = _get(f"{base}/?token={token}")
    assert status == 200 and all(f"data-kind='{k}'" in page for k in ("train", "pseudo", "test"))
    assert "<b>bold" not in page and "&lt;b&gt;bold" in page
    assert "onerror=alert(2)>" not in page
    outside = {"token": token, "kind": "train", "path": "../../etc/passwd", "action": "drop"}
    assert _post(base, outside)[0] == 400
    assert not (workspace / "data" / "overrides.csv").exists()
    record("security", "review: no token, a wrong token, a path not on the page", "refused", 4)
    record("security", "review: a class named `<b>bold` and a hostile file name", "escaped")


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


@pytest.mark.slow  # the browser
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


def test_a_post_needs_one_valid_length_and_a_long_body_is_refused_unread(server, workspace, record):
    base, token = server
    port = _port(base)
    overrides = workspace / "data" / "overrides.csv"  # earlier tests' clicks may have written it
    before = overrides.read_bytes() if overrides.exists() else None

    def post(headers: str, body: str = "", query: str = f"?token={token}") -> tuple[int, str]:
        head = f"POST /action{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{headers}\r\n"
        return _raw(port, head + body)

    # -1 once made the server read until the client closed: this client never does
    bad = ["-1", "abc", "+5", "1_0", "5, 5", "0x10", "\u00b2"]
    for length in bad:
        assert post(f"Content-Length: {length}\r\n")[0] == 400, length
    assert post("")[0] == 400  # missing
    assert post("Content-Length: 1\r\nContent-Length: 3\r\n", "a=b")[0] == 400  # repeated
    # no body follows these headers: any answer at all shows the server did not wait for one
    too_long = [review.MAX_BODY + 1, 10**30]
    for length in too_long:
        status, text = post(f"Content-Length: {length}\r\n")
        assert status == 413 and str(review.MAX_BODY) in text
    assert post(f"Content-Length: {review.MAX_BODY + 1}\r\n", query="")[0] == 413  # token in body
    status, text = post("Content-Length: 100\r\n", query="?token=wrong")  # body never comes
    assert status == 403 and "token" in text
    # a valid length and the token in the URL only: the body is read and its form checked
    form = "kind=train&path=..%2F..%2Fetc%2Fpasswd&action=drop"
    status, text = post(f"Content-Length: {len(form)}\r\n", form)
    assert status == 400 and "not on this page" in text
    assert (overrides.read_bytes() if overrides.exists() else None) == before
    # the page's forms carry the token in their URL, so a browser's clicks are checked first
    assert f"action='/action?token={token}'" in _get(f"{base}/?token={token}")[1]
    record("security", "review: a bad, missing or repeated Content-Length", "refused", len(bad) + 2)
    record("security", "review: a body over the limit, or after a wrong token", "refused unread", 4)


def test_a_silent_client_is_disconnected(local_server, record):
    port, token = local_server
    half_post = f"POST /action?token={token} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    for sent in (
        "",
        "GET / HTTP/1.1\r\nHost: 127.0.0.1",
        half_post + "Content-Length: 9\r\n\r\na=",
    ):
        # SOCKET_TIMEOUT is 1 s here; 30 s is only the bound on a slow machine
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(sent.encode())
            try:
                answer = sock.recv(65536)  # a server without a timeout would let this time out
            except ConnectionResetError:
                answer = b""
        assert answer == b"", (sent, answer)
    record("security", "review: a client that connects and goes silent", "disconnected", 3)


def test_a_foreign_host_is_refused_before_anything_else(server, workspace, record):
    base, token = server
    port = _port(base)
    train = _shown_paths(base, token)["train"]

    def request(host_lines: str, method: str = "GET", body: str = "") -> tuple[int, str]:
        line = f"{method} /{'action' if body else ''}?token={token} HTTP/1.1\r\n"
        length = f"Content-Length: {len(body)}\r\n" if body else ""
        return _raw(port, f"{line}{host_lines}{length}Connection: close\r\n\r\n{body}")

    # what a page on evil.example sends once its DNS answer turned to 127.0.0.1
    foreign = ["evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}"]
    foreign += [f"127.0.0.1:{port + 1}", "127.0.0.1", f"localhost:{port}.evil.example"]
    for host in foreign:
        status, text = request(f"Host: {host}\r\n")
        assert status == 403 and "Host header" in text, host
    assert request("")[0] == 403  # no Host at all
    assert request(f"Host: 127.0.0.1:{port}\r\nHost: evil.example\r\n")[0] == 403
    assert request("Host: evil.example\r\n", method="PUT")[0] == 403  # before "unsupported"
    assert request(f"Host: 127.0.0.1:{port}\r\n", method="PUT")[0] == 501
    # a click the page would accept, with the token, from a foreign Host: nothing is written
    form = urllib.parse.urlencode({"kind": "train", "path": train, "action": "drop"})
    overrides = workspace / "data" / "overrides.csv"  # earlier tests' clicks may have written it
    before = overrides.read_bytes() if overrides.exists() else None
    assert request("Host: evil.example\r\n", "POST", form)[0] == 403
    assert (overrides.read_bytes() if overrides.exists() else None) == before
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LocalHost:{port}", f"[::1]:{port}"):
        status, page = request(f"Host: {host}\r\n")
        assert status == 200 and "Pending decisions" in page, host
    record(
        "security",
        "review: a Host other than 127.0.0.1 or localhost (DNS rebinding)",
        "refused",
        10,
    )


def test_a_malformed_decision_file_gets_an_answer_that_names_it(server, workspace, record):
    base, token = server
    data = workspace / "data"
    shown = _shown_paths(base, token)
    clicks = {"train": "drop", "pseudo": "reject", "test": "flag"}
    for kind, name in review.FILES.items():
        for what, (content, says) in MALFORMED.items():
            (data / name).write_bytes(content)
            try:
                status, text = _get(f"{base}/?token={token}")
                assert status == 409 and f"data/{name}" in text and says in text, (what, text)
                click = {"token": token, "kind": kind, "path": shown[kind], "action": clicks[kind]}
                status, text = _post(base, click)
                assert status == 409 and f"data/{name}" in text and says in text, (what, text)
                assert (data / name).read_bytes() == content  # left for the person to fix
            finally:
                (data / name).unlink()
    assert _get(f"{base}/?token={token}")[0] == 200  # and the page is back once it is fixed
    record("robustness", "review: a hand-broken decision file", "named with its fix", 12)


def test_a_malformed_file_and_a_failure_each_log_one_line(local_server, workspace, caplog):
    port, token = local_server
    base = f"http://127.0.0.1:{port}"
    caplog.set_level(logging.WARNING, logger="pipeline.tools.review")
    (workspace / "data" / "overrides.csv").write_bytes(MALFORMED["wrong columns"][0])
    try:
        status, text = _get(f"{base}/?token={token}")
    finally:
        (workspace / "data" / "overrides.csv").unlink()
    assert status == 409 and text.startswith("data/overrides.csv: needs the columns path,label")
    assert [r.getMessage() for r in caplog.records] == [f"review: {text}"]
    caplog.clear()
    # an artifact the pipeline wrote, broken: not the user's to fix, so a 500 in one line
    issues = workspace / "artifacts" / "clean" / "issues.csv"
    kept = issues.read_bytes()
    issues.write_text("path,label_quality\nx.png,0.5\n")
    try:
        status, text = _get(f"{base}/?token={token}")
        click = {"token": token, "kind": "train", "path": "x.png", "action": "drop"}
        post_status, post_text = _post(base, click)
    finally:
        issues.write_bytes(kept)
    assert status == 500 and text == "internal error: KeyError: 'label_issue'"
    assert post_status == 500 and post_text == text
    logged = [r.getMessage() for r in caplog.records]
    assert logged == [
        "review: GET / failed: KeyError: 'label_issue'",
        "review: POST /action failed: KeyError: 'label_issue'",
    ]
    assert all(token not in line for line in logged)
