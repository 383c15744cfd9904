"""The silo's small files and table writing: ``merchant.json``, finding ``events.*``/``users.*``, atomic writes."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path

import pandas as pd

from fedretain.ingest.readers import TABLE_SUFFIXES
from fedretain.mapping import IngestError

__all__ = ["read_merchant", "find_table", "write_table"]


def read_merchant(path: str | Path) -> dict:
    """Read and check ``merchant.json`` (needs a non-empty ``merchant_id`` and ``data_end`` YYYY-MM-DD)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IngestError(f"{path}: merchant.json not found (every silo needs one)") from None
    except json.JSONDecodeError as exc:
        raise IngestError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise IngestError(f"{path}: cannot read: {exc}") from None
    if not isinstance(data, dict):
        raise IngestError(f"{path}: expected a JSON object, got {type(data).__name__}")
    mid = data.get("merchant_id")
    if not isinstance(mid, str) or not mid.strip():
        raise IngestError(f"{path}: field 'merchant_id' must be a non-empty string, got {mid!r}")
    end = data.get("data_end")
    try:
        if not isinstance(end, str):
            raise ValueError
        date.fromisoformat(end)
        if len(end) != 10:
            raise ValueError
    except ValueError:
        raise IngestError(f"{path}: field 'data_end' must be a date YYYY-MM-DD, got {end!r}") from None
    for key in ("name", "category", "source"):
        if key in data and not isinstance(data[key], str):
            raise IngestError(f"{path}: field {key!r} must be a string, got {data[key]!r}")
    return data


def find_table(folder: str | Path, stem: str) -> Path | None:
    """``<folder>/<stem>.csv`` or ``.parquet``; None if neither; ``IngestError`` if both (ambiguous)."""
    found = [Path(folder) / f"{stem}{suffix}" for suffix in TABLE_SUFFIXES]
    found = [p for p in found if p.is_file()]
    if len(found) > 1:
        raise IngestError(f"{folder}: both {found[0].name} and {found[1].name} exist; keep exactly one")
    return found[0] if found else None


def write_table(df: pd.DataFrame, path: str | Path) -> Path:
    """Write ``df`` as CSV or Parquet (chosen by suffix) atomically: temp file, fsync, ``os.replace``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise ValueError(f"{path}: unsupported table suffix {path.suffix!r} (use .csv or .parquet)")
    with _atomic_file(path) as tmp:
        if suffix == ".csv":
            df.to_csv(tmp, index=False)
        else:
            df.to_parquet(tmp, index=False)
    return path


@contextmanager
def _atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temp path in ``path``'s folder; on success fsync it and ``os.replace`` it onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with tmp.open("rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
