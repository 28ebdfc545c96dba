"""The HTML page of a report: plain, self-contained (images inlined as base64), readable without CSS."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from typing import Any

_STYLE = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; color: #1f2328; background: #fff;
       max-width: 1100px; margin: 2rem auto; padding: 0 1.5rem; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; } h2 { font-size: 1.2rem; margin-top: 2rem;
       border-bottom: 1px solid #d0d7de; padding-bottom: 0.3rem; }
p.sub { color: #57606a; margin-top: 0; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.92rem; }
th, td { border: 1px solid #d0d7de; padding: 0.3rem 0.7rem; text-align: right; }
th { background: #f6f8fa; } td:first-child, th:first-child { text-align: left; }
table.kv td:first-child { font-weight: 600; background: #f6f8fa; } table.kv td { text-align: left; }
figure { margin: 1rem 0; } figure img { max-width: 100%; border: 1px solid #d0d7de; }
figcaption { color: #57606a; font-size: 0.9rem; }
code { background: #f6f8fa; padding: 0.1rem 0.3rem; border-radius: 4px; }
"""


def esc(value: Any) -> str:
    return html.escape(str(value))


def fmt(value: Any) -> str:
    """Numbers as a reader wants them: thousands separators for ints, 4 significant digits for floats."""
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e6 else f"{value:,.0f}"
    return str(value)


def table(header: Sequence[str] | None, rows: Sequence[Sequence[Any]], css: str = "") -> str:
    head = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{esc(fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table class="{css}">{head}{body}</table>'


def figure(png: bytes, caption: str, alt: str) -> str:
    data = base64.b64encode(png).decode()
    return (
        f'<figure><img alt="{esc(alt)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def page(title: str, subtitle: str, sections: Sequence[tuple[str, str]]) -> str:
    """``sections``: (heading, inner HTML) pairs, in order."""
    parts = [f"<h2>{esc(h)}</h2>\n{body}" for h, body in sections]
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_STYLE}</style></head>'
        f'<body><h1>{esc(title)}</h1><p class="sub">{esc(subtitle)}</p>\n'
        + "\n".join(parts)
        + "</body></html>\n"
    )
