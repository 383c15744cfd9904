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


def html_table(headers: Sequence[Any], rows: Iterable[Sequence[Any]], fmt: Callable[[Any], str] = cell) -> str:
    """``<table>`` with one header row and one row per sequence of cells (each formatted by ``fmt``)."""
    e = html.escape
    head = "".join(f"<th>{e(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{e(fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


__all__ = ["cell", "html_table"]
