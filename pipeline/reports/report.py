"""Self-contained HTML pages: no network, no CDN, pictures inlined, every user string escaped."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d2330;background:#fafbfc}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde1e6;padding-bottom:4px}
.muted{color:#6a7280} .warn{background:#fff4d6;border-left:4px solid #e0a800;padding:8px 12px;margin:6px 0}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:12px 0}
.card{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:10px 14px;min-width:120px}
.card b{display:block;font-size:20px}
table{border-collapse:collapse;background:#fff;margin:8px 0} th,td{border:1px solid #dde1e6;padding:4px 8px;text-align:left}
th{background:#f0f2f5} td.num{text-align:right;font-variant-numeric:tabular-nums}
.gallery{display:flex;flex-wrap:wrap;gap:10px}
.tile{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:8px;width:180px;font-size:12px}
.tile img{width:96px;height:96px;image-rendering:pixelated;display:block;margin:0 auto 6px;background:#000}
.tile .path{color:#6a7280;word-break:break-all}
.tile .pics{display:flex;gap:4px;justify-content:center;margin-bottom:6px}
.tile .pics img{width:80px;height:80px;margin:0}
.tile img.original{object-fit:contain;image-rendering:auto;background:#f3f4f6}
.bad{color:#b42318;font-weight:600} .good{color:#067647;font-weight:600}
img.plot{max-width:100%;border:1px solid #dde1e6;background:#fff}
a{color:#175cd3}
"""


def esc(value: object) -> str:
    """HTML-escape any value, quotes included (safe inside attributes too)."""
    return html.escape(str(value), quote=True)


def page(title: str, body: str) -> str:
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'\">"
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>\n{body}\n</body></html>\n"
    )


def image_uri(pixels: np.ndarray) -> str:
    """A uint8 (H, W, C) image as an inline PNG data URI."""
    array = pixels.squeeze(-1) if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def pictures(model_input: np.ndarray, original: np.ndarray | None = None) -> str:
    """A tile's picture: the original file (when readable) beside what the model saw."""
    shown = f"<img alt='model input' title='model input' src='{image_uri(model_input)}'>"
    if original is None:
        return shown
    return (
        "<div class='pics'>"
        f"<img class='original' alt='original file' title='original file' "
        f"src='{image_uri(original)}'>{shown}</div>"
    )


def file_uri(path: Path) -> str:
    """A PNG file (a matplotlib plot) inlined as a data URI."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def cards(items: Iterable[tuple[str, object]]) -> str:
    return (
        "<div class='cards'>"
        + "".join(f"<div class='card'><b>{esc(v)}</b>{esc(k)}</div>" for k, v in items)
        + "</div>"
    )


def table(columns: Sequence[str], rows: Iterable[Sequence[object]], raw: bool = False) -> str:
    """An HTML table; cells are escaped unless raw (for cells built from escaped parts)."""
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for value in row:
            cls = " class='num'" if isinstance(value, int | float | np.number) else ""
            text = _fmt(value)
            cells.append(f"<td{cls}>{text if raw else esc(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def warnings_html(warnings: Iterable[str]) -> str:
    return "".join(f"<div class='warn'>{esc(w)}</div>" for w in warnings)


def _fmt(value: object) -> str:
    if isinstance(value, float | np.floating):
        return f"{value:.3f}"
    return str(value)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
