"""The one HTML table writer of fedretain's reports (run report, demo report, consent report).

Dependency-free on purpose, so every layer down to ``fedretain.consent`` can use it.
Cells are escaped; floats show 4 decimals ("–" if not finite), missing values "–".
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any


def cell(value: Any) -> str:
    """A cell's text: 4 decimals for floats, "–" for None or a non-finite float."""
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else "–"
    return "–" if value is None else str(value)


class Abbrev:
    """A long cell shown shortened to ``limit`` characters, the whole text in its ``title`` (hover)."""

    def __init__(self, text: str, limit: int = 60) -> None:
        self.text = text
        self.limit = limit

    def html(self) -> str:
        e = html.escape
        if len(self.text) <= self.limit:
            return e(self.text)
        return f'<span title="{e(self.text)}">{e(self.text[: self.limit - 1])}…</span>'


def html_table(headers: Sequence[Any], rows: Iterable[Sequence[Any]], fmt: Callable[[Any], str] = cell,
               cls: str = "") -> str:
    """``<table>`` with one header row and one row per sequence of cells (each formatted by ``fmt``;
    an :class:`Abbrev` cell is shortened with its full text as a title). ``cls``: the table's CSS class."""
    e = html.escape
    head = "".join(f"<th>{e(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c.html() if isinstance(c, Abbrev) else e(fmt(c))}</td>" for c in r)
                   + "</tr>" for r in rows)
    attr = f' class="{e(cls)}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


__all__ = ["Abbrev", "cell", "html_table"]
