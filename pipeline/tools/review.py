"""review: a local page to act on the reports; every action lands in a file the pipeline reads.

    python -m pipeline review [--port 8765]

Serves, on 127.0.0.1 only, the current workspace's galleries with an action on each sample:
  label issues (clean)            keep, drop, or relabel to a class  -> data/overrides.csv
  accepted pseudo-labels (last)   reject, or confirm as a class      -> data/pseudo_overrides.csv
  misclassified test images       "test label looks wrong"           -> data/test_audit.csv
The test split is never changed from the page: the audit list is for a person to check. Every
write is atomic; a later action on the same image replaces the earlier one. After each action
the page runs the `audit` stage (which copies those files where the stages depend on them) and
`dvc status`, and lists the stages the next `dvc repro` will rerun.

Only the Python standard library serves it (http.server): no framework to install or audit.
Every request must carry the token printed at start; paths and labels are accepted only when
the workspace's own tables list them; everything shown is escaped.
Host must be 127.0.0.1, localhost or [::1] with the port (else 403: DNS rebinding); a bad body
length gets 400, over MAX_BODY 413 unread; idle sockets close; a broken data/*.csv 409; else 500.
"""

from __future__ import annotations

import csv
import hmac
import io
import logging
import re
import secrets
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import pandas as pd

from pipeline.core.errors import PipelineError
from pipeline.core.io import read_array, read_json, read_table, stale_stages, write_table
from pipeline.data.images import thumbnail
from pipeline.reports import report

log = logging.getLogger(__name__)

LIMIT = 60  # samples per gallery
FILES = {"train": "overrides.csv", "pseudo": "pseudo_overrides.csv", "test": "test_audit.csv"}
ACTIONS = {"train": {"keep", "drop", "relabel"}, "pseudo": {"reject", "confirm"}, "test": {"flag"}}
MAX_BODY = 65536  # bytes of a POST body: a click sends about 200; a longer one is refused unread
SOCKET_TIMEOUT = 30  # seconds a client may stay silent before its connection is closed
LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]")  # the only Host names answered (DNS rebinding)


class MalformedFile(PipelineError):
    """A decision file in data/ that a person edited into something unreadable (answered 409)."""


def read_decisions(file: Path) -> pd.DataFrame:
    """A decision file (path,label and any columns a person added), every value a string; an
    absent or empty one has no rows. Anything malformed raises MalformedFile saying how to fix it.
    """
    if not file.exists():
        return pd.DataFrame(columns=["path", "label"])
    if not file.is_file():
        raise MalformedFile(f"{file} is not a regular file: remove it")
    raw = file.read_bytes()
    if b"\0" in raw:  # csv and pandas each read a NUL differently: refuse rather than guess
        line = raw[: raw.index(b"\0")].count(b"\n") + 1
        raise MalformedFile(f"{file}:{line}: a NUL byte: remove it and save as plain UTF-8 text")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise MalformedFile(f"{file}:{line}: not UTF-8 text: save the file as UTF-8") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next((row for row in reader if row), None)
        if header is None:
            return pd.DataFrame(columns=["path", "label"])
        if not {"path", "label"} <= set(header):
            raise MalformedFile(
                f"{file}: needs the columns path,label; it has {','.join(header)}: "
                "fix its first line by hand"
            )
        if len(set(header)) < len(header):
            raise MalformedFile(f"{file}: a column name appears twice in its first line")
        rows = []
        for row in reader:
            if row and len(row) != len(header):
                raise MalformedFile(
                    f"{file}:{reader.line_num}: {len(row)} fields where the first line has "
                    f"{len(header)}: quote a value holding a comma, or fix the row by hand"
                )
            rows += [row] if row else []  # blank lines are skipped, as pandas does
    except csv.Error as exc:
        raise MalformedFile(f"{file}:{reader.line_num}: not a readable CSV ({exc})") from None
    return pd.DataFrame(rows, columns=header, dtype=str)


