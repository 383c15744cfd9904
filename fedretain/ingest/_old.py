"""Read and validate a merchant silo: schema, column mapping, row checks and a quarantine file.

Why it is strict: everything downstream (consent gate, features, DP training) trusts these
frames. A bad row is never guessed at and never silently dropped: it is rejected, counted by
reason, listed with file/row/field in ``IngestReport.problems`` and copied, values unchanged,
into a quarantine CSV so the merchant can fix and re-send it.

Row numbers (the ``row`` of every ``Problem`` and the ``_row`` quarantine column) are 1-based
record numbers *as in the file*: in a CSV the header is row 1, so the first data row is row 2
(equal to the line number unless a quoted value spans lines); in a Parquet file, which has no
header row, the first data row is row 1.

Files are read in chunks (CSV via pandas ``chunksize``, Parquet by record batches) so memory
stays bounded by the compact canonical output plus 24 bytes per accepted row for duplicate
detection, which works across chunks.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from fedretain.mapping import ColumnMapping, IngestError, MappingLike, parse_numbers, resolve_mapping, stripped_text
from fedretain.schema import (
    CHANNELS,
    EVENT_COLUMNS,
    EVENT_TYPES,
    MEMBER_TIERS,
    MONETARY_EVENTS,
    REFERRALS,
    USER_COLUMNS,
    Column,
    canonical_events,
    canonical_users,
    empty_events,
    empty_users,
)

__all__ = [
    "DEFAULT_CHUNKSIZE",
    "IngestError",
    "IngestReport",
    "Problem",
    "Silo",
    "find_table",
    "load_silo",
    "read_events",
    "read_merchant",
    "read_users",
    "write_table",
]

DEFAULT_CHUNKSIZE = 100_000
MAX_EXAMPLES_PER_REASON = 20  # Problem records kept per (field, reason); counts are always complete
TABLE_SUFFIXES = (".csv", ".parquet")
DUPLICATE_ROW = "duplicate row"
DUPLICATE_USER = "duplicate user_id"


@dataclass(frozen=True)
class Problem:
    """One rejected value: where it is (file, row, field), why (reason), and what it was (value).

    ``row`` is numbered as in the file: in a CSV the header is row 1 (first data row = row 2),
    in Parquet the first row is row 1. ``field`` is the file's own column name, or ``"*"`` for
    the whole row (blank or duplicate rows). ``reason`` is a short key also used in
    ``IngestReport.rejected_by_reason``; ``detail`` adds specifics such as the row duplicated.
    """

    file: str
    row: int
    field: str
    reason: str
    value: str = ""
    detail: str = ""

    @property
    def message(self) -> str:
        """A one-line, human-readable description naming file, row and field."""
        text = f"{self.file}: row {self.row}, field {self.field!r}: {self.reason}"
        if self.detail:
            text += f" ({self.detail})"
        if self.value:
            text += f"; value {self.value!r}"
        return text

    def __str__(self) -> str:
        return self.message


@dataclass
class IngestReport:
    """What happened to every row of one file. ``rows_read == rows_accepted + rows_rejected``.

    ``rejected_by_reason`` counts each rejected row once, under its first problem in check order
    (so the counts sum to ``rows_rejected``); the quarantine file lists all of a row's problems.
    """

    file: str
    kind: str  # "events" | "users"
    rows_read: int = 0
    rows_accepted: int = 0
    rows_rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    date_min: pd.Timestamp | None = None
    date_max: pd.Timestamp | None = None
    n_users: int = 0
    quarantine_path: Path | None = None
    problems: list[Problem] = field(default_factory=list)
    event_counts: dict[str, int] = field(default_factory=dict)
    ignored_columns: list[str] = field(default_factory=list)
    n_users_without_attributes: int | None = None

    @property
    def date_range(self) -> tuple[pd.Timestamp, pd.Timestamp] | None:
        """(first, last) accepted event time, or None when nothing was accepted."""
        if self.date_min is None or self.date_max is None:
            return None
        return (self.date_min, self.date_max)

    @property
    def ok(self) -> bool:
        """True when no row was rejected."""
        return self.rows_rejected == 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable view (timestamps as ISO 8601 strings)."""
        return {
            "file": self.file,
            "kind": self.kind,
            "rows_read": self.rows_read,
            "rows_accepted": self.rows_accepted,
            "rows_rejected": self.rows_rejected,
            "rejected_by_reason": dict(self.rejected_by_reason),
            "date_min": None if self.date_min is None else self.date_min.isoformat(),
            "date_max": None if self.date_max is None else self.date_max.isoformat(),
            "n_users": self.n_users,
            "n_users_without_attributes": self.n_users_without_attributes,
            "event_counts": dict(self.event_counts),
            "ignored_columns": list(self.ignored_columns),
            "quarantine_path": None if self.quarantine_path is None else str(self.quarantine_path),
            "problems": [
                {"file": p.file, "row": p.row, "field": p.field, "reason": p.reason, "value": p.value,
                 "detail": p.detail, "message": p.message}
                for p in self.problems
            ],
        }


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


