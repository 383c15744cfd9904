"""Reading a consent file (CSV or JSONL, format in docs/ARCHITECTURE.md) into Arrow columns of text.

Columns are checked against the import format (required and known columns) and every
value is stripped exactly as Python's ``str.strip`` would, touching in Python only the
rare value that may need it. Problems name the file, the row and the field
(:class:`ConsentImportError`); validation of the values is :mod:`.importer`'s job.
"""

from __future__ import annotations

import csv
import json
import mmap
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

__all__ = ["ConsentImportError", "REQUIRED_COLUMNS", "OPTIONAL_COLUMNS", "read_table", "read_arrow"]

REQUIRED_COLUMNS: tuple[str, ...] = ("subject_id", "controller", "purpose", "scopes", "action", "effective_at")
OPTIONAL_COLUMNS: tuple[str, ...] = (
    "record_id", "expires_at", "collection_method", "notice_version", "jurisdiction", "recorded_by",
    "recorded_at", "vocab_version",
)
# A value whose first or last character is not printable non-space ASCII *may* need
# stripping; only those go through Python's str.strip (exact semantics, rare).
_MAYBE_PADDED = r"^[^!-~]|[^!-~]$"
_PAD_BYTES = np.zeros(256, dtype=bool)
_PAD_BYTES[:0x21] = _PAD_BYTES[0x7F:] = True  # every whitespace character's UTF-8 uses one of these bytes




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
            parse_options=pacsv.ParseOptions(newlines_in_values=_has_quote(path)),
            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names}, null_values=[],
                                                 strings_can_be_null=False, quoted_strings_can_be_null=False),
        )
    except pa.ArrowInvalid as exc:
        raise _csv_problem(path, names, exc) from None
    n = table.num_rows
    out = {c: _strip(table.column(c).combine_chunks()) for c in names}
    out["__row__"] = pa.array(np.arange(1, n + 1, dtype=np.int64))
    return pa.table(out)


def _has_quote(path: Path) -> bool:
    """Does the file contain a double quote? Without one no value can hold a line break, and Arrow
    then parses without tracking quoted newlines (a quarter less CPU on a plain export)."""
    try:
        with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return mm.find(b'"') >= 0
    except (OSError, ValueError):  # empty or unmappable: keep the careful setting
        return True


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
    if len(arr) == 0 or not _edge_padded(arr):
        return arr
    maybe = pc.match_substring_regex(arr, _MAYBE_PADDED)
    if not pc.any(maybe).as_py():
        return arr
    idx = np.flatnonzero(maybe.to_numpy(zero_copy_only=False))
    fixed = pa.array([v.strip() for v in arr.take(pa.array(idx)).to_pylist()], type=arr.type)
    return pc.replace_with_mask(arr, maybe, fixed)


def _edge_padded(arr: pa.Array) -> bool:
    """Does any value start or end with a byte of :data:`_PAD_BYTES`? (Only the ends can need stripping.)

    Reads two bytes per value instead of every byte; the exact test is ``_MAYBE_PADDED``.
    """
    _, offsets, data = arr.buffers()[:3]
    if data is None:
        return False
    off = np.frombuffer(offsets, dtype=np.int64 if pa.types.is_large_string(arr.type) else np.int32)
    off = off[arr.offset : arr.offset + len(arr) + 1].astype(np.int64)
    nonempty = off[1:] > off[:-1]
    raw = np.frombuffer(data, dtype=np.uint8)
    return bool(_PAD_BYTES[raw[off[:-1][nonempty]]].any() or _PAD_BYTES[raw[off[1:][nonempty] - 1]].any())


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
