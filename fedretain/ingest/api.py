"""Read and validate a merchant silo: schema, column mapping, row checks and a quarantine file.

Why it is strict: everything downstream (consent gate, features, DP training) trusts these
frames. A bad row is never guessed at and never silently dropped: it is rejected, counted by
reason, listed with file/row/field in ``IngestReport.problems`` and copied, values unchanged,
into a quarantine CSV so the merchant can fix and re-send it.

Files are read in batches (``readers``), validated column-wise (``rules``, polars), de-duplicated
by 128-bit row hashes (``dedupe``) and the rejected rows streamed to the quarantine file
(``quarantine``); memory stays bounded by the canonical output plus ~32 bytes per accepted row
(row keys and numbers) and the few batches in flight (``engine.WORKERS`` + 1).
The raw events table of a silo is obtained in exactly one place, ``read_raw_events``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TypeAlias

import pandas as pd
import pyarrow as pa

from fedretain.ingest import engine
from fedretain.ingest.files import find_table, read_merchant
from fedretain.ingest.frames import events_frame, users_frame
from fedretain.ingest.readers import NeedsSerialRead, RawTable, open_raw
from fedretain.ingest.report import IngestReport
from fedretain.ingest.rules import EventRules, UserRules
from fedretain.mapping import ColumnMapping, IngestError, MappingLike, resolve_mapping
from fedretain.schema import canonical_users, empty_users

__all__ = ["DEFAULT_CHUNKSIZE", "Silo", "load_silo", "read_events", "read_raw_events", "read_users",
           "validate_events"]

DEFAULT_CHUNKSIZE = 1_000_000  # records per batch (a CSV block of ~32 MiB holds about half that)

NowLike: TypeAlias = datetime | str | pd.Timestamp | None


@dataclass
class Silo:
    """What a merchant node works on: validated events and users plus their ingest reports."""

    path: Path
    merchant: dict
    events: pd.DataFrame
    users: pd.DataFrame
    report: IngestReport
    users_report: IngestReport | None = None
    mapping: ColumnMapping | None = None

    @property
    def merchant_id(self) -> str:
        return str(self.merchant["merchant_id"])

    @property
    def consent_path(self) -> Path | None:
        """``consent.csv`` of the silo if it exists, else None."""
        p = self.path / "consent.csv"
        return p if p.is_file() else None


def read_raw_events(path: str | Path, mapping: MappingLike = None, *,
                    chunksize: int = DEFAULT_CHUNKSIZE, serial: bool = False) -> RawTable:
    """The raw events table of a silo, as a stream of batches (the one place it is obtained).

    Mapping v1 (``mapping.json``: renames and label maps) is applied by the validation that follows,
    so here the file is read as it is. ``mapping`` is accepted so that richer mappings (several
    files, joins, derived fields) can build their raw table here instead.
    """
    del mapping  # v1 mappings act in validation; see the docstring
    return open_raw(Path(path), chunksize, serial=serial)


def validate_events(raw: RawTable | Callable[[bool], RawTable], *, mapping: MappingLike = None, now: NowLike = None,
                    quarantine_path: str | Path | None = None) -> tuple[pd.DataFrame, IngestReport]:
    """Validate and canonicalise a raw events table; see ``read_events``.

    ``raw`` may be a function ``serial -> RawTable`` so that a CSV with ragged rows can be read again
    serially (see ``readers.open_raw``); a plain ``RawTable`` is read once.
    """
    df, report = _run(raw, EventRules(_naive_utc_now(now)), resolve_mapping(mapping), quarantine_path)
    return events_frame(df), report


def _run(raw: RawTable | Callable[[bool], RawTable], rules: EventRules | UserRules, mapping: ColumnMapping,
         quarantine_path: str | Path | None) -> tuple[list[pa.Table], IngestReport]:
    table = raw if isinstance(raw, RawTable) else raw(False)
    try:
        return engine.run(table, rules, mapping, _quarantine_path(table.file, quarantine_path))
    except NeedsSerialRead:
        if isinstance(raw, RawTable):
            raise IngestError(f"{raw.file}: malformed CSV: a row has a wrong number of fields") from None
        table = raw(True)
        return engine.run(table, rules, mapping, _quarantine_path(table.file, quarantine_path))


def read_events(
    path: str | Path,
    *,
    mapping: MappingLike = None,
    now: NowLike = None,
    quarantine_path: str | Path | None = None,
    chunksize: int = DEFAULT_CHUNKSIZE,
) -> tuple[pd.DataFrame, IngestReport]:
    """Read, validate and canonicalise an events file (CSV or Parquet).

    Rejected rows go to ``quarantine_path`` (default ``<file's folder>/quarantine/<stem>.rejected.csv``),
    written atomically; when nothing is rejected no quarantine file is left there.
    Raises ``IngestError`` for file-level problems (missing file or required column, corrupt file).
    """
    cmap = resolve_mapping(mapping)
    return validate_events(lambda serial: read_raw_events(path, cmap, chunksize=chunksize, serial=serial),
                           mapping=cmap, now=_naive_utc_now(now), quarantine_path=quarantine_path)


def read_users(
    path: str | Path,
    *,
    mapping: MappingLike = None,
    quarantine_path: str | Path | None = None,
    chunksize: int = DEFAULT_CHUNKSIZE,
) -> tuple[pd.DataFrame, IngestReport]:
    """Read, validate and canonicalise a users file (CSV or Parquet); see ``read_events``."""
    df, report = _run(lambda serial: open_raw(Path(path), chunksize, serial=serial), UserRules(),
                      resolve_mapping(mapping), quarantine_path)
    return users_frame(df), report


def load_silo(
    path: str | Path,
    *,
    mapping: MappingLike = None,
    now: NowLike = None,
    quarantine_dir: str | Path | None = None,
    chunksize: int = DEFAULT_CHUNKSIZE,
) -> Silo:
    """Read a silo folder: ``merchant.json``, ``events.*``, optional ``users.*`` and ``mapping.json``.

    ``mapping`` (a path, dict or ``ColumnMapping``) overrides the silo's ``mapping.json``.
    Quarantine files go to ``quarantine_dir`` (default ``<silo>/quarantine``). Users seen only
    in events are added to ``users`` with unknown (missing) attributes and counted in
    ``report.n_users_without_attributes``; users without events are kept.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise IngestError(f"{folder}: silo folder not found" if not folder.exists() else f"{folder}: not a folder")
    merchant = read_merchant(folder / "merchant.json")
    from fedretain.exports import export_silo  # mapping v2 (a shop's own export files); imports this package

    exported = export_silo(folder, merchant, mapping, now=now, quarantine_dir=quarantine_dir, chunksize=chunksize)
    if exported is not None:
        return exported
    events_path = find_table(folder, "events")
    if events_path is None:
        raise IngestError(f"{folder}: no events file (expected events.csv or events.parquet)")
    users_path = find_table(folder, "users")
    if mapping is None and (folder / "mapping.json").is_file():
        mapping = folder / "mapping.json"
    cmap = resolve_mapping(mapping)
    qdir = Path(quarantine_dir) if quarantine_dir is not None else folder / "quarantine"
    events, report = validate_events(  # the hook for richer mappings: build the raw table here
        lambda serial: read_raw_events(events_path, cmap, chunksize=chunksize, serial=serial),
        mapping=cmap, now=now, quarantine_path=qdir / "events.rejected.csv")
    users_report = None
    if users_path is not None:
        users, users_report = read_users(
            users_path, mapping=cmap, quarantine_path=qdir / "users.rejected.csv", chunksize=chunksize
        )
    else:
        users = empty_users()
    event_users = pd.Index(events["user_id"].unique()).dropna()
    missing = event_users.difference(pd.Index(users["user_id"]))
    report.n_users_without_attributes = int(len(missing))
    if len(missing):
        extra = canonical_users(pd.DataFrame({"user_id": pd.Series(missing, dtype="string")}))
        users = pd.concat([users, extra], ignore_index=True) if len(users) else extra
    return Silo(folder, merchant, events, users, report, users_report, cmap)


def _quarantine_path(file: str, given: str | Path | None) -> Path:
    if given is not None:
        return Path(given)
    path = Path(file)
    return path.parent / "quarantine" / f"{path.stem}.rejected.csv"


def _naive_utc_now(now: NowLike) -> pd.Timestamp:
    """``now`` as a naive UTC timestamp (default: the current time)."""
    ts = pd.Timestamp.now(tz="UTC") if now is None else pd.Timestamp(now)
    if ts.tzinfo is not None:
        ts = ts.tz_convert("UTC").tz_localize(None)
    return ts