# --------------------------------------------------------------------------- public API


def read_events(
    path: str | Path,
    *,
    mapping: MappingLike = None,
    now: datetime | str | pd.Timestamp | None = None,
    quarantine_path: str | Path | None = None,
    chunksize: int = DEFAULT_CHUNKSIZE,
) -> tuple[pd.DataFrame, IngestReport]:
    """Read, validate and canonicalise an events file (CSV or Parquet).

    Rejected rows go to ``quarantine_path`` (default ``<file's folder>/quarantine/<stem>.rejected.csv``),
    written atomically; when nothing is rejected no quarantine file is left there.
    Raises ``IngestError`` for file-level problems (missing file or required column, corrupt file).
    """
    now_ts = _naive_utc_now(now)
    return _ingest(Path(path), _EventRules(now_ts), resolve_mapping(mapping), quarantine_path, chunksize)


def read_users(
    path: str | Path,
    *,
    mapping: MappingLike = None,
    quarantine_path: str | Path | None = None,
    chunksize: int = DEFAULT_CHUNKSIZE,
) -> tuple[pd.DataFrame, IngestReport]:
    """Read, validate and canonicalise a users file (CSV or Parquet); see ``read_events``."""
    return _ingest(Path(path), _UserRules(), resolve_mapping(mapping), quarantine_path, chunksize)


