"""A merchant's own column names, labels and timestamp format, mapped onto the schema without code.

A silo may hold a ``mapping.json`` (or one is passed explicitly)::

    {"version": 1,
     "columns": {"their_name": "our_name"},
     "events": {"their_label": "our_event"},
     "channels": {"their_label": "our_channel"},
     "timestamp_format": "%d/%m/%Y %H:%M",
     "timestamp_unit": "s"}

Every key is optional. A mapping with ``"version": 2`` (several files, joins, derived fields,
row rules, grouping, value maps) is read by ``fedretain.exports`` instead. Labels that are
already canonical pass through unchanged, so a mapping only has to list what differs. The
mapping itself is validated strictly (unknown keys, targets outside the schema vocabulary):
a typo in it must fail loudly, not reject half the rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from fedretain.schema import CHANNELS, EVENT_COLUMN_NAMES, EVENT_TYPES, USER_COLUMN_NAMES


class IngestError(ValueError):
    """A file-level problem (missing file or column, corrupt file, bad mapping): the file is refused."""


TIMESTAMP_UNITS: tuple[str, ...] = ("s", "ms", "us", "ns")
_KEYS = ("columns", "events", "channels", "timestamp_format", "timestamp_unit")
_TARGET_COLUMNS = frozenset(EVENT_COLUMN_NAMES) | frozenset(USER_COLUMN_NAMES)


@dataclass(frozen=True)
class ColumnMapping:
    """How a merchant's files differ from the schema (see the module docstring for the JSON form)."""

    columns: dict[str, str] = field(default_factory=dict)
    events: dict[str, str] = field(default_factory=dict)
    channels: dict[str, str] = field(default_factory=dict)
    timestamp_format: str | None = None
    timestamp_unit: str = "s"
    source: Path | None = None

    @classmethod
    def from_dict(cls, data: Any, *, source: Path | None = None) -> ColumnMapping:
        """Validate a decoded ``mapping.json``; raise ``IngestError`` naming the file and key."""
        where = str(source) if source is not None else "mapping"
        if not isinstance(data, dict):
            raise IngestError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if data.get("version") == 2:
            raise IngestError(f"{where}: a version 2 mapping describes a whole silo (several files); "
                              "use it on the silo folder, not on a single file")
        if data.get("version", 1) != 1:
            raise IngestError(f"{where}: 'version' must be 1 or 2, got {data.get('version')!r}")
        data = {k: v for k, v in data.items() if k != "version"}
        unknown = sorted(set(data) - set(_KEYS))
        if unknown:
            raise IngestError(f"{where}: unknown key(s) {unknown}; allowed keys: {', '.join(_KEYS)}")
        columns = _str_dict(data.get("columns", {}), "columns", where, _TARGET_COLUMNS)
        events = _str_dict(data.get("events", {}), "events", where, frozenset(EVENT_TYPES))
        channels = _str_dict(data.get("channels", {}), "channels", where, frozenset(CHANNELS))
        fmt = data.get("timestamp_format")
        if fmt is not None and (not isinstance(fmt, str) or not fmt):
            raise IngestError(f"{where}: 'timestamp_format' must be a non-empty strftime string, got {fmt!r}")
        unit = data.get("timestamp_unit", "s")
        if unit not in TIMESTAMP_UNITS:
            raise IngestError(f"{where}: 'timestamp_unit' must be one of {', '.join(TIMESTAMP_UNITS)}, got {unit!r}")
        return cls(columns, events, channels, fmt, unit, source)

    @classmethod
    def load(cls, path: str | Path) -> ColumnMapping:
        """Read and validate a ``mapping.json`` file."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise IngestError(f"{path}: mapping file not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IngestError(f"{path}: cannot read mapping file: {exc}") from None
        return cls.from_dict(data, source=path)

    def rename(self, columns: list[str], *, file: str) -> dict[str, str]:
        """Map a file's column names to schema names; two columns landing on one name is an error."""
        out: dict[str, str] = {}
        seen: dict[str, str] = {}
        for col in columns:
            target = self.columns.get(col, col)
            if target in seen:
                raise IngestError(
                    f"{file}: columns {seen[target]!r} and {col!r} both map to {target!r}; "
                    "drop one or fix the mapping's 'columns'"
                )
            seen[target] = col
            out[col] = target
        return out

    def map_events(self, labels: pd.Series) -> pd.Series:
        """Translate the merchant's event labels (unmapped labels pass through unchanged)."""
        return _map_labels(labels, self.events)

    def map_channels(self, labels: pd.Series) -> pd.Series:
        """Translate the merchant's channel labels (unmapped labels pass through unchanged)."""
        return _map_labels(labels, self.channels)

    def parse_timestamps(self, values: pd.Series) -> pd.Series:
        """Parse timestamps to naive UTC ``datetime64[ns]``; see ``parse_timestamps``."""
        return parse_timestamps(values, fmt=self.timestamp_format, unit=self.timestamp_unit)


MappingLike = ColumnMapping | dict | str | Path | None


def resolve_mapping(mapping: MappingLike) -> ColumnMapping:
    """Accept a ``ColumnMapping``, a decoded dict, a path to ``mapping.json`` or None (identity)."""
    if mapping is None:
        return ColumnMapping()
    if isinstance(mapping, ColumnMapping):
        return mapping
    if isinstance(mapping, dict):
        return ColumnMapping.from_dict(mapping)
    return ColumnMapping.load(mapping)


