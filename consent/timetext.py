"""Canonical timestamp text for whole columns: µs since epoch -> ``YYYY-MM-DDTHH:MM:SS.ffffffZ``.

The column-wise twin of ``records.format_ts`` (re-exported there as ``format_us``; the
hypothesis test ``test_numpy_timestamp_text_equals_format_ts`` holds them byte-identical).
A million timestamps span few distinct days, so the civil date (H. Hinnant's algorithm)
is computed once per day of the column's range, the time of day and the fraction come
from small precomputed tables, and each record's text is four fixed-width copies.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

__all__ = ["format_us"]

_DAY_US = 86_400_000_000
_TEMPLATE = np.frombuffer(b"0000-00-00T00:00:00.000000Z", dtype=np.uint8)
_PAIRS = np.frombuffer("".join(f"{i:02d}" for i in range(100)).encode(), dtype=np.uint8).reshape(100, 2)
# "HH:MM:SS" of every second of a day, and the 3-digit groups of the microseconds
_CLOCK = np.frombuffer("".join(f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}" for s in range(86_400)).encode(),
                       dtype="V8")
_TRIPLES = np.frombuffer("".join(f"{i:03d}" for i in range(1000)).encode(), dtype="V3")


def _dates(days: np.ndarray) -> np.ndarray:
    """``YYYY-MM-DDT`` (11 bytes, dtype V11) of each day number since 1970-01-01."""
    z = days + 719_468
    era = z // 146_097
    doe = z - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + np.where(mp < 10, 3, -9)
    year = yoe + era * 400 + (month <= 2)
    out = np.empty((len(days), 11), dtype=np.uint8)
    out[:] = _TEMPLATE[:11]
    for pos, v in ((0, year // 100), (2, year % 100), (5, month), (8, day)):
        out[:, pos : pos + 2] = _PAIRS[v]
    return out.reshape(-1).view("V11")


def format_us(us: np.ndarray | Sequence[int], *, quoted: bool = False) -> pa.Array:
    """µs since epoch -> canonical ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (the text of ``records.format_ts``).

    Values must lie in 1970..9999 (the importer checks). ``quoted`` adds JSON quotes.
    """
    us = np.asarray(us, dtype=np.int64)
    n = len(us)
    days = us // _DAY_US
    rem = us - days * _DAY_US
    secs = rem // 1_000_000
    frac = rem - secs * 1_000_000
    if n:
        lo, hi = int(days.min()), int(days.max())
        if hi - lo < max(n, 1024):  # a table of every day in the range, looked up per record
            date = _dates(np.arange(lo, hi + 1, dtype=np.int64))[days - lo]
        else:
            date = _dates(days)
    q = 1 if quoted else 0
    width = len(_TEMPLATE) + 2 * q
    out = np.empty((n, width), dtype=np.uint8)
    out[:, q : q + len(_TEMPLATE)] = _TEMPLATE
    if quoted:
        out[:, 0] = out[:, -1] = ord('"')
    if n:
        rec = out.reshape(-1).view(np.dtype({"names": ["d", "t", "f1", "f2"], "formats": ["V11", "V8", "V3", "V3"],
                                             "offsets": [q, q + 11, q + 20, q + 23], "itemsize": width}))
        rec["d"] = date
        rec["t"] = _CLOCK[secs]
        rec["f1"] = _TRIPLES[frac // 1000]
        rec["f2"] = _TRIPLES[frac % 1000]
    offsets = np.arange(0, width * (n + 1), width, dtype=np.int64)
    return pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(out))