def content_length(values: list[str]) -> int | None:
    """The one Content-Length header as bytes, or None when missing, repeated or not digits
    (int() alone would take -1, +5, 1_0 and spaces)."""
    if len(values) != 1 or not re.fullmatch(r"[0-9]+", values[0].strip()):
        return None
    digits = values[0].strip().lstrip("0") or "0"
    return int(digits) if len(digits) <= 18 else sys.maxsize  # int() refuses 4300+ digits


class Workspace:
    """What the page shows and accepts, read from the workspace's artifacts."""

    def __init__(self, data_dir: Path, artifacts: Path):
        self.data_dir, self.artifacts = Path(data_dir), Path(artifacts)
        ingest = self.artifacts / "ingest"
        if not (ingest / "classes.json").is_file():
            raise PipelineError(f"nothing to review yet: run `dvc repro` first ({ingest})")
        self.classes: list[str] = read_json(ingest / "classes.json")
        self.token = secrets.token_urlsafe(16)
        self.status: list[str] = []
        self.lock = threading.Lock()  # one action at a time: each rewrites a whole file

    def last_round(self) -> str | None:
        done = sorted(p.parent.name for p in self.artifacts.glob("reports/*/evaluate"))
        return done[-1] if done else None

    def samples(self) -> dict[str, pd.DataFrame]:
        """kind -> rows shown (path, text columns, images folder, row in it)."""
        out = {}
        issues_path = self.artifacts / "clean" / "issues.csv"
        if issues_path.is_file():
            issues = read_table(issues_path)
            flagged = issues[issues["label_issue"] == "True"]
            out["train"] = flagged.sort_values("label_quality", key=lambda s: s.astype(float))
        last = self.last_round()
        pseudo = self.artifacts / "rounds" / (last or "") / "pseudo" / "table.csv"
        if last and pseudo.is_file():
            table = read_table(pseudo)
            accepted = table[table["accepted"] == "True"]
            out["pseudo"] = accepted.sort_values("confidence", key=lambda s: s.astype(float))
        predictions = self.artifacts / "reports" / (last or "") / "evaluate" / "predictions.csv"
        if last and predictions.is_file():
            table = read_table(predictions)
            wrong = table[table["correct"] == "False"]
            out["test"] = wrong.sort_values(
                "confidence", key=lambda s: s.astype(float), ascending=False
            )
        return {k: v.head(LIMIT) for k, v in out.items()}

    def images(self, kind: str):
        if kind == "pseudo":
            return read_array(
                self.artifacts / "rounds" / (self.last_round() or "") / "pseudo" / "images"
            )
        return read_array(self.artifacts / "ingest" / "images")

    def act(self, kind: str, path: str, action: str, label: str) -> str:
        """Validate one action and write it; returns what was done, in words."""
        if kind not in ACTIONS or action not in ACTIONS[kind]:
            raise PipelineError(f"unknown action {kind}/{action}")
        shown = self.samples().get(kind)
        if shown is None or path not in set(shown["path"]):
            raise PipelineError("that image is not on this page")
        if action in ("relabel", "confirm") and label not in self.classes:
            raise PipelineError(f"unknown class {label!r}")
        value = {"keep": "keep", "drop": "drop", "reject": "reject", "flag": "looks wrong"}.get(
            action, label
        )
        file = self.data_dir / FILES[kind]
        with self.lock:
            old = read_decisions(file)
            new = pd.concat(  # other columns a person added are kept
                [old[old["path"] != path], pd.DataFrame({"path": [path], "label": [value]})],
                ignore_index=True,
            ).fillna("")
            write_table(file, new)
            self.status = stale_stages(run_audit=True)
        return f"{path}: {value} (in data/{FILES[kind]})"

    def pending(self) -> list[tuple[str, str, str]]:
        rows = []
        for name in FILES.values():
            table = read_decisions(self.data_dir / name)
            rows += [(name, p, label) for p, label in zip(table["path"], table["label"])]
        return rows


