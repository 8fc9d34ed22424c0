"""One self-contained HTML page (images embedded) from ``results.json`` and the figures."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..metrics import better

ARROWS = {"lower": "↓", "higher": "↑"}

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #ddd;margin:0.5em 0}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:0.5em 1em}
.checks{list-style:none;padding-left:0}.checks li{padding:2px 6px;margin:2px 0}
.pass{background:#e8f5e9}.fail{background:#ffebee;color:#b71c1c}
.mx-controls{margin:0.5em 0;font-size:0.9em}.mx-controls label{margin-right:1em}
.mx-views{display:flex;flex-wrap:wrap;gap:12px}.mx-view{display:flex;flex-direction:column}
.mx-view canvas{background:#000;image-rendering:pixelated;max-width:100%}
.mx-note{color:#666}
table.text td{text-align:left}
"""


def embed_png(path: str | Path) -> str:
    """An <img> tag holding the PNG as base64 so the page needs no other file."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(Path(path).stem)}" src="data:image/png;base64,{data}">'


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if value is None:
        return "–"
    return html.escape(str(value))


def header_with_arrow(header: str, score: str) -> str:
    """``header`` plus ↓ (lower is better) or ↑ (higher is better) as
    :data:`medexplain.metrics.DIRECTIONS` declares for ``score`` (a score name or a dotted
    key ending in one); unchanged for a column that is not a score."""
    direction = better(score)
    return f"{header} {ARROWS[direction]}" if direction else header


def metrics_table(
    rows: Mapping[str, Mapping[str, Any]],
    columns: Sequence[tuple[str, str] | tuple[str, str, str]],
) -> str:
    """HTML table: one row per key of ``rows``; ``columns`` = (dotted key, header) or
    (dotted key, header, score name). Each header gets the arrow of its score from
    :data:`medexplain.metrics.DIRECTIONS` (see :func:`header_with_arrow`); the score is the
    key's last part unless named."""

    def lookup(row: Mapping[str, Any], dotted: str) -> Any:
        value: Any = row
        for part in dotted.split("."):
            if not isinstance(value, Mapping) or part not in value:
                return None
            value = value[part]
        return value

    headers = [
        header_with_arrow(column[1], column[-1] if len(column) > 2 else column[0])
        for column in columns
    ]
    head = "".join(f"<th>{html.escape(header)}</th>" for header in headers)
    body = []
    for name, row in rows.items():
        cells = "".join(f"<td>{_format(lookup(row, column[0]))}</td>" for column in columns)
        body.append(f"<tr><td>{html.escape(name)}</td>{cells}</tr>")
    return f"<table><tr><th>method</th>{head}</tr>{''.join(body)}</table>"


def plain_table(
    header: Sequence[str], rows: Sequence[Sequence[Any]], css_class: str | None = None
) -> str:
    """An HTML table of ``rows`` under ``header``, every cell escaped as text
    (``css_class="text"``: cells aligned left, for words rather than numbers)."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    attribute = f" class='{html.escape(css_class)}'" if css_class else ""
    return f"<table{attribute}><tr>{head}</tr>{body}</table>"


def write_report(
    path: str | Path,
    *,
    title: str,
    sections: Sequence[tuple[str, str]],
    results: Mapping[str, Any] | None = None,
) -> Path:
    """Write the page: ``sections`` = (heading, HTML body) in order; the full results JSON is
    appended in a collapsible block so every number stays machine-readable."""
    parts = [f"<h1>{html.escape(title)}</h1>"]
    for heading, body in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>\n{body}")
    if results is not None:
        dump = html.escape(json.dumps(results, indent=2))
        parts.append(f"<details><summary>results.json</summary><pre>{dump}</pre></details>")
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body>{''.join(parts)}</body></html>"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
