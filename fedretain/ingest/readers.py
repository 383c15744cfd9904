"""Raw tables in bounded batches: CSV (pyarrow's streaming reader) and Parquet (record batches).

Every value of a CSV is read as text, exactly as written, so that validation sees what the
merchant wrote and the quarantine file can hand it back unchanged. Each batch carries the
file's own record numbers (a CSV header is row 1, so the first data row is row 2; a Parquet
file has no header, so its first row is row 1). Memory stays bounded by one batch.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from fedretain.mapping import IngestError

__all__ = ["NeedsSerialRead", "RawBatch", "RawTable", "open_raw", "TABLE_SUFFIXES"]

TABLE_SUFFIXES = (".csv", ".parquet")
CSV_BLOCK_BYTES = 4 << 20  # ~70k event rows per block (bigger blocks measured slower: caches); bounds a batch


@dataclass(frozen=True)
class RawBatch:
    """Raw values of consecutive records and their record numbers in the file."""

    table: pa.Table
    rows: np.ndarray  # int64, one per record, as in the file


@dataclass(frozen=True)
class RawTable:
    """A raw table being read: the file (as named in messages), its columns and its batches."""

    file: str
    columns: list[str]
    batches: Iterator[RawBatch]


def open_raw(path: Path, chunksize: int, *, serial: bool = False) -> RawTable:
    """Open a CSV or Parquet file as a stream of raw batches of at most ``chunksize`` records.

    A CSV is parsed in parallel; if a row has a wrong number of fields, reading raises
    ``NeedsSerialRead`` and the caller starts again with ``serial=True``, which numbers such rows.
    """
    if chunksize < 1:
        raise ValueError(f"chunksize must be >= 1, got {chunksize}")
    if not path.exists():
        raise IngestError(f"{path}: file not found")
    if not path.is_file():
        raise IngestError(f"{path}: not a file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        names = _csv_header(path)
        return RawTable(str(path), names, _rechunk(_csv_batches(path, names, serial), chunksize))
    if suffix == ".parquet":
        return _parquet_open(path, chunksize)
    raise IngestError(f"{path}: unsupported file type {path.suffix!r} (expected .csv or .parquet)")


def _rechunk(batches: Iterator[RawBatch], chunksize: int) -> Iterator[RawBatch]:
    for batch in batches:
        n = batch.table.num_rows
        for start in range(0, n, chunksize):
            yield RawBatch(batch.table.slice(start, chunksize), batch.rows[start:start + chunksize])


# --------------------------------------------------------------------------- CSV


def _csv_header(path: Path) -> list[str]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            header = next(csv.reader(fh), None)
    except UnicodeDecodeError as exc:
        raise IngestError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except (OSError, csv.Error) as exc:
        raise IngestError(f"{path}: cannot read CSV header: {exc}") from None
    if not header or all(not h.strip() for h in header):
        raise IngestError(f"{path}: empty file or empty header row (row 1 must name the columns)")
    names = [h.strip() for h in header]
    dupes = sorted({h for h in names if names.count(h) > 1})
    if dupes:
        raise IngestError(f"{path}: row 1 (header) names column(s) {', '.join(map(repr, dupes))} more than once")
    return names


class _ShortRows:
    """pyarrow's invalid-row handler: rows with too few fields are kept (padded later), too many refuse the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pending: list[tuple[int, str]] = []  # (record number, raw text)
        self.error: IngestError | None = None

    def __call__(self, row: pcsv.InvalidRow) -> str:
        if row.actual_columns > row.expected_columns or row.number is None:
            where = f"row {row.number}" if row.number is not None else "a row"
            self.error = IngestError(f"{self.path}: malformed CSV: {where} has more fields than the header "
                                     "(row 1); quote values that contain the delimiter")
            return "error"
        self.pending.append((int(row.number), row.text))
        return "skip"


def _refuse_parallel(row: pcsv.InvalidRow) -> str:
    return "error"


class NeedsSerialRead(Exception):
    """A row with a wrong number of fields met the parallel reader, which cannot number it: read again serially."""


