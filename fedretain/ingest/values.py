"""Column-wise readings of raw values (text, numbers, timestamps) on polars Series, no per-row Python.

One strict rule per kind of value, applied the same way in every batch, so a value's verdict never
depends on the batch it lands in: numbers are plain decimal notation (``12``, ``-3.5``, ``1e3``;
not ``inf``, ``nan``, ``0x10``, ``1,5``); timestamps are ISO 8601 (with or without a UTC offset;
without one they are taken as UTC), the mapping's ``timestamp_format``, or unsigned epoch numbers
in the mapping's ``timestamp_unit``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import polars as pl

NUM_RE = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"
EPOCH_INT_RE = r"^\d{1,18}$"
EPOCH_NUM_RE = r"^(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"  # no sign: '+7' or '-3' is not a point in time
ISO_FORMATS = (  # tried in order on what is still unparsed; the first ones fit almost every export
    "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d",
    "%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f%#z",
    "%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M%#z",
)
_SCALE = {"s": 1_000_000_000, "ms": 1_000_000, "us": 1_000, "ns": 1}
_NS = pl.Datetime("ns")


def as_text(s: pl.Series) -> pl.Series:
    """Values as stripped text; missing becomes ''."""
    if s.dtype != pl.String:
        s = s.cast(pl.String)
    return s.str.strip_chars().fill_null("")


def numbers(s: pl.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(float64 values, missing, not a finite number): '' or null is missing, not bad."""
    if s.dtype.is_numeric():
        values = s.cast(pl.Float64).fill_null(np.nan).to_numpy()
        missing = np.isnan(values)
        return values, missing, np.isinf(values)
    text = as_text(s)
    missing = (text == "").to_numpy()
    ok = text.str.contains(NUM_RE)
    values = text.cast(pl.Float64, strict=False).to_numpy()
    ok_np = ok.to_numpy() & np.isfinite(values)  # '1e999' is decimal notation, not a finite number
    values = np.where(ok_np, values, np.nan)
    return values, missing, ~missing & ~ok_np


def timestamps(s: pl.Series, fmt: str | None, unit: str) -> pl.Series:
    """Naive UTC ``Datetime('ns')``; null marks what failed (or was missing)."""
    dt = s.dtype
    if isinstance(dt, pl.Datetime):
        if dt.time_zone is not None:
            s = s.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
        return s.cast(_NS)
    if isinstance(dt, pl.Date):
        return s.cast(_NS)
    if dt == pl.Boolean:
        return pl.Series(s.name, [None] * len(s), dtype=_NS)
    if dt.is_numeric():
        return _from_epoch(s, unit)
    text = as_text(s)
    if fmt is not None:
        return _strptime(text, fmt)
    out = _strptime(text, ISO_FORMATS[0])
    readers: list[Callable[[pl.Series], pl.Series]] = [partial(_strptime, fmt=f) for f in ISO_FORMATS[1:]]
    readers += [lambda t: _from_epoch(_only(t, EPOCH_INT_RE).cast(pl.Int64, strict=False), unit),
                lambda t: _from_epoch(_only(t, EPOCH_NUM_RE).cast(pl.Float64, strict=False), unit)]
    for read in readers:  # each later reading sees only the rows still unparsed
        todo = np.flatnonzero((out.is_null() & (text != "")).to_numpy())
        if not len(todo):
            break
        out = out.scatter(todo, read(text.gather(todo)))
    return out.alias(s.name)


def _only(text: pl.Series, pattern: str) -> pl.Series:
    return pl.select(pl.when(text.str.contains(pattern)).then(text)).to_series()


def _strptime(text: pl.Series, fmt: str) -> pl.Series:
    try:
        out = text.str.to_datetime(fmt, strict=False, time_unit="ns")
    except pl.exceptions.PolarsError:
        return pl.Series(text.name, [None] * len(text), dtype=_NS)
    if isinstance(out.dtype, pl.Datetime) and out.dtype.time_zone is not None:
        out = out.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
    return out.cast(_NS)


def _from_epoch(numbers_: pl.Series, unit: str) -> pl.Series:
    """Epochs to timestamps; non-finite or out-of-range values become null, never an exception."""
    scale = _SCALE[unit]
    limit = 9.2e18 / scale
    if numbers_.dtype.is_integer():
        v = numbers_.cast(pl.Int64, strict=False)
        ok = (v.cast(pl.Float64).abs() < limit).fill_null(False)
        ns = pl.select(pl.when(ok).then(v * scale).otherwise(None)).to_series()
    else:
        v = numbers_.cast(pl.Float64)
        ok = (v.is_finite() & (v.abs() < limit)).fill_null(False)
        ns = pl.select(pl.when(ok).then((v * scale).round()).otherwise(None)).to_series().cast(pl.Int64)
    return ns.cast(_NS).alias(numbers_.name)
