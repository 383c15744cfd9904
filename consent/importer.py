"""Read and validate a consent file (CSV or JSONL, format in docs/ARCHITECTURE.md) in bulk.

Everything is column-wise in Arrow (C loops, no Python object per row) so a million rows
take a few seconds: CSV parsing, validation against the vocabulary, timestamp parsing
and formatting, and the canonical JSON of every record. Python touches only the few
*distinct* values of repetitive columns and the rare value that needs stripping or JSON
escaping, and those go through the very functions the record-at-a-time path uses, so
both paths produce byte-identical canonical text. Every problem is reported with the
file, the row and the field, and a file with any bad row is rejected as a whole — the
ledger import that uses this is one transaction.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from operator import methodcaller
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from .records import FIELDS, ConsentRecord, RecordError, _scopes, json_scopes, json_string, to_us
from .vocab import ACTIONS, PURPOSES, VOCAB_VERSION, UnknownTermError

_q = json_string

__all__ = ["ConsentImportError", "Batch", "REQUIRED_COLUMNS", "OPTIONAL_COLUMNS", "read_table", "read_arrow",
           "prepare_table", "prepare_records", "json_inner", "json_quote", "format_us", "canonical_texts",
           "LAYOUT_KEYS", "pack_layout", "unpack_layout", "layout_of"]

REQUIRED_COLUMNS: tuple[str, ...] = ("subject_id", "controller", "purpose", "scopes", "action", "effective_at")
OPTIONAL_COLUMNS: tuple[str, ...] = (
    "record_id", "expires_at", "collection_method", "notice_version", "jurisdiction", "recorded_by",
    "recorded_at", "vocab_version",
)
_MAX_ERRORS = 100
_MAX_TS_US = to_us("9999-12-31T23:59:59.999999Z")
_NAT = np.iinfo(np.int64).min
# A value whose first or last character is not printable non-space ASCII *may* need
# stripping; only those go through Python's str.strip (exact semantics, rare).
_MAYBE_PADDED = r"^[^!-~]|[^!-~]$"
# Characters json.dumps(ensure_ascii=False) escapes: '"', '\\' and controls below 0x20.
_NEEDS_ESCAPE = r'["\\\x00-\x1f]'
_PAD_BYTES = np.zeros(256, dtype=bool)
_PAD_BYTES[:0x21] = _PAD_BYTES[0x7F:] = True  # every whitespace character's UTF-8 uses one of these bytes
_ESC_BYTES = np.zeros(256, dtype=bool)
_ESC_BYTES[:0x20] = _ESC_BYTES[ord('"')] = _ESC_BYTES[ord("\\")] = True
_PAIRS = np.frombuffer("".join(f"{i:02d}" for i in range(100)).encode(), dtype=np.uint8).reshape(100, 2)
_TS_TEMPLATE = np.frombuffer(b"0000-00-00T00:00:00.000000Z", dtype=np.uint8)
_STR = pa.large_string()  # 64-bit offsets: a column of many long texts never overflows
_CHUNK = 1 << 16


class ConsentImportError(ValueError):
    """A consent file was rejected; nothing from it was imported.

    ``errors`` lists ``(row, field, message)`` (at most 100); ``n_errors`` counts all.
    The message names the first bad row and field.
    """

    def __init__(self, file: str, errors: list[tuple[int, str, str]], n_errors: int | None = None) -> None:
        self.file = file
        self.errors = errors
        self.n_errors = len(errors) if n_errors is None else n_errors
        row, fld, msg = errors[0]
        self.row, self.field = row, fld
        where = f"{file}, row {row}" if row else file
        more = f" (and {self.n_errors - 1} more problem(s); nothing was imported)" if self.n_errors > 1 else (
            " (nothing was imported)")
        super().__init__(f"{where}, field {fld!r}: {msg}{more}")


@dataclass
class Batch:
    """Validated records, column-wise, ready for hashing and insertion.

    Columns are Python lists (records entered one at a time) or Arrow arrays (bulk import);
    the ledger converts them once, in the cheapest way for each column.
    """

    rows: np.ndarray  # the source row number of each record (for error messages)
    record_id: Any  # str
    subject_id: Any  # str
    purpose: Any  # str
    action: Any  # str
    scopes: Any  # ';'-joined, sorted; '' = every scope (withdraw/expire)
    effective_us: Any  # int
    expires_us: Any  # int | None
    canonical: Any  # str: canonical JSON, the Merkle leaf
    controller: Any  # str
    layout: Any = None  # int: byte offsets of LAYOUT_KEYS in the canonical text, packed (see pack_layout)

    def __len__(self) -> int:
        return len(self.record_id)


# -- reading ----------------------------------------------------------------------------
def read_table(path: str | Path) -> pd.DataFrame:
    """Read a CSV or JSONL consent file into a frame of stripped text; ``__row__`` numbers rows.

    CSV rows are numbered 1.. after the header; JSONL rows are line numbers.
    """
    return read_arrow(path).to_pandas()


def read_arrow(path: str | Path) -> pa.Table:
    """:func:`read_table` as an Arrow table (no pandas round trip; what the ledger import uses)."""
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise ConsentImportError(name, [(0, "file", f"no such file: {path}")])
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        table = _read_jsonl(path)
    elif suffix in (".csv", ".txt"):
        table = _read_csv(path)
    else:
        raise ConsentImportError(name, [(0, "file", f"unsupported file type {suffix!r} (use .csv or .jsonl)")])
    cols = [c for c in table.column_names if c != "__row__"]
    missing = [c for c in REQUIRED_COLUMNS if c not in cols]
    if missing:
        raise ConsentImportError(name, [(0, missing[0], f"required column(s) missing: {', '.join(missing)}")])
    unknown = [c for c in cols if c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    if unknown:
        raise ConsentImportError(name, [(0, unknown[0], "unknown column (allowed: "
                                         + ", ".join(REQUIRED_COLUMNS + OPTIONAL_COLUMNS) + ")")])
    return table


def _read_csv(path: Path) -> pa.Table:
    name = path.name
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            header = next(csv.reader(fh), None)
    except UnicodeDecodeError as exc:
        raise ConsentImportError(name, [(0, "file", f"not UTF-8 text ({exc.reason} at byte {exc.start})")]) from None
    except csv.Error as exc:
        raise ConsentImportError(name, [(0, "file", f"malformed CSV header: {exc}")]) from None
    if not header:
        raise ConsentImportError(name, [(0, "file", "empty file (expected a header row)")])
    names = [h.strip() for h in header]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConsentImportError(name, [(0, dup[0], "column appears more than once in the header")])
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=1, block_size=1 << 24),
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names}, null_values=[],
                                                 strings_can_be_null=False, quoted_strings_can_be_null=False),
        )
    except pa.ArrowInvalid as exc:
        raise _csv_problem(path, names, exc) from None
    n = table.num_rows
    out = {c: _strip(table.column(c).combine_chunks()) for c in names}
    out["__row__"] = pa.array(np.arange(1, n + 1, dtype=np.int64))
    return pa.table(out)


def _csv_problem(path: Path, names: list[str], exc: Exception) -> ConsentImportError:
    """Name the first bad row of a CSV Arrow refused (the error path only: a Python re-scan)."""
    name = path.name
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh)
            next(reader, None)
            row = 0
            for fields in reader:
                if not fields:
                    continue  # blank line
                row += 1
                if len(fields) != len(names):
                    return ConsentImportError(name, [(row, "line", f"malformed CSV: expected {len(names)} fields, "
                                                                   f"got {len(fields)}")])
    except UnicodeDecodeError as err:
        return ConsentImportError(name, [(0, "file", f"not UTF-8 text ({err.reason} at byte {err.start})")])
    except csv.Error as err:
        return ConsentImportError(name, [(0, "file", f"malformed CSV: {err}")])
    return ConsentImportError(name, [(0, "file", f"malformed CSV: {exc}")])


def _strip(arr: pa.Array) -> pa.Array:
    """Python ``str.strip()`` of every value, exactly, touching in Python only values that may need it."""
    arr = arr.cast(pa.string()) if arr.type != pa.string() else arr
    if len(arr) == 0 or not _any_byte(arr, _PAD_BYTES):
        return arr
    maybe = pc.match_substring_regex(arr, _MAYBE_PADDED)
    if not pc.any(maybe).as_py():
        return arr
    idx = np.flatnonzero(maybe.to_numpy(zero_copy_only=False))
    fixed = pa.array([v.strip() for v in arr.take(pa.array(idx)).to_pylist()], type=arr.type)
    return pc.replace_with_mask(arr, maybe, fixed)


def _any_byte(arr: pa.Array, table: np.ndarray) -> bool:
    """Does any value of a string array contain a byte flagged in the 256-entry ``table``?"""
    validity, offsets, data = arr.buffers()[:3]
    if data is None or len(arr) == 0:
        return False
    off = np.frombuffer(offsets, dtype=np.int64 if pa.types.is_large_string(arr.type) else np.int32)
    off = off[arr.offset : arr.offset + len(arr) + 1]
    return bool(table[np.frombuffer(data, dtype=np.uint8)[off[0] : off[-1]]].any())


def _read_jsonl(path: Path) -> pa.Table:
    recs: list[dict[str, str]] = []
    lines: list[int] = []
    name = path.name
    try:
        fh = path.open(encoding="utf-8")
        with fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ConsentImportError(name, [(lineno, "line", f"not valid JSON: {exc.msg}")]) from None
                if not isinstance(obj, dict):
                    raise ConsentImportError(name, [(lineno, "line", "expected a JSON object per line")])
                recs.append({k: _jsonl_text(name, lineno, k, v) for k, v in obj.items()})
                lines.append(lineno)
    except UnicodeDecodeError as exc:
        raise ConsentImportError(name, [(0, "file", f"not UTF-8 text ({exc.reason})")]) from None
    cols = list(dict.fromkeys(k.strip() for r in recs for k in r)) or list(REQUIRED_COLUMNS)
    out = {}
    for c in cols:
        out[c] = pa.array([r.get(c, "") for r in recs], type=pa.string())
    out["__row__"] = pa.array(np.asarray(lines, dtype=np.int64))
    return pa.table(out)


def _jsonl_text(name: str, row: int, key: str, value: Any) -> str:
    if value is None:
        return ""
    if key == "scopes" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = ";".join(value)
    if not isinstance(value, str):
        raise ConsentImportError(name, [(row, key, f"expected text, got JSON {type(value).__name__} {value!r}")])
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ConsentImportError(name, [(row, key, "is not valid Unicode text (a lone surrogate escape)")]) from None
    return value.strip()


# -- column helpers (shared with the verifier) ------------------------------------------
def json_inner(arr: pa.Array) -> pa.Array:
    """JSON string literal of every value *without its quotes*, byte-identical to json.dumps's.

    Values with nothing to escape are returned as they are (checked in C); the rare value
    that contains a quote, a backslash or a control character goes through json's own encoder.
    The result has the type of ``arr``.
    """
    if len(arr) == 0 or not _any_byte(arr, _ESC_BYTES):
        return arr
    special = pc.match_substring_regex(arr, _NEEDS_ESCAPE)
    idx = pa.array(np.flatnonzero(special.to_numpy(zero_copy_only=False)))
    fixed = pa.array([_q(v)[1:-1] for v in arr.take(idx).to_pylist()], type=arr.type)
    return pc.replace_with_mask(arr, special, fixed)


def json_quote(arr: pa.Array) -> pa.Array:
    """JSON string literal of every value, byte-identical to ``json.dumps(v, ensure_ascii=False)``."""
    arr = arr.cast(_STR) if arr.type != _STR else arr
    return pc.binary_join_element_wise(_lit('"'), json_inner(arr), _lit('"'), _lit(""))


def format_us(us: np.ndarray | Sequence[int], *, quoted: bool = False) -> pa.Array:
    """µs since epoch -> canonical ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (the text of ``records.format_ts``).

    Pure integer arithmetic in numpy (days -> civil date, H. Hinnant's algorithm) writing
    fixed-width ASCII digits, about six times faster than Arrow's ``strftime``. Values
    must lie in 1970..9999 (the importer checks). ``quoted`` adds JSON quotes.
    """
    us = np.asarray(us, dtype=np.int64)
    days = us // 86_400_000_000
    rem = us - days * 86_400_000_000
    z = days + 719_468
    era = z // 146_097
    doe = z - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + np.where(mp < 10, 3, -9)
    year = yoe + era * 400 + (month <= 2)
    secs = rem // 1_000_000
    frac = rem - secs * 1_000_000
    hour = secs // 3600
    minute = (secs - hour * 3600) // 60
    sec = secs - hour * 3600 - minute * 60
    q = 1 if quoted else 0
    width = len(_TS_TEMPLATE) + 2 * q
    out = np.empty((len(us), width), dtype=np.uint8)
    out[:, q : q + len(_TS_TEMPLATE)] = _TS_TEMPLATE
    if quoted:
        out[:, 0] = out[:, -1] = ord('"')
    for pos, v in ((0, year // 100), (2, year % 100), (5, month), (8, day), (11, hour), (14, minute), (17, sec),
                   (20, frac // 10_000), (22, frac // 100 % 100), (24, frac % 100)):
        out[:, q + pos : q + pos + 2] = _PAIRS[v]
    offsets = np.arange(0, width * (len(us) + 1), width, dtype=np.int64)
    return pa.LargeStringArray.from_buffers(len(us), pa.py_buffer(offsets), pa.py_buffer(out))


def _lit(text: str) -> pa.Scalar:
    return pa.scalar(text, type=_STR)


def _take_distinct(values: list[Any], codes: np.ndarray, type_: pa.DataType = _STR) -> pa.Array:
    return pa.array(values, type=type_).take(pa.array(codes))


# Fields whose canonical value is a JSON string; the others (``expires_at``: string or null,
# ``scopes``: array) are given as complete JSON fragments.
_STRING_FIELDS = frozenset(FIELDS) - {"expires_at", "scopes"}


# Keys whose byte offset in the canonical text is stored with each record (the ``layout``
# column): the verifier compares the stored indexed columns, re-encoded, with the text at
# these offsets instead of searching or parsing it. A wrong offset can only fail a
# comparison (each compared fragment starts with its unique ``,"key":`` marker), never
# pass one.
LAYOUT_KEYS: tuple[str, ...] = ("controller", "purpose", "scopes")
_LAYOUT_BITS = 21  # offsets below 2 MiB; a longer text gets layout -1 (verified the slow way)


def pack_layout(offsets: Sequence[np.ndarray]) -> np.ndarray:
    """Pack the byte offsets of :data:`LAYOUT_KEYS` (one array each) into one int64 per record."""
    out = np.zeros(len(offsets[0]), dtype=np.int64)
    ok = np.ones(len(out), dtype=bool)
    for i, off in enumerate(offsets):
        off = np.asarray(off, dtype=np.int64)
        ok &= (off >= 0) & (off < 1 << _LAYOUT_BITS)
        out |= np.where(ok, off, 0) << (_LAYOUT_BITS * i)
    return np.where(ok, out, -1)


def unpack_layout(layout: np.ndarray) -> list[np.ndarray]:
    """Inverse of :func:`pack_layout` (meaningless for -1: callers check)."""
    mask = (1 << _LAYOUT_BITS) - 1
    return [(layout >> (_LAYOUT_BITS * i)) & mask for i in range(len(LAYOUT_KEYS))]


def layout_of(canonical: str) -> int:
    """Packed :data:`LAYOUT_KEYS` offsets of one canonical text (the record-at-a-time path)."""
    data = canonical.encode("utf-8")
    return int(pack_layout([np.array([data.find(b',"' + k.encode() + b'":')]) for k in LAYOUT_KEYS])[0])


def _marker_offsets(values: dict[str, Any]) -> np.ndarray:
    """Packed byte offsets of the :data:`LAYOUT_KEYS` markers in :func:`canonical_texts`' output."""
    n = max((len(v) for v in values.values() if not isinstance(v, pa.Scalar)), default=0)
    pos = np.zeros(n, dtype=np.int64)
    found: dict[str, np.ndarray] = {}
    for lit, name in zip(_literals(), FIELDS):
        if name in LAYOUT_KEYS:
            found[name] = pos + (1 if lit.startswith('"') else 0)
        v = values[name]
        width = (len(v.as_py().encode()) if isinstance(v, pa.Scalar)
                 else pc.binary_length(v).to_numpy(zero_copy_only=False).astype(np.int64))
        pos = pos + len(lit.encode()) + width
    return pack_layout([found[k] for k in LAYOUT_KEYS])


def _literals() -> list[str]:
    """The literal text before each field of :data:`FIELDS` in a canonical text (see canonical_texts)."""
    out = []
    lit = ""
    for i, name in enumerate(FIELDS):
        lit += ("{" if i == 0 else ",") + json.dumps(name) + ":"
        if name in _STRING_FIELDS:
            lit += '"'
        out.append(lit)
        lit = '"' if name in _STRING_FIELDS else ""
    return out


def canonical_texts(values: dict[str, pa.Array]) -> pa.Array:
    """Canonical JSON texts assembled in C, one ``binary_join_element_wise`` over all fields.

    ``values`` maps each string field of :data:`FIELDS` to its JSON-escaped text without
    quotes (:func:`json_inner`), and ``expires_at``/``scopes`` to complete JSON fragments.
    The quotes live in the literal pieces between fields.
    """
    parts: list[Any] = []
    for lit, name in zip(_literals(), FIELDS):
        parts += [_lit(lit), values[name]]
    parts += [_lit(('"' if FIELDS[-1] in _STRING_FIELDS else "") + "}"), _lit("")]  # last literal, separator
    n = max((len(p) for p in parts if not isinstance(p, pa.Scalar)), default=0)
    # in slices: the joined bytes of one slice stay in cache, which halves the time
    chunks = [pc.binary_join_element_wise(*[p if isinstance(p, pa.Scalar) else p.slice(i, _CHUNK) for p in parts])
              for i in range(0, n, _CHUNK)]
    return pa.chunked_array(chunks, type=_STR)


# -- validation ---------------------------------------------------------------------------
def _parse_times(arr: pa.Array, present: np.ndarray) -> np.ndarray:
    """ISO 8601 text -> int64 µs since epoch (UTC); unparseable or absent -> INT64 min.

    Uses the same pandas ISO 8601 parser as ``records.parse_ts``; only present values are parsed.
    """
    out = np.full(len(arr), _NAT, dtype=np.int64)
    if not present.any():
        return out
    idx = np.flatnonzero(present)
    sub = arr.take(pa.array(idx)) if len(idx) < len(arr) else arr
    ts = pd.to_datetime(pd.Series(sub.to_pandas()), utc=True, format="ISO8601", errors="coerce")
    us = ts.dt.tz_localize(None).astype("datetime64[us]").to_numpy().view(np.int64)
    out[idx] = us
    return out


def _table(df: pd.DataFrame | pa.Table) -> pa.Table:
    if isinstance(df, pa.Table):
        return df
    try:
        return pa.Table.from_pandas(df, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ConsentImportError("frame", [(0, "file", f"columns must hold text: {exc}")]) from None


MAX_CLOCK_SKEW_S = 300  # how far a record's effective time may be ahead of this node's clock


def future_limit_us() -> int:
    """Latest effective time accepted now: the node's clock plus :data:`MAX_CLOCK_SKEW_S`."""
    return to_us(datetime.now(timezone.utc)) + MAX_CLOCK_SKEW_S * 1_000_000


def future_message(text: str) -> str:
    """Why a future effective time is refused (a fast clock elsewhere would silently delay e.g. a withdrawal)."""
    clock = datetime.now(timezone.utc).isoformat(timespec='seconds')
    return (f"effective time {text} is ahead of this node's clock ({clock}) "
            f"by more than {MAX_CLOCK_SKEW_S // 60} minutes; a future effective time would silently delay the record "
            "(e.g. a withdrawal). Check the clock of the system that wrote it, or record it when it takes effect")


def prepare_table(
    df: pd.DataFrame | pa.Table,
    *,
    source: str,
    controller: str,
    recorded_at: datetime | None = None,
    default_recorded_by: str = "",
) -> Batch:
    """Validate a table from :func:`read_arrow`/:func:`read_table`; raise ConsentImportError naming row and field."""
    table = _table(df)
    n = table.num_rows
    names = table.column_names
    rows = (table.column("__row__").to_numpy().astype(np.int64) if "__row__" in names
            else np.arange(1, n + 1, dtype=np.int64))
    errors: list[tuple[int, str, str]] = []
    n_err = 0

    def col(name: str, default: str = "") -> pa.Array:
        if name in names:
            arr = table.column(name).combine_chunks()
            try:
                return arr.cast(pa.string()) if arr.type != pa.string() else arr
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise ConsentImportError(source, [(0, name, f"column must hold text, not {arr.type}")]) from None
        return pa.array(np.full(n, default, dtype=object), type=pa.string())

    def flag(mask: np.ndarray, fld: str, msg: Any) -> None:
        nonlocal n_err
        idx = np.flatnonzero(mask)
        n_err += len(idx)
        for i in idx[:_MAX_ERRORS]:
            errors.append((int(rows[i]), fld, msg(i) if callable(msg) else msg))

    def np_bool(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
        return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=bool)

    def value(arr: pa.Array, i: int) -> str:
        return arr[int(i)].as_py()

    subject = col("subject_id")
    flag(np_bool(pc.equal(subject, "")), "subject_id", "must not be empty")
    ctrl = col("controller")
    flag(np_bool(pc.not_equal(ctrl, controller)), "controller",
         lambda i: f"controller {value(ctrl, i)!r} is not this ledger's controller {controller!r}"
         if value(ctrl, i) else "must not be empty")
    purpose = col("purpose")
    flag(~np_bool(pc.is_in(purpose, value_set=pa.array(PURPOSES))), "purpose",
         lambda i: f"unknown purpose {value(purpose, i)!r} (vocabulary {VOCAB_VERSION}: {', '.join(PURPOSES)})")
    action = col("action")
    flag(~np_bool(pc.is_in(action, value_set=pa.array(ACTIONS))), "action",
         lambda i: f"unknown consent action {value(action, i)!r} (expected one of {', '.join(ACTIONS)})")
    is_grant = np_bool(pc.equal(action, "grant"))

    # scopes: few distinct spellings, so validate and encode each once
    s_enc = pc.dictionary_encode(col("scopes"))
    s_codes = s_enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    norm_u: list[tuple[str, ...]] = []
    bad_u: dict[int, str] = {}
    for k, u in enumerate(s_enc.dictionary.to_pylist()):
        try:
            norm_u.append(_scopes(u))
        except (UnknownTermError, RecordError) as err:
            bad_u[k] = str(err).removeprefix("field 'scopes': ")
            norm_u.append(())
    bad_scope = np.isin(s_codes, list(bad_u))
    flag(bad_scope, "scopes", lambda i: bad_u[s_codes[i]])
    empty_u = np.array([not t for t in norm_u], dtype=bool)
    flag(is_grant & ~bad_scope & empty_u[s_codes], "scopes", "a grant must name at least one scope")

    eff_raw = col("effective_at")
    eff_empty = np_bool(pc.equal(eff_raw, ""))
    eff = _parse_times(eff_raw, ~eff_empty)
    flag(eff_empty, "effective_at", "must not be empty")
    flag((eff == _NAT) & ~eff_empty, "effective_at", lambda i: f"not an ISO 8601 timestamp: {value(eff_raw, i)!r}")
    flag((eff != _NAT) & ((eff < 0) | (eff > _MAX_TS_US)), "effective_at", "timestamp outside 1970..9999")
    limit_us = future_limit_us()
    flag((eff != _NAT) & (eff >= 0) & (eff <= _MAX_TS_US) & (eff > limit_us), "effective_at",
         lambda i: future_message(value(eff_raw, i)))

    exp_raw = col("expires_at")
    has_exp = ~np_bool(pc.equal(exp_raw, ""))
    exp = _parse_times(exp_raw, has_exp)
    flag(has_exp & (exp == _NAT), "expires_at", lambda i: f"not an ISO 8601 timestamp: {value(exp_raw, i)!r}")
    flag(has_exp & ~is_grant & (exp != _NAT), "expires_at",
         lambda i: f"only a grant can carry an expiry, not a {value(action, i)!r}")
    flag(has_exp & is_grant & (exp != _NAT) & (eff != _NAT) & (exp <= eff), "expires_at",
         "a grant must expire after it takes effect")
    flag(has_exp & (exp != _NAT) & ((exp < 0) | (exp > _MAX_TS_US)), "expires_at", "timestamp outside 1970..9999")

    now = recorded_at or datetime.now(timezone.utc)
    rec_raw = col("recorded_at")
    rec_has = ~np_bool(pc.equal(rec_raw, ""))
    rec_at = _parse_times(rec_raw, rec_has)
    flag(rec_has & (rec_at == _NAT), "recorded_at", lambda i: f"not an ISO 8601 timestamp: {value(rec_raw, i)!r}")
    flag(rec_has & (rec_at != _NAT) & ((rec_at < 0) | (rec_at > _MAX_TS_US)), "recorded_at",
         "timestamp outside 1970..9999")
    rec_at = np.where(rec_has, rec_at, to_us(now))

    method = col("collection_method")
    notice = col("notice_version")
    juris = col("jurisdiction")
    by = col("recorded_by")
    if default_recorded_by:
        by = pc.if_else(pc.equal(by, ""), default_recorded_by, by)
    vocab = col("vocab_version")
    vocab = pc.if_else(pc.equal(vocab, ""), VOCAB_VERSION, vocab)

    if errors:
        raise ConsentImportError(source, sorted(errors)[:_MAX_ERRORS], n_err)

    source_cols = _Encoder(
        n=n, action=action, method=method, controller=_q(controller)[1:-1], eff=eff, exp=exp, has_exp=has_exp,
        juris=juris, notice=notice, purpose=purpose, rec_at=rec_at, by=by, scope_codes=s_codes,
        scope_joined=[";".join(t) for t in norm_u], scope_json=[json_scopes(t) for t in norm_u], subject=subject,
        vocab=vocab, rid=col("record_id").cast(_STR), ctrl=ctrl,
    )
    rid = source_cols.rid
    missing_id = np_bool(pc.equal(rid, ""))
    distinct = None
    if missing_id.any():
        digests = source_cols.content_digests(missing_id)
        ids = _content_id_text(digests)
        rid = ids if missing_id.all() else pc.replace_with_mask(rid, pa.array(missing_id), ids)
        source_cols.rid = rid
        if missing_id.all():  # distinct 64-bit digest prefixes prove distinct ids (a sort, not a string hash)
            prefix = np.sort(digests[:, :8].copy().view("<u8").reshape(-1))
            distinct = bool((prefix[1:] != prefix[:-1]).all()) or None
    if not (distinct or pc.count_distinct(rid).as_py() == n):
        rid_s = pd.Series(rid.to_pylist())
        dup = rid_s.duplicated(keep="first").to_numpy()
        first_row = pd.Series(rows).groupby(rid_s).transform("first").to_numpy()
        rid_v = rid_s.to_numpy()
        flag(dup, "record_id", lambda i: f"record_id {rid_v[i]!r} repeats row {first_row[i]}"
             + (" (identical consent event)" if missing_id[i] else ""))
        raise ConsentImportError(source, sorted(errors)[:_MAX_ERRORS], n_err)

    return Batch(
        rows=rows,
        record_id=rid,
        subject_id=subject,
        purpose=purpose,
        action=action,
        scopes=pa.DictionaryArray.from_arrays(pa.array(s_codes.astype(np.int32)),
                                              pa.array(source_cols.scope_joined, type=pa.string())),
        effective_us=eff,
        expires_us=pa.array(exp, mask=~has_exp),
        canonical=source_cols,
        controller=ctrl,
    )


@dataclass
class _Encoder:
    """The validated columns of a bulk batch, encoded into canonical JSON a slice at a time.

    Building every canonical text at once would allocate (and page in) half a gigabyte
    per million records; slice by slice, the same few megabytes are reused while the
    ledger hashes and inserts each slice (:meth:`texts`).
    """

    n: int
    action: pa.Array
    method: pa.Array
    controller: str  # JSON-escaped, without quotes: every row was checked to equal it
    eff: np.ndarray
    exp: np.ndarray
    has_exp: np.ndarray
    juris: pa.Array
    notice: pa.Array
    purpose: pa.Array
    rec_at: np.ndarray
    by: pa.Array
    scope_codes: np.ndarray
    scope_joined: list[str]
    scope_json: list[str]
    subject: pa.Array
    vocab: pa.Array
    rid: pa.Array
    ctrl: pa.Array

    def __len__(self) -> int:
        return self.n

    def texts(self, lo: int, hi: int) -> tuple[pa.Array, np.ndarray]:
        """Canonical texts of rows ``lo:hi`` and their packed ``layout`` (see :data:`LAYOUT_KEYS`)."""
        k = hi - lo
        has_exp = self.has_exp[lo:hi]

        def cut(arr: pa.Array) -> pa.Array:
            return arr.slice(lo, k).cast(_STR)

        values = {
            "action": cut(self.action),  # vocabulary terms: nothing to escape
            "collection_method": json_inner(cut(self.method)),
            "controller": _lit(self.controller),
            "effective_at": format_us(self.eff[lo:hi]),
            "expires_at": pc.if_else(pa.array(has_exp), format_us(np.where(has_exp, self.exp[lo:hi], 0), quoted=True),
                                     _lit("null")),
            "jurisdiction": json_inner(cut(self.juris)),
            "notice_version": json_inner(cut(self.notice)),
            "purpose": cut(self.purpose),
            "record_id": json_inner(cut(self.rid)),
            "recorded_at": _format_present(self.rec_at[lo:hi], np.ones(k, dtype=bool)),
            "recorded_by": json_inner(cut(self.by)),
            "scopes": _take_distinct(self.scope_json, self.scope_codes[lo:hi]),
            "subject_id": json_inner(cut(self.subject)),
            "vocab_version": json_inner(cut(self.vocab)),
        }
        return canonical_texts(values).combine_chunks(), _marker_offsets(values)

    def content_digests(self, which: np.ndarray) -> np.ndarray:
        """BLAKE2b-128 digests (rows of 16 bytes) of the content keys of the rows in ``which``.

        The key is the record's fields joined by U+001F: the same event imported twice gets
        the same id and is refused, not doubled. Keys are joined by Arrow, a slice at a time.
        """
        out = []
        digest = methodcaller("digest")
        blake = partial(hashlib.blake2b, digest_size=16)
        for lo in range(0, self.n, _CHUNK):
            hi = min(lo + _CHUNK, self.n)
            keep = which[lo:hi]
            if not keep.any():
                continue
            has_exp = self.has_exp[lo:hi]
            parts = [self.subject.slice(lo, hi - lo), self.ctrl.slice(lo, hi - lo),
                     self.purpose.slice(lo, hi - lo), _take_distinct(self.scope_joined, self.scope_codes[lo:hi]),
                     self.action.slice(lo, hi - lo), format_us(self.eff[lo:hi]),
                     pc.if_else(pa.array(has_exp), format_us(np.where(has_exp, self.exp[lo:hi], 0)), _lit("")),
                     self.method.slice(lo, hi - lo), self.notice.slice(lo, hi - lo), self.juris.slice(lo, hi - lo),
                     self.by.slice(lo, hi - lo)]
            parts = [p.cast(_STR) for p in parts]
            if not keep.all():
                mask = pa.array(keep)
                parts = [p.filter(mask) for p in parts]
            keys = pc.binary_join_element_wise(*parts, _lit("\x1f")).cast(pa.large_binary())
            out.append(b"".join(map(digest, map(blake, keys.to_pylist()))))
        return np.frombuffer(b"".join(out), dtype=np.uint8).reshape(-1, 16)


def _content_id_text(d: np.ndarray) -> pa.Array:
    """``c-<32 hex digits>`` for each 16-byte digest row, built with numpy."""
    hexd = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    text = np.empty((len(d), 34), dtype=np.uint8)
    text[:, 0], text[:, 1] = ord("c"), ord("-")
    text[:, 2::2] = hexd[d >> 4]
    text[:, 3::2] = hexd[d & 15]
    offsets = np.arange(0, 34 * (len(d) + 1), 34, dtype=np.int64)
    return pa.LargeStringArray.from_buffers(len(d), pa.py_buffer(offsets), pa.py_buffer(text))


def _format_present(us: np.ndarray, present: np.ndarray) -> pa.Array:
    """:func:`format_us` of the present values ('' elsewhere)."""
    if not present.any():
        return pa.repeat(_lit(""), len(us))
    vals = us[present]
    if vals.min() == vals.max():  # one value (e.g. every recorded_at of a file): format it once
        txt = pa.repeat(format_us(vals[:1])[0], len(vals))
    else:
        txt = format_us(vals)
    if present.all():
        return txt
    return pc.replace_with_mask(pa.repeat(_lit(""), len(us)), pa.array(present), txt)


def prepare_records(records: list[ConsentRecord], *, controller: str) -> Batch:
    """A batch from record objects (already validated on construction)."""
    limit_us = future_limit_us()
    for i, r in enumerate(records):
        if to_us(r.effective_at) > limit_us:
            raise ConsentImportError("records", [(i + 1, "effective_at", future_message(r.to_dict()["effective_at"]))])
    for i, r in enumerate(records):
        if r.controller != controller:
            raise ConsentImportError("records", [(i + 1, "controller",
                                                  f"controller {r.controller!r} is not this ledger's controller "
                                                  f"{controller!r}")])
    ids = [r.record_id for r in records]
    if len(set(ids)) != len(ids):
        seen: dict[str, int] = {}
        for i, x in enumerate(ids, 1):
            if x in seen:
                raise ConsentImportError("records", [(i, "record_id", f"record_id {x!r} repeats row {seen[x]}")])
            seen[x] = i
    texts = [r.canonical_json() for r in records]
    return Batch(
        rows=np.arange(1, len(records) + 1),
        record_id=ids,
        subject_id=[r.subject_id for r in records],
        purpose=[r.purpose for r in records],
        action=[r.action for r in records],
        scopes=[";".join(r.scopes) for r in records],
        effective_us=[to_us(r.effective_at) for r in records],
        expires_us=[None if r.expires_at is None else to_us(r.expires_at) for r in records],
        canonical=texts,
        controller=[r.controller for r in records],
        layout=[layout_of(t) for t in texts],
    )
