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
"""

from __future__ import annotations

import hmac
import logging
import secrets
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import pandas as pd

from pipeline import report
from pipeline.errors import PipelineError
from pipeline.images import thumbnail
from pipeline.io import read_array, read_json, read_table, stale_stages, write_table

log = logging.getLogger(__name__)

LIMIT = 60  # samples per gallery
FILES = {"train": "overrides.csv", "pseudo": "pseudo_overrides.csv", "test": "test_audit.csv"}
ACTIONS = {"train": {"keep", "drop", "relabel"}, "pseudo": {"reject", "confirm"}, "test": {"flag"}}


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
            old = read_table(file) if file.is_file() else pd.DataFrame(columns=["path", "label"])
            if not {"path", "label"} <= set(old.columns):
                raise PipelineError(f"{file} needs the columns path,label: fix it by hand first")
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
            file = self.data_dir / name
            if file.is_file():
                rows += [(name, r.path, r.label) for r in read_table(file).itertuples()]
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
            "<form method='post' action='/action'>"
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
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            if url.path != "/":
                return self._send(HTTPStatus.NOT_FOUND, "not found")
            if self._allowed(query.get("token", [""])[0]):
                self._send(HTTPStatus.OK, render(ws, query.get("message", [""])[0]), "text/html")

        def do_POST(self) -> None:  # noqa: N802
            try:
                length = min(int(self.headers.get("Content-Length") or 0), 65536)
                raw = self.rfile.read(length).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                return self._send(HTTPStatus.BAD_REQUEST, "unreadable form")
            form = {k: v[0] for k, v in parse_qs(raw).items()}
            if urlsplit(self.path).path != "/action":
                return self._send(HTTPStatus.NOT_FOUND, "not found")
            if not self._allowed(form.get("token", "")):
                return None
            try:
                message = ws.act(
                    form.get("kind", ""),
                    form.get("path", ""),
                    form.get("action", ""),
                    form.get("label", ""),
                )
            except PipelineError as exc:
                return self._send(HTTPStatus.BAD_REQUEST, str(exc))
            self.send_response(HTTPStatus.SEE_OTHER)
            self.send_header("Location", "/?" + urlencode({"token": ws.token, "message": message}))
            self.end_headers()
            return None

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's name
            log.debug("review: " + format, *args)

    return Handler


def serve(port: int, data_dir: Path, artifacts: Path) -> None:
    ws = Workspace(data_dir, artifacts)
    server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(ws))
    host, bound = server.server_address[:2]
    print(f"review: http://{host}:{bound}/?token={ws.token}  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
