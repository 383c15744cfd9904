"""The quarantine file: rejected rows with their original values, where they were and why.

Columns: the file's own columns (values as read, unchanged), then ``_source_file``, ``_row``,
``_field`` (';'-joined fields of every problem of the row) and ``_reason`` ('; '-joined reasons).
Rows are in file order. The file is written to a temp file beside the target and renamed into place
on commit; with no rejected rows a stale quarantine file from an earlier run is removed, so the
file on disk always matches the latest ingest.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from types import TracebackType
from typing import IO

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.csv as pcsv

__all__ = ["Quarantine", "META_COLUMNS"]

META_COLUMNS = ("_source_file", "_row", "_field", "_reason")


def _frame(raw: pl.DataFrame, source: str, rows: np.ndarray, fields: pl.Series, reasons: pl.Series) -> pl.DataFrame:
    out = raw.with_columns(pl.all().cast(pl.String))
    return out.with_columns(
        pl.lit(source).alias("_source_file"), pl.Series("_row", rows).cast(pl.String),
        fields.alias("_field"), reasons.alias("_reason"),
    )


class Quarantine:
    """Streams rejected rows to a temp file; rows found late (duplicates) are merged in by row number."""

    def __init__(self, path: Path):
        self.path = path
        self._tmp: Path | None = None
        self._fh: IO[bytes] | None = None
        self._late: list[pl.DataFrame] = []
        self._columns: list[str] | None = None

    def __enter__(self) -> Quarantine:
        return self

    def _open(self) -> IO[bytes]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self._tmp = Path(tmp)
        return os.fdopen(fd, "wb")

    def write(self, raw: pl.DataFrame, source: str, rows: np.ndarray, fields: pl.Series, reasons: pl.Series) -> None:
        """Append rejected rows, in file order."""
        frame = _frame(raw, source, rows, fields, reasons)
        header = self._fh is None
        if self._fh is None:
            self._fh = self._open()
            self._columns = frame.columns
        frame.write_csv(self._fh, include_header=header)

    def write_late(self, raw: pl.DataFrame, source: str, rows: np.ndarray, fields: pl.Series,
                   reasons: pl.Series) -> None:
        """Rows rejected after the stream ended (sorted by row); merged into file order on commit."""
        if len(rows):
            self._late.append(_frame(raw, source, rows, fields, reasons))

    def commit(self) -> Path | None:
        """Rename the finished file into place (or remove a stale one); the path, or None if empty."""
        if self._late:
            self._merge_late()
        if self._fh is None:
            if self.path.is_file():
                self.path.unlink()
            return None
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None
        assert self._tmp is not None
        os.replace(self._tmp, self.path)
        self._tmp = None
        return self.path

    def _merge_late(self) -> None:
        late = pl.concat(self._late).sort(pl.col("_row").cast(pl.Int64))
        self._late = []
        if self._fh is None:
            self._fh = self._open()
            late.write_csv(self._fh)
            return
        self._fh.close()
        first, self._tmp = self._tmp, None
        assert first is not None and self._columns is not None
        self._fh = self._open()
        try:
            late_rows = late.get_column("_row").cast(pl.Int64).to_numpy()
            taken, header = 0, True
            text = pa.string()
            reader = pcsv.open_csv(first, read_options=pcsv.ReadOptions(block_size=8 << 20),
                                   convert_options=pcsv.ConvertOptions(
                                       column_types={c: text for c in self._columns},
                                       strings_can_be_null=False, quoted_strings_can_be_null=False))
            for batch in reader:
                part = pl.from_arrow(pa.Table.from_batches([batch]))
                assert isinstance(part, pl.DataFrame)
                last = int(part.get_column("_row").cast(pl.Int64).max())
                upto = int(np.searchsorted(late_rows, last, side="right"))
                if upto > taken:
                    part = pl.concat([part, late.slice(taken, upto - taken)]).sort(pl.col("_row").cast(pl.Int64))
                    taken = upto
                part.write_csv(self._fh, include_header=header)
                header = False
            late.slice(taken).write_csv(self._fh, include_header=header)
        finally:
            first.unlink(missing_ok=True)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None
