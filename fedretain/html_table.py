"""The one HTML table writer of fedretain's reports (run report, demo report, consent report).

Dependency-free on purpose, so every layer down to ``fedretain.consent`` can use it.
Cells are escaped; floats show 4 decimals ("–" if not finite), missing values "–".
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any


def cell(value: Any) -> str:
    """A cell's text: 4 decimals for floats, "–" for None or a non-finite float."""
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else "–"
    return "–" if value is None else str(value)


LONG_TOKEN = 24
NUMERIC = re.compile(r"[-+–]?[\d,.]+%?( [A-Z]{3})?|[-+]?[\d.]+ \[[-+\d., ]+\]|[-+]?[\d,.]+ [/–] [-+]?[\d,.]+")


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


def td(value: Any, fmt: Callable[[Any], str] = cell) -> str:
    """A cell; numbers get ``class="num"`` (right-aligned, one line), unbreakable long tokens ``class="long"``;
    an :class:`Abbrev` is shortened with its full text as a title."""
    if isinstance(value, Abbrev):
        return f"<td>{value.html()}</td>"
    text = fmt(value)
    cls = ' class="num"' if NUMERIC.fullmatch(text) else ""
    if not cls and any(len(w) > LONG_TOKEN for w in text.split()):
        cls = ' class="long"'  # may break anywhere: one long id must not push the table off-screen
    return f"<td{cls}>{html.escape(text)}</td>"


def html_table(headers: Sequence[Any], rows: Iterable[Sequence[Any]], fmt: Callable[[Any], str] = cell,
               titles: Mapping[str, str] | None = None, cls: str = "") -> str:
    """``<table>`` with one header row and one row per sequence of cells (each formatted by ``fmt``).

    ``titles`` maps a heading to a plain-words explanation, shown as the heading's tooltip;
    ``cls`` is the table's CSS class.
    """
    e = html.escape
    titles = titles or {}
    head = "".join(f'<th title="{e(titles[str(h)])}">{e(str(h))}</th>' if str(h) in titles else f"<th>{e(str(h))}</th>"
                   for h in headers)
    body = "".join("<tr>" + "".join(td(c, fmt) for c in r) + "</tr>" for r in rows)
    attr = f' class="{e(cls)}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


__all__ = ["Abbrev", "cell", "html_table", "td"]