def render(ws: Workspace, message: str = "") -> str:
    token = report.esc(ws.token)
    options = "".join(
        f"<option value='{report.esc(c)}'>{report.esc(c)}</option>" for c in ws.classes
    )

    def form(kind: str, path: str, buttons: list[tuple[str, str]], choose: bool) -> str:
        select = f"<select name='label'>{options}</select>" if choose else ""
        clicks = "".join(
            f"<button name='action' value='{a}'>{report.esc(text)}</button>" for a, text in buttons
        )
        return (
            # the token in the URL too: the server checks it before it reads the body
            f"<form method='post' action='/action?token={token}'>"
            f"<input type='hidden' name='token' value='{token}'>"
            f"<input type='hidden' name='kind' value='{kind}'>"
            f"<input type='hidden' name='path' value='{report.esc(path)}'>{select}{clicks}</form>"
        )

    sections = []
    titles = {
        "train": (
            "Label issues (training images)",
            [("relabel", "relabel"), ("keep", "keep"), ("drop", "drop")],
        ),
        "pseudo": (
            "Pseudo-labels in the last round's set",
            [("confirm", "confirm as"), ("reject", "reject")],
        ),
        "test": (
            "Misclassified test images (the test split is never changed)",
            [("flag", "test label looks wrong")],
        ),
    }
    for kind, rows in ws.samples().items():
        images = ws.images(kind)
        tiles = []
        for row in rows.itertuples():
            text = {
                "train": f"given <b>{report.esc(getattr(row, 'given_label', ''))}</b> &rarr; suggested "
                f"<b>{report.esc(getattr(row, 'suggested_label', ''))}</b>",
                "pseudo": f"pseudo-label <b>{report.esc(getattr(row, 'label', ''))}</b> "
                f"({float(getattr(row, 'confidence', 0)):.2f})",
                "test": f"true <b>{report.esc(getattr(row, 'actual', ''))}</b> &middot; predicted "
                f"<b class='bad'>{report.esc(getattr(row, 'predicted', ''))}</b>",
            }[kind]
            title, buttons = titles[kind]
            tiles.append(
                f"<div class='tile' data-kind='{kind}'>"
                + report.pictures(images[int(row.row)], thumbnail(ws.data_dir / row.path))
                + f"<div>{text}</div><div class='path'>{report.esc(row.path)}</div>"
                + form(kind, row.path, buttons, kind != "test")
                + "</div>"
            )
        title = titles[kind][0]
        sections.append(
            f"<h2 id='{kind}'>{title} ({len(tiles)})</h2><div class='gallery'>{''.join(tiles)}</div>"
        )
    pending = ws.pending()
    body = (
        "<h1>Review</h1><p class='muted'>Each click is written to a file in data/ that the "
        "pipeline reads; run <code>dvc repro</code> to apply them.</p>"
        + (f"<p class='warn' id='message'>{report.esc(message)}</p>" if message else "")
        + "<h2>Pending decisions</h2>"
        + (
            report.table(["file", "path", "decision"], pending)
            if pending
            else "<p class='muted'>none yet</p>"
        )
        + "<p id='status'>`dvc repro` will rerun, with what follows each: "
        + report.esc(", ".join(ws.status) if ws.status else "(nothing, or no action yet)")
        + "</p>"
        + "".join(sections)
    )
    return report.page("Review", body)


