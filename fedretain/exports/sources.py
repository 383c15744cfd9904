"""Reading the files a v2 mapping names, and checking every column it uses against their headers.

Every value is read as text (a shop's ids such as ``00042`` or ``12471.0`` must reach the id
rules unchanged); expressions turn text into numbers where they need them. Files are read whole:
joins and grouping need all rows, and a few hundred thousand order lines are a few hundred MB at most.
"""

from __future__ import annotations

import codecs
import csv
import warnings
from pathlib import Path

import pandas as pd
import pyarrow as pa

from fedretain.exports.expr import check_columns as _check_expr
from fedretain.exports.spec import MappingError, MappingV2, Source, TableSpec


def source_path(folder: Path, src: Source) -> Path:
    return folder / src.file


def first_row(src: Source) -> int:
    """The row number of the first data row as the merchant sees it (CSV header = row 1)."""
    if src.format == "parquet" or src.columns is not None:
        return 1
    return 2


def read_header(folder: Path, src: Source, where: str) -> list[str]:
    """Column names of a source file; ``MappingError`` if the file is missing or unreadable."""
    path = source_path(folder, src)
    if not path.is_file():
        raise MappingError(f"{where}: sources.{src.name}.file: {src.file!r} not found in {folder}")
    if src.format == "parquet":
        import pyarrow.parquet as pq

        try:
            names = list(pq.ParquetFile(path).schema_arrow.names)
        except (pa.ArrowException, OSError) as exc:
            raise MappingError(f"{path}: not a readable Parquet file: {exc}") from None
    elif src.columns is not None:
        names = list(src.columns)
    else:
        try:
            with path.open(newline="", encoding=_encoding(src)) as fh:
                line = fh.readline()
        except UnicodeDecodeError as exc:
            raise MappingError(f"{path}: not {src.encoding} text ({exc.reason} at byte {exc.start}); "
                               f"set sources.{src.name}.encoding (e.g. \"cp1252\")") from None
        if src.format == "whitespace":
            names = line.split()
        else:
            names = [h.strip() for h in next(csv.reader([line], delimiter=src.delimiter), [])]
        if not names or not any(names):
            raise MappingError(f"{path}: empty file or empty header row (row 1 must name the columns)")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise MappingError(f"{path}: column(s) {', '.join(map(repr, dupes))} appear more than once in the header")
    return names


def read_source(folder: Path, src: Source) -> pd.DataFrame:
    """The whole file as a frame of text (missing values are ''); blank lines stay rows, so row numbers match."""
    path = source_path(folder, src)
    if src.format == "parquet":
        return _read_parquet(path)
    header = None if src.columns is not None else 0
    sep = r"\s+" if src.format == "whitespace" else src.delimiter
    try:
        with warnings.catch_warnings():  # a row with more fields than the header must not lose values silently
            warnings.simplefilter("error", pd.errors.ParserWarning)
            df = pd.read_csv(path, dtype=str, na_filter=False, keep_default_na=False, sep=sep, header=header,
                             names=list(src.columns) if src.columns else None, index_col=False,
                             encoding=_encoding(src), engine="c", skip_blank_lines=False)
    except pd.errors.ParserWarning as exc:
        raise MappingError(f"{path}: malformed file: a row has more fields than the header ({exc}); "
                           "quote values that contain the delimiter") from None
    except UnicodeDecodeError as exc:
        raise MappingError(f"{path}: not {src.encoding} text ({exc.reason} at byte {exc.start}); "
                           f"set sources.{src.name}.encoding (e.g. \"cp1252\")") from None
    except (pd.errors.ParserError, ValueError, OSError) as exc:
        raise MappingError(f"{path}: malformed file: {str(exc).strip()}") from None
    df.columns = [str(c).strip() for c in df.columns]
    return df.reset_index(drop=True)


def _encoding(src: Source) -> str:
    """utf-8 files may start with a byte-order mark (spreadsheets write one)."""
    return "utf-8-sig" if codecs.lookup(src.encoding).name == "utf-8" else src.encoding


def _read_parquet(path: Path) -> pd.DataFrame:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise MappingError(f"{path}: corrupt Parquet data: {exc}") from None
    out = {}
    for name, col in zip(table.column_names, table.columns):
        if pa.types.is_nested(col.type):
            raise MappingError(f"{path}: column {name!r} holds {col.type} values (nested); "
                               "flatten it to plain values before mapping it")
        s = col.to_pandas()
        if pd.api.types.is_datetime64_any_dtype(s.dtype):
            if getattr(s.dt, "tz", None) is not None:
                s = s.dt.tz_convert("UTC").dt.tz_localize(None)
            text = s.dt.strftime("%Y-%m-%dT%H:%M:%S.%f")
        else:
            text = s.astype("string")
        out[name] = text.fillna("").astype(object)
    return pd.DataFrame(out)


def check_all_columns(spec: MappingV2, headers: dict[str, list[str]]) -> None:
    """Every column an expression, join or group reads must exist; ``MappingError`` names the key."""
    for table in (spec.events, spec.users):
        if table is not None:
            _check_table(spec, table, headers)


def _check_table(spec: MappingV2, t: TableSpec, headers: dict[str, list[str]]) -> None:
    where = spec.where
    files = {name: s.file for name, s in spec.sources.items()}
    sources = set(spec.sources)
    pool: dict[str | None, set[str]] = {name: set(cols) for name, cols in headers.items()}
    main = set(headers[t.source])

    def need(expr, key: str, local: set[str]) -> None:
        known = dict(pool)
        known[None] = local
        for source, column in expr.columns:  # unqualified names of joined files resolve when unique
            if source is None and column not in local:
                owners = [j.source for j in t.joins if column in pool[j.source]]
                if len(owners) == 1:
                    local = local | {column}
                    known[None] = local
        msg = _check_expr(expr, known, sources)
        if msg is not None:
            file = files.get(t.source)
            raise MappingError(f"{where}: {key}: {msg}" + (f" (columns of {file}: {', '.join(sorted(main))})"
                                                           if "unknown column" in msg else ""))

    def need_right(key: str, source: str, column: str) -> None:
        if column not in pool[source]:
            raise MappingError(f"{where}: {key}: unknown column {column!r} in {files[source]} "
                               f"(columns: {', '.join(headers[source])})")

    local = set(main)
    for j in t.joins:
        need(j.left, f"{j.key}.on", local)
        need_right(f"{j.key}.{'right_on' if j.right != j.left.text else 'on'}", j.source, j.right)
    for a in t.aggregates:
        need(a.left, f"{a.key}.on", local)
        need_right(f"{a.key}.{'right_on' if a.right != a.left.text else 'on'}", a.source, a.right)
        child = set(headers[a.source])
        for name, e in {**a.sums, **a.firsts}.items():
            kind = "sum" if name in a.sums else "first"
            msg = _check_expr(e, {None: child}, set())
            if msg is not None:
                raise MappingError(f"{where}: {a.key}.{kind}.{name}: {msg} (columns of {files[a.source]}: "
                                   f"{', '.join(headers[a.source])})")
        local |= set(a.sums) | set(a.firsts) | ({a.count} if a.count else set())
    for name, e in t.derive.items():
        need(e, f"{t.kind}.derive.{name}", local)
        local = local | {name}
    for name, e in t.skip.items():
        need(e, f"{t.kind}.skip.{name}", local)
    for name, e in t.fields.items():
        need(e, f"{t.kind}.fields.{name}", local)
    for i, e in enumerate(t.group_by):
        need(e, f"{t.kind}.group.by[{i}]", local)
