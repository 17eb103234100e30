"""Standalone HTML pages (steerlab's one table style, atomic writes): the inference, demo and
validation reports are written through :func:`write_page`."""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from steerlab.base.files import write_text_atomic

_STYLE = """body{font-family:sans-serif;margin:2em;max-width:1400px}
table.steerlab{border-collapse:collapse;font-size:12px}
table.steerlab td,table.steerlab th{border:1px solid #ccc;padding:2px 6px;vertical-align:top}"""

def html_table(rows: Sequence[dict], columns: Sequence[str] | None = None, digits: int = 3) -> str:
    """A plain HTML table of records (selected columns), for notebooks and reports."""
    columns = list(columns or (rows[0].keys() if rows else []))

    def cell(x: Any) -> str:
        text = f"{x:.{digits}f}" if isinstance(x, float) else ("" if x is None else str(x))
        return html.escape(text if len(text) < 200 else text[:200] + "…")

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f"<table class='steerlab'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_page(path: str | os.PathLike, title: str, body: str) -> Path:
    """Write a standalone HTML page with steerlab's table style, atomically.

    Examples:
        >>> write_page("out.html", "steerlab demo", "<h1>Hello</h1>")
        PosixPath('out.html')
    """
    path = Path(path)
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{_STYLE}</style></head><body>{body}</body></html>")
    return write_text_atomic(path, page)