def make_handler(ws: Workspace):
    class Handler(BaseHTTPRequestHandler):
        timeout = SOCKET_TIMEOUT  # StreamRequestHandler sets it on the socket: idle clients go

        def parse_request(self) -> bool:
            """http.server's parsing, then the Host check, before any handler runs: a page on
            another site whose name a rebinding DNS points at 127.0.0.1 sends its own Host."""
            if not super().parse_request():
                return False
            port = self.server.server_address[1]
            hosts = self.headers.get_all("Host") or []
            if len(hosts) == 1 and hosts[0].strip().lower() in {f"{h}:{port}" for h in LOCAL_HOSTS}:
                return True
            self._send(
                HTTPStatus.FORBIDDEN,
                f"refused: the Host header must be 127.0.0.1:{port} or localhost:{port}",
            )
            return False

        def _allowed(self, token: str) -> bool:
            if hmac.compare_digest(token.encode(), ws.token.encode()):
                return True
            self._send(
                HTTPStatus.FORBIDDEN, "missing or wrong token: use the address review printed"
            )
            return False

        def _send(self, status: HTTPStatus, text: str, content_type: str = "text/plain") -> None:
            data = text.encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", f"{content_type}; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("X-Content-Type-Options", "nosniff")
            if status >= 400:  # a body left unread must not be parsed as the next request
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def _guarded(self, handle) -> None:
            """Run a handler; whatever it raises still gets an answer, in one line."""
            try:
                handle()
            except TimeoutError:
                raise  # http.server logs "Request timed out" and closes the connection
            except ConnectionError:
                self.close_connection = True  # the client went away: nobody to answer
            except MalformedFile as exc:
                log.warning("review: %s", exc)
                self._send(HTTPStatus.CONFLICT, str(exc))
            except PipelineError as exc:
                self._send(HTTPStatus.BAD_REQUEST, str(exc))
            except Exception as exc:  # an answer beats a dropped connection
                what = " ".join(f"{type(exc).__name__}: {exc}".split())  # one line
                where = urlsplit(self.path).path  # not the query: it holds the token
                log.error("review: %s %s failed: %s", self.command, where, what)
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {what}")

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self._guarded(self._get)

        def do_POST(self) -> None:  # noqa: N802
            self._guarded(self._post)

        def _get(self) -> None:
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            if url.path != "/":
                return self._send(HTTPStatus.NOT_FOUND, "not found")
            if self._allowed(query.get("token", [""])[0]):
                self._send(HTTPStatus.OK, render(ws, query.get("message", [""])[0]), "text/html")
            return None

        def _post(self) -> None:
            url = urlsplit(self.path)
            if url.path != "/action":
                return self._send(HTTPStatus.NOT_FOUND, "not found")
            in_url = parse_qs(url.query).get("token")
            if in_url is not None and not self._allowed(in_url[0]):
                return None  # refused before a byte of the body is read
            length = content_length(self.headers.get_all("Content-Length") or [])
            if length is None:
                return self._send(HTTPStatus.BAD_REQUEST, "a POST needs one Content-Length")
            if length > MAX_BODY:
                return self._send(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"a form is at most {MAX_BODY} bytes"
                )
            try:
                raw = self.rfile.read(length).decode("utf-8")
            except UnicodeDecodeError:
                return self._send(HTTPStatus.BAD_REQUEST, "unreadable form")
            form = {k: v[0] for k, v in parse_qs(raw).items()}
            if in_url is None and not self._allowed(form.get("token", "")):
                return None
            message = ws.act(
                form.get("kind", ""),
                form.get("path", ""),
                form.get("action", ""),
                form.get("label", ""),
            )
            self.send_response(HTTPStatus.SEE_OTHER)
            self.send_header("Location", "/?" + urlencode({"token": ws.token, "message": message}))
            self.end_headers()
            return None

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's name
            log.debug("review: " + format, *args)

    return Handler


class Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        """One line, not socketserver's traceback (handlers answer their own errors)."""
        log.warning("review: connection from %s failed: %s", client_address[0], sys.exc_info()[1])


def make_server(ws: Workspace, port: int) -> Server:
    """The review server for ws on 127.0.0.1:port (0: any free port), not yet serving."""
    return Server(("127.0.0.1", port), make_handler(ws))


def serve(port: int, data_dir: Path, artifacts: Path) -> None:
    ws = Workspace(data_dir, artifacts)
    server = make_server(ws, port)
    host, bound = server.server_address[:2]
    print(f"review: http://{host}:{bound}/?token={ws.token}  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