def load_silo(
    path: str | Path,
    *,
    mapping: MappingLike = None,
    now: datetime | str | pd.Timestamp | None = None,
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
    events_path = find_table(folder, "events")
    if events_path is None:
        raise IngestError(f"{folder}: no events file (expected events.csv or events.parquet)")
    users_path = find_table(folder, "users")
    if mapping is None and (folder / "mapping.json").is_file():
        mapping = folder / "mapping.json"
    cmap = resolve_mapping(mapping)
    qdir = Path(quarantine_dir) if quarantine_dir is not None else folder / "quarantine"
    events, report = read_events(
        events_path, mapping=cmap, now=now, quarantine_path=qdir / "events.rejected.csv", chunksize=chunksize
    )
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


# --------------------------------------------------------------------------- validation rules


@dataclass
class _Check:
    """One failed-rule mask over a chunk; ``detail`` may be a per-row array (duplicates)."""

    field: str
    reason: str
    mask: np.ndarray
    values: pd.Series | None = None
    detail: str | np.ndarray = ""


class _Chunk:
    """A raw chunk plus the canonical→file column name map, with helpers shared by the rules."""

    def __init__(self, raw: pd.DataFrame, names: dict[str, str]):
        self.raw = raw
        self.names = names  # canonical name -> column name in the file
        self.n = len(raw)

    def has(self, name: str) -> bool:
        return name in self.names

    def label(self, name: str) -> str:
        """The field name to report: the file's own column name (the merchant's vocabulary)."""
        return self.names.get(name, name)

    def col(self, name: str) -> pd.Series:
        if name in self.names:
            return self.raw[self.names[name]]
        return pd.Series([pd.NA] * self.n, index=self.raw.index, dtype="string")

    def text(self, name: str) -> pd.Series:
        """Stripped text, missing as ''."""
        return _text(self.col(name))

    def blank_rows(self, user_empty: np.ndarray) -> np.ndarray:
        """Rows whose every value is empty (only rows with an empty user_id can be)."""
        blank = user_empty.copy()
        if not blank.any():
            return blank
        sub = self.raw[blank]
        all_empty = np.ones(len(sub), dtype=bool)
        for col in sub.columns:
            all_empty &= _text(sub[col]).eq("").to_numpy(dtype=bool)
        blank[blank] = all_empty
        return blank

    def number(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(values, missing, not_a_number): '' is missing; text that is not a finite number is bad."""
        s = self.col(name)
        if pd.api.types.is_bool_dtype(s.dtype):
            s = s.astype("string")
        if pd.api.types.is_numeric_dtype(s.dtype):
            values = s.to_numpy(dtype="float64", na_value=np.nan)
            missing = np.isnan(values)
            return values, missing, np.isinf(values)
        text = _text(s)
        missing = text.eq("").to_numpy(dtype=bool)
        values, ok = parse_numbers(text)
        return values, missing, ~missing & ~ok


class _EventRules:
    kind = "events"
    columns: tuple[Column, ...] = EVENT_COLUMNS
    duplicate_reason = DUPLICATE_ROW

    def __init__(self, now: pd.Timestamp):
        self.now = now

    def validate(self, c: _Chunk, mapping: ColumnMapping) -> tuple[list[_Check], pd.DataFrame]:
        user = c.text("user_id")
        user_empty = user.eq("").to_numpy(dtype=bool)
        checks = [_Check("*", "blank row", c.blank_rows(user_empty))]
        checks.append(_Check(c.label("user_id"), "empty user_id", user_empty, c.col("user_id")))

        ts_raw = c.col("ts")
        ts = mapping.parse_timestamps(ts_raw)
        ts_missing = _text(ts_raw).eq("").to_numpy(dtype=bool)
        nat = ts.isna().to_numpy(dtype=bool)
        checks.append(_Check(c.label("ts"), "missing timestamp", ts_missing, ts_raw))
        checks.append(_Check(c.label("ts"), "unparseable timestamp", nat & ~ts_missing, ts_raw,
                             _ts_hint(mapping)))
        checks.append(_Check(c.label("ts"), "future timestamp", (ts > self.now).to_numpy(dtype=bool), ts_raw,
                             f"later than now = {self.now.isoformat()} UTC"))

        event = mapping.map_events(c.col("event")).fillna("")
        checks.append(_Check(c.label("event"), "unknown event label", ~event.isin(EVENT_TYPES).to_numpy(dtype=bool),
                             c.col("event"), f"expected one of {', '.join(EVENT_TYPES)}, or map it in mapping.json"))

        amount, a_missing, a_bad = c.number("amount")
        with np.errstate(invalid="ignore"):
            a_neg = ~a_bad & (amount < 0)
            monetary = event.isin(sorted(MONETARY_EVENTS)).to_numpy(dtype=bool)
            a_nonpos = monetary & ~a_bad & ~a_neg & (a_missing | (amount <= 0))
        checks.append(_Check(c.label("amount"), "non-numeric amount", a_bad, c.col("amount")))
        checks.append(_Check(c.label("amount"), "negative amount", a_neg, c.col("amount")))
        checks.append(_Check(c.label("amount"), "purchase/refund amount must be > 0", a_nonpos, c.col("amount")))

        watch, _, w_bad = c.number("watch_seconds")
        with np.errstate(invalid="ignore"):
            w_neg = ~w_bad & (watch < 0)
        checks.append(_Check(c.label("watch_seconds"), "non-numeric watch_seconds", w_bad, c.col("watch_seconds")))
        checks.append(_Check(c.label("watch_seconds"), "negative watch_seconds", w_neg, c.col("watch_seconds")))

        channel = mapping.map_channels(c.col("channel")).fillna("")
        ch_bad = channel.ne("").to_numpy(dtype=bool) & ~channel.isin(CHANNELS).to_numpy(dtype=bool)
        checks.append(_Check(c.label("channel"), "unknown channel", ch_bad, c.col("channel"),
                             f"expected one of {', '.join(CHANNELS)}, empty, or map it in mapping.json"))

        clean = pd.DataFrame(
            {
                "user_id": user,
                "ts": ts,
                "event": event,
                "item_id": _na_if_empty(c.text("item_id")),
                "category": _na_if_empty(c.text("category")),
                "amount": np.where(np.isnan(amount), 0.0, amount),
                "watch_seconds": np.where(np.isnan(watch), 0.0, watch),
                "channel": _na_if_empty(channel),
            },
            index=c.raw.index,
        )
        return checks, clean

    def duplicate_keys(self, c: _Chunk) -> np.ndarray:
        """An exact duplicate is a row whose file values are all equal to an earlier row's."""
        return _hash128(c.raw)

    @staticmethod
    def canonical(clean: pd.DataFrame) -> pd.DataFrame:
        return canonical_events(clean)

    @staticmethod
    def empty() -> pd.DataFrame:
        return empty_events()


class _UserRules:
    kind = "users"
    columns: tuple[Column, ...] = USER_COLUMNS
    duplicate_reason = DUPLICATE_USER

    def validate(self, c: _Chunk, mapping: ColumnMapping) -> tuple[list[_Check], pd.DataFrame]:
        user = c.text("user_id")
        user_empty = user.eq("").to_numpy(dtype=bool)
        checks = [_Check("*", "blank row", c.blank_rows(user_empty))]
        checks.append(_Check(c.label("user_id"), "empty user_id", user_empty, c.col("user_id")))
        referral = c.text("referral")
        checks.append(_Check(c.label("referral"), "unknown referral",
                             referral.ne("").to_numpy(dtype=bool) & ~referral.isin(REFERRALS).to_numpy(dtype=bool),
                             c.col("referral"), f"expected one of {', '.join(REFERRALS)} or empty"))
        tier = c.text("member_tier")
        checks.append(_Check(c.label("member_tier"), "unknown member_tier",
                             tier.ne("").to_numpy(dtype=bool) & ~tier.isin(MEMBER_TIERS).to_numpy(dtype=bool),
                             c.col("member_tier"), f"expected one of {', '.join(MEMBER_TIERS)} or empty"))
        city, city_missing, city_bad = c.number("city_tier")
        with np.errstate(invalid="ignore"):
            out_of_range = ~city_missing & ~city_bad & ((city < 1) | (city > 5) | (city != np.round(city)))
        checks.append(_Check(c.label("city_tier"), "non-numeric city_tier", city_bad, c.col("city_tier")))
        checks.append(_Check(c.label("city_tier"), "city_tier out of 1..5", out_of_range, c.col("city_tier"),
                             "expected an integer 1..5 or empty"))
        ok_city = ~city_missing & ~city_bad & ~out_of_range
        clean = pd.DataFrame(
            {
                "user_id": user,
                "referral": _na_if_empty(referral),
                "member_tier": _na_if_empty(tier),
                "city_tier": pd.arrays.IntegerArray(np.where(ok_city, np.nan_to_num(city), 0).astype("int64"), ~ok_city),
            },
            index=c.raw.index,
        )
        return checks, clean

    def duplicate_keys(self, c: _Chunk) -> np.ndarray:
        """A user may appear once: the key is the (stripped) user_id."""
        return _hash128(c.text("user_id").to_frame())

    @staticmethod
    def canonical(clean: pd.DataFrame) -> pd.DataFrame:
        return canonical_users(clean)

    @staticmethod
    def empty() -> pd.DataFrame:
        return empty_users()


# --------------------------------------------------------------------------- engine


def _ingest(
    path: Path,
    rules: _EventRules | _UserRules,
    mapping: ColumnMapping,
    quarantine_path: str | Path | None,
    chunksize: int,
) -> tuple[pd.DataFrame, IngestReport]:
    if chunksize < 1:
        raise ValueError(f"chunksize must be >= 1, got {chunksize}")
    file = str(path)
    columns, chunks, first_row = _open_table(path, chunksize)
    renamed = mapping.rename(columns, file=file)
    names = {ours: theirs for theirs, ours in renamed.items()}
    known = {c.name for c in rules.columns}
    missing = [c.name for c in rules.columns if c.required and c.name not in names]
    if missing:
        hint = " (map your column names in mapping.json 'columns')" if mapping.columns == {} else ""
        raise IngestError(
            f"{file}: missing required column(s) {', '.join(missing)} for a {rules.kind} file; "
            f"found columns: {', '.join(columns) or '(none)'}{hint}"
        )
    report = IngestReport(file=file, kind=rules.kind)
    report.ignored_columns = [theirs for theirs, ours in renamed.items() if ours not in known]
    qpath = Path(quarantine_path) if quarantine_path is not None else path.parent / "quarantine" / f"{path.stem}.rejected.csv"
    seen = _SeenKeys()
    examples: dict[tuple[str, str], int] = {}
    accepted: list[pd.DataFrame] = []
    row = first_row
    with _Quarantine(qpath) as quarantine:
        for raw in chunks:
            raw = raw.reset_index(drop=True)
            rows = np.arange(row, row + len(raw), dtype=np.int64)
            row += len(raw)
            chunk = _Chunk(raw, names)
            checks, clean = rules.validate(chunk, mapping)
            blank = checks[0].mask  # a blank row is one problem, not one per column
            for check in checks[1:]:
                check.mask = check.mask & ~blank
            bad = np.zeros(len(raw), dtype=bool)
            for check in checks:
                bad |= check.mask
            dup_of = seen.check_and_add(rules.duplicate_keys(chunk), rows, ~bad)
            is_dup = dup_of >= 0
            dup_field = "*" if rules.kind == "events" else chunk.label("user_id")
            dup_detail = np.array([f"same as row {r}" if r >= 0 else "" for r in dup_of[is_dup]], dtype=object)
            dup_full = np.full(len(raw), "", dtype=object)
            dup_full[is_dup] = dup_detail
            checks.append(_Check(dup_field, rules.duplicate_reason, is_dup,
                                 None if rules.kind == "events" else chunk.col("user_id"), dup_full))
            bad |= is_dup
            report.rows_read += len(raw)
            report.rows_rejected += int(bad.sum())
            report.rows_accepted += int((~bad).sum())
            if bad.any():
                _record(report, examples, checks, bad, rows, file)
                quarantine.write(raw[bad], file, rows[bad], *_row_reasons(checks, bad))
            if not bad.any():
                accepted.append(rules.canonical(clean))
            elif not bad.all():
                accepted.append(rules.canonical(clean[~bad]))
        report.quarantine_path = quarantine.commit()
    report.problems.sort(key=lambda p: p.row)  # stable: check order within a row
    if len(accepted) > 1:
        df = pd.concat(accepted, ignore_index=True)
    else:
        df = accepted[0] if accepted else rules.empty()
    _summarise(report, df)
    return df, report


def _record(report: IngestReport, examples: dict, checks: list[_Check], bad: np.ndarray,
            rows: np.ndarray, file: str) -> None:
    """Count rejected rows by first reason; keep up to MAX_EXAMPLES_PER_REASON problems per reason."""
    stacked = np.vstack([c.mask for c in checks])
    first = np.argmax(stacked[:, bad], axis=0)
    for idx, count in zip(*np.unique(first, return_counts=True)):
        reason = checks[idx].reason
        report.rejected_by_reason[reason] = report.rejected_by_reason.get(reason, 0) + int(count)
    for check in checks:
        key = (check.field, check.reason)
        room = MAX_EXAMPLES_PER_REASON - examples.get(key, 0)
        if room <= 0 or not check.mask.any():
            continue
        where = np.flatnonzero(check.mask)[:room]
        examples[key] = examples.get(key, 0) + len(where)
        for i in where:
            value = "" if check.values is None else _cell(check.values.iloc[i])
            detail = check.detail if isinstance(check.detail, str) else str(check.detail[i])
            report.problems.append(Problem(file, int(rows[i]), check.field, check.reason, value, detail))


def _row_reasons(checks: list[_Check], bad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All problems of each rejected row, in check order, as ';'-joined fields and '; '-joined reasons."""
    n = int(bad.sum())
    fields = np.full(n, "", dtype=object)
    reasons = np.full(n, "", dtype=object)
    for check in checks:
        m = check.mask[bad]
        if not m.any():
            continue
        detail = check.detail
        if isinstance(detail, str):
            text = np.full(int(m.sum()), check.reason + (f" ({detail})" if detail else ""), dtype=object)
        else:
            text = np.array([f"{check.reason} ({d})" if d else check.reason for d in detail[bad][m]], dtype=object)
        sep_f = np.where(fields[m] == "", "", ";")
        sep_r = np.where(reasons[m] == "", "", "; ")
        fields[m] = fields[m] + sep_f + check.field
        reasons[m] = reasons[m] + sep_r + text
    return fields, reasons


def _summarise(report: IngestReport, df: pd.DataFrame) -> None:
    report.n_users = int(df["user_id"].nunique()) if len(df) else 0
    if report.kind == "events" and len(df):
        report.date_min = pd.Timestamp(df["ts"].min())
        report.date_max = pd.Timestamp(df["ts"].max())
        counts = df["event"].value_counts(sort=False)
        report.event_counts = {str(k): int(v) for k, v in counts.items() if v > 0}


# --------------------------------------------------------------------------- readers


def _open_table(path: Path, chunksize: int) -> tuple[list[str], Iterator[pd.DataFrame], int]:
    """(column names, iterator of raw chunks, number of the first data row) for a CSV or Parquet file."""
    if not path.exists():
        raise IngestError(f"{path}: file not found")
    if not path.is_file():
        raise IngestError(f"{path}: not a file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _csv_header(path), _csv_chunks(path, chunksize), 2
    if suffix == ".parquet":
        return *_parquet_open(path, chunksize), 1
    raise IngestError(f"{path}: unsupported file type {path.suffix!r} (expected .csv or .parquet)")


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


def _csv_chunks(path: Path, chunksize: int) -> Iterator[pd.DataFrame]:
    # index_col=False: a row with more fields than the header must not silently become the index.
    # pandas then only *warns* about the lost values; that warning is turned into an error here.
    try:
        reader = pd.read_csv(
            path, dtype=str, na_filter=False, keep_default_na=False, skip_blank_lines=False, index_col=False,
            chunksize=chunksize, encoding="utf-8-sig", engine="c",
        )
        with reader:
            while True:
                with warnings.catch_warnings():
                    warnings.simplefilter("error", pd.errors.ParserWarning)
                    try:
                        chunk = next(reader)
                    except StopIteration:
                        return
                chunk.columns = [str(c).strip() for c in chunk.columns]
                yield chunk
    except pd.errors.ParserWarning:
        raise IngestError(f"{path}: malformed CSV: row 2 has more fields than the header (row 1); "
                          "quote values that contain the delimiter") from None
    except UnicodeDecodeError as exc:
        raise IngestError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except (pd.errors.ParserError, ValueError, OSError) as exc:
        raise IngestError(f"{path}: malformed CSV: {str(exc).strip()}") from None


def _parquet_open(path: Path, chunksize: int) -> tuple[list[str], Iterator[pd.DataFrame]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        names = list(pf.schema_arrow.names)
    except (pa.ArrowException, OSError) as exc:
        raise IngestError(f"{path}: not a readable Parquet file: {exc}") from None

    def batches() -> Iterator[pd.DataFrame]:
        try:
            for batch in pf.iter_batches(batch_size=chunksize):
                yield batch.to_pandas()
        except (pa.ArrowException, OSError) as exc:
            raise IngestError(f"{path}: corrupt Parquet data: {exc}") from None
        finally:
            pf.close()

    return names, batches()


# --------------------------------------------------------------------------- duplicates


class _SeenKeys:
    """128-bit row keys seen so far, with the row each first appeared on; works across chunks.

    Keys are ``(n, 2)`` uint64 arrays. Segments sorted by the first word and merged like a binary
    counter keep lookups at O(log n) segments and memory at 24 bytes per key (a Python dict
    would take ~100). The second word is always compared too, so a lookup is exact for 128 bits.
    """

    def __init__(self) -> None:
        self._segments: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (hi sorted, lo, row)

    def check_and_add(self, keys: np.ndarray, rows: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """For each candidate row, the row it duplicates (or -1); new candidates are remembered."""
        dup_of = np.full(len(keys), -1, dtype=np.int64)
        idx = np.flatnonzero(candidates)
        if not len(idx):
            return dup_of
        k = keys[idx]
        found = np.full(len(idx), -1, dtype=np.int64)
        for seg in self._segments:
            found = np.where(found < 0, self._lookup(seg, k), found)
        new = found < 0
        if new.any():
            new_keys, new_rows = k[new], rows[idx[new]]
            _, first, inverse = np.unique(np.ascontiguousarray(new_keys).view("S16").ravel(),
                                          return_index=True, return_inverse=True)
            first_pos = first[inverse.ravel()]
            within = first_pos != np.arange(len(new_keys))
            sub = found[new]
            sub[within] = new_rows[first_pos[within]]
            found[new] = sub
            self._add(new_keys[first], new_rows[first])
        dup_of[idx] = found
        return dup_of

    @staticmethod
    def _lookup(seg: tuple[np.ndarray, np.ndarray, np.ndarray], k: np.ndarray) -> np.ndarray:
        hi, lo, row = seg
        out = np.full(len(k), -1, dtype=np.int64)
        left = np.searchsorted(hi, k[:, 0], side="left")
        right = np.searchsorted(hi, k[:, 0], side="right")
        for offset in range(int((right - left).max(initial=0))):  # almost always 0 or 1 pass
            pos = left + offset
            live = (pos < right) & (out < 0)
            pos_c = np.minimum(pos, len(hi) - 1)
            hit = live & (lo[pos_c] == k[:, 1])
            out[hit] = row[pos_c[hit]]
        return out

    def _add(self, keys: np.ndarray, rows: np.ndarray) -> None:
        order = np.argsort(keys[:, 0], kind="stable")
        self._segments.append((keys[order, 0], keys[order, 1], rows[order]))
        while len(self._segments) > 1 and 2 * len(self._segments[-1][0]) >= len(self._segments[-2][0]):
            b, a = self._segments.pop(), self._segments.pop()
            hi = np.concatenate([a[0], b[0]])
            order = np.argsort(hi, kind="stable")  # two sorted runs: the merge sort sees them, O(n)
            self._segments.append((hi[order], np.concatenate([a[1], b[1]])[order], np.concatenate([a[2], b[2]])[order]))


_HASH_KEYS = ("fedretain-ing-k1", "fedretain-ing-k2")  # 16 bytes each, as pandas requires
_SEP = pa.scalar("\x1f", pa.large_string())


def _hash128(frame: pd.DataFrame) -> np.ndarray:
    """A 128-bit key per row (``(n, 2)`` uint64), equal for rows with equal values (collision odds ~n²/2¹²⁸).

    The row's values are joined into one string (pyarrow) and hashed twice; the second hash also
    mixes in every value's length (-1 for null), so ('a,b', 'c') and ('a', 'b,c') stay distinct
    even if a value contains the separator. One joined string hashes ~6x faster than 8 columns.
    """
    cols, mix = [], np.zeros(len(frame), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for name in frame.columns:
            col = frame[name]
            if isinstance(col.dtype, pd.CategoricalDtype):
                col = col.astype(object)
            arr = pa.array(col, from_pandas=True)
            if not pa.types.is_large_string(arr.type):
                arr = pc.cast(arr, pa.large_string())
            cols.append(arr)
            length = np.array(pc.fill_null(pc.utf8_length(arr), -1), dtype=np.int64).astype(np.uint64)
            mix = (mix ^ length) * np.uint64(0x100000001B3)
    joined = pc.binary_join_element_wise(*cols, _SEP, null_handling="replace", null_replacement="")
    text = np.asarray(joined.to_numpy(zero_copy_only=False), dtype=object)
    h1 = pd.util.hash_array(text, hash_key=_HASH_KEYS[0], categorize=False)
    h2 = pd.util.hash_array(text, hash_key=_HASH_KEYS[1], categorize=False) ^ mix
    return np.stack([h1, h2], axis=1)


# --------------------------------------------------------------------------- quarantine & files


class _Quarantine:
    """Streams rejected rows to a temp file next to ``path``; ``commit`` renames it into place.

    With no rejected rows, a stale quarantine file from an earlier run is removed so the file on
    disk always matches the latest ingest. On an exception the temp file is deleted.
    """

    def __init__(self, path: Path):
        self.path = path
        self._tmp: Path | None = None
        self._fh = None

    def __enter__(self) -> "_Quarantine":
        return self

    def write(self, raw: pd.DataFrame, source: str, rows: np.ndarray, fields: np.ndarray, reasons: np.ndarray) -> None:
        out = raw.copy()
        out["_source_file"] = source
        out["_row"] = rows
        out["_field"] = fields
        out["_reason"] = reasons
        header = self._fh is None
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            self._tmp = Path(tmp)
            self._fh = os.fdopen(fd, "w", newline="", encoding="utf-8")
        out.to_csv(self._fh, header=header, index=False)

    def commit(self) -> Path | None:
        if self._fh is None:
            if self.path.is_file():
                self.path.unlink()
            return None
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None
        os.replace(self._tmp, self.path)  # type: ignore[arg-type]
        self._tmp = None
        return self.path

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None


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


# --------------------------------------------------------------------------- small helpers


_text = stripped_text


def _na_if_empty(s: pd.Series) -> pd.Series:
    s = s.astype("string")
    return s.where(s.ne(""), pd.NA)


def _cell(value: Any, limit: int = 200) -> str:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return ""
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _ts_hint(mapping: ColumnMapping) -> str:
    if mapping.timestamp_format:
        return f"expected format {mapping.timestamp_format!r} or epoch {mapping.timestamp_unit}"
    return f"expected ISO 8601 or epoch {mapping.timestamp_unit}, or set timestamp_format in mapping.json"


def _naive_utc_now(now: datetime | str | pd.Timestamp | None) -> pd.Timestamp:
    """``now`` as a naive UTC timestamp (default: the current time)."""
    ts = pd.Timestamp.now(tz="UTC") if now is None else pd.Timestamp(now)
    if ts.tzinfo is not None:
        ts = ts.tz_convert("UTC").tz_localize(None)
    return ts