def parse_timestamps(values: pd.Series, *, fmt: str | None = None, unit: str = "s") -> pd.Series:
    """Parse a column of timestamps into naive UTC ``datetime64[ns]``; NaT marks what failed.

    Numbers (numeric dtype, or numeric-looking strings when no ``fmt`` is given) are epochs in
    ``unit``. Strings are parsed with ``fmt`` if given, else as ISO 8601. Values without a UTC
    offset are taken as UTC; values with one are converted to UTC.
    """
    if isinstance(values.dtype, pd.DatetimeTZDtype):
        return values.dt.tz_convert("UTC").dt.tz_localize(None).astype("datetime64[ns]")
    if pd.api.types.is_datetime64_any_dtype(values.dtype):
        return values.astype("datetime64[ns]")
    if pd.api.types.is_bool_dtype(values.dtype):
        return pd.Series(pd.NaT, index=values.index, dtype="datetime64[ns]")
    if pd.api.types.is_numeric_dtype(values.dtype):
        return _from_epoch(values, unit)
    text = stripped_text(values)
    arr = pa.array(text)
    out = pd.Series(pd.NaT, index=values.index, dtype="datetime64[ns]")
    rest = np.array(pc.not_equal(arr, ""), dtype=bool)
    if fmt is None:
        is_int = _matches(arr, _INT_RE)
        if is_int.any():  # exact integer path: ms/us/ns epochs keep full precision
            ints = pc.cast(pc.filter(arr, pa.array(is_int)), pa.int64()).to_numpy()
            out[is_int] = _from_epoch(pd.Series(ints), unit).to_numpy()
        signed = _matches(arr, r"^[+-]")  # '+7', '-3': neither an epoch nor a date (pandas reads them as years)
        numbers, is_num = parse_numbers(text)
        is_num &= ~is_int & ~signed
        if is_num.any():
            out[is_num] = _from_epoch(pd.Series(numbers[is_num]), unit).to_numpy()
        rest &= ~is_int & ~is_num & ~signed
        if rest.any():
            out[rest] = _naive_utc(pd.to_datetime(text[rest], format="ISO8601", utc=True, errors="coerce"))
        return out
    if rest.any():
        out[rest] = _naive_utc(pd.to_datetime(text[rest], format=fmt, utc=True, errors="coerce"))
    return out


_INT_RE = r"^\d{1,18}$"  # epochs carry no sign: '+7' or '-3' is not a point in time
_NUM_RE = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"


def stripped_text(values: pd.Series) -> pd.Series:
    """Values as pyarrow-backed strings with surrounding whitespace removed; missing becomes ''."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        values = values.astype(object)
    return values.astype("string").fillna("").str.strip()


def parse_numbers(text: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(float64 values, is-a-number mask) for stripped strings.

    Only plain decimal notation counts as a number (``12``, ``-3.5``, ``1e3``); ``inf``, ``nan``,
    ``0x10`` or ``1,5`` do not. One strict rule (not a parser's leniency) keeps the verdict the
    same whatever chunk a value lands in. Parsing is done by pyarrow, so it is fast.
    """
    arr = pa.array(text)
    ok = _matches(arr, _NUM_RE)
    values = np.full(len(text), np.nan)
    if ok.any():
        values[ok] = pc.cast(pc.filter(arr, pa.array(ok)), pa.float64()).to_numpy(zero_copy_only=False)
        ok &= np.isfinite(values)  # '1e999' is decimal notation but not a finite number
    return values, ok


def _matches(arr: pa.Array, pattern: str) -> np.ndarray:
    return np.array(pc.fill_null(pc.match_substring_regex(arr, pattern), False), dtype=bool)


def _from_epoch(numbers: pd.Series, unit: str) -> pd.Series:
    # Non-finite or out-of-range epochs become NaT (reported as unparseable), never an exception.
    # Integers stay integers so that ms/us/ns epochs keep full precision.
    scale = {"s": 1_000_000_000, "ms": 1_000_000, "us": 1_000, "ns": 1}[unit]
    out = np.full(len(numbers), np.datetime64("NaT"), dtype="datetime64[ns]")
    limit = 9.2e18 / scale
    if pd.api.types.is_integer_dtype(numbers.dtype) and not numbers.isna().any():
        arr = numbers.to_numpy(dtype="int64")
        ok = np.abs(arr.astype("float64")) < limit
        out[ok] = (arr[ok] * scale).view("datetime64[ns]")
    else:
        arr = numbers.to_numpy(dtype="float64", na_value=np.nan)
        ok = np.isfinite(arr) & (np.abs(arr) < limit)
        out[ok] = (arr[ok] * scale).round().astype("int64").view("datetime64[ns]")
    return pd.Series(out, index=numbers.index)


def _naive_utc(ts: pd.Series) -> pd.Series:
    return ts.dt.tz_convert("UTC").dt.tz_localize(None).astype("datetime64[ns]")


def _map_labels(labels: pd.Series, table: dict[str, str]) -> pd.Series:
    text = stripped_text(labels)
    if not table:
        return text
    mapped = text.map(table)
    return mapped.where(mapped.notna(), text).astype("string")


def _str_dict(value: Any, key: str, where: str, allowed: frozenset[str]) -> dict[str, str]:
    if not isinstance(value, dict):
        raise IngestError(f"{where}: {key!r} must be an object of their_name -> our_name, got {value!r}")
    out: dict[str, str] = {}
    for theirs, ours in value.items():
        if not isinstance(ours, str) or ours not in allowed:
            raise IngestError(
                f"{where}: {key}[{theirs!r}] maps to {ours!r}, which is not one of {', '.join(sorted(allowed))}"
            )
        out[str(theirs)] = ours
    return out