def _csv_batches(path: Path, names: list[str], serial: bool) -> Iterator[RawBatch]:
    handler = _ShortRows(path) if serial else _refuse_parallel
    text = pa.string()
    try:
        reader = pcsv.open_csv(
            path,
            # parallel parsing unless a row has too few or too many fields: only a serial read numbers it
            read_options=pcsv.ReadOptions(block_size=CSV_BLOCK_BYTES, use_threads=not serial, skip_rows=1,
                                          column_names=[f"c{i}" for i in range(len(names))], encoding="utf8"),
            parse_options=pcsv.ParseOptions(ignore_empty_lines=False, newlines_in_values=True,
                                            invalid_row_handler=handler),
            convert_options=pcsv.ConvertOptions(column_types={f"c{i}": text for i in range(len(names))},
                                                strings_can_be_null=False, quoted_strings_can_be_null=False),
        )
        next_row = 2
        for batch in reader:
            table = pa.Table.from_batches([batch]).rename_columns(names)
            if isinstance(handler, _ShortRows):
                table, rows = _merge_short_rows(table, handler.pending, next_row, names)
                handler.pending = []
            else:
                rows = np.arange(next_row, next_row + table.num_rows, dtype=np.int64)
            next_row += len(rows)
            yield RawBatch(table, rows)
    except IngestError:
        raise
    except pa.ArrowInvalid as exc:
        if not isinstance(handler, _ShortRows):
            raise NeedsSerialRead() from None
        if handler.error is not None:
            raise handler.error from None
        msg = str(exc)
        if "UTF8" in msg or "utf8" in msg or "UTF-8" in msg:
            raise IngestError(f"{path}: not UTF-8 text ({msg.splitlines()[0]})") from None
        raise IngestError(f"{path}: malformed CSV: {msg.strip()}") from None
    except (pa.ArrowException, OSError) as exc:
        raise IngestError(f"{path}: malformed CSV: {str(exc).strip()}") from None


def _merge_short_rows(table: pa.Table, pending: list[tuple[int, str]], first: int,
                      names: list[str]) -> tuple[pa.Table, np.ndarray]:
    """Put rows with missing trailing fields back in place, padded with empty values (as a CSV reader would)."""
    n = table.num_rows + len(pending)
    numbers = np.arange(first, first + n, dtype=np.int64)
    if not pending:
        return table, numbers
    skipped = np.array([r for r, _ in pending], dtype=np.int64)
    values = [next(csv.reader(io.StringIO(t)), []) for _, t in pending]  # only the few short rows
    short = pa.table({c: pa.array([(v[i] if i < len(v) else "") for v in values], pa.string())
                      for i, c in enumerate(names)})
    rows = np.concatenate([numbers[~np.isin(numbers, skipped)], skipped])
    merged = pa.concat_tables([table, short])
    order = np.argsort(rows, kind="stable")
    return merged.take(pa.array(order)), rows[order]


# --------------------------------------------------------------------------- Parquet

_NESTED = (pa.types.is_struct, pa.types.is_list, pa.types.is_large_list, pa.types.is_map,
           pa.types.is_fixed_size_list, pa.types.is_union)


def _parquet_open(path: Path, chunksize: int) -> RawTable:
    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
    except (pa.ArrowException, OSError) as exc:
        raise IngestError(f"{path}: not a readable Parquet file: {exc}") from None
    for fld in schema:
        if any(test(fld.type) for test in _NESTED):
            pf.close()
            raise IngestError(f"{path}: column {fld.name!r} holds nested values ({fld.type}); "
                              "flatten it to plain text or numbers before export")

    def batches() -> Iterator[RawBatch]:
        row = 1
        try:
            for batch in pf.iter_batches(batch_size=chunksize):
                table = pa.Table.from_batches([batch])
                yield RawBatch(table, np.arange(row, row + table.num_rows, dtype=np.int64))
                row += table.num_rows
        except (pa.ArrowException, OSError) as exc:
            raise IngestError(f"{path}: corrupt Parquet data: {exc}") from None
        finally:
            pf.close()

    return RawTable(str(path), list(schema.names), batches())
