"""Read and validate a consent file (CSV or JSONL, format in docs/ARCHITECTURE.md) in bulk.

Validation is vectorised (pandas) so a million rows take seconds; every problem is
reported with the file, the row and the field, and a file with any bad row is rejected
as a whole — the ledger import that uses this is one transaction.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from .records import (
    ConsentRecord,
    RecordError,
    _scopes,
    fill_canonical,
    json_scopes,
    json_string,
    to_us,
)
from .vocab import ACTIONS, PURPOSES, VOCAB_VERSION, UnknownTermError

_q = json_string

__all__ = ["ConsentImportError", "Batch", "REQUIRED_COLUMNS", "OPTIONAL_COLUMNS", "read_table", "prepare_table",
           "prepare_records"]

REQUIRED_COLUMNS: tuple[str, ...] = ("subject_id", "controller", "purpose", "scopes", "action", "effective_at")
OPTIONAL_COLUMNS: tuple[str, ...] = (
    "record_id", "expires_at", "collection_method", "notice_version", "jurisdiction", "recorded_by",
    "recorded_at", "vocab_version",
)
_MAX_ERRORS = 100
_MAX_TS_US = to_us("9999-12-31T23:59:59.999999Z")


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
    """Validated records, column-wise, ready for hashing and insertion."""

    rows: np.ndarray  # the source row number of each record (for error messages)
    record_id: list[str]
    subject_id: list[str]
    purpose: list[str]
    action: list[str]
    scopes: list[str]  # ';'-joined, sorted; '' = every scope (withdraw/expire)
    effective_us: list[int]
    expires_us: list[int | None]
    canonical: list[str]
    controller: list[str]

    def __len__(self) -> int:
        return len(self.record_id)


# -- reading ----------------------------------------------------------------------------
def read_table(path: str | Path) -> pd.DataFrame:
    """Read a CSV or JSONL consent file into a frame of stripped text; ``__row__`` numbers rows.

    CSV rows are numbered 1.. after the header; JSONL rows are line numbers.
    """
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise ConsentImportError(name, [(0, "file", f"no such file: {path}")])
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        df = _read_jsonl(path)
    elif suffix in (".csv", ".txt"):
        df = _read_csv(path)
    else:
        raise ConsentImportError(name, [(0, "file", f"unsupported file type {suffix!r} (use .csv or .jsonl)")])
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ConsentImportError(name, [(0, missing[0], f"required column(s) missing: {', '.join(missing)}")])
    unknown = [c for c in df.columns if c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS + ("__row__",)]
    if unknown:
        raise ConsentImportError(name, [(0, unknown[0], "unknown column (allowed: "
                                         + ", ".join(REQUIRED_COLUMNS + OPTIONAL_COLUMNS) + ")")])
    return df


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8",
                         skipinitialspace=False)
    except UnicodeDecodeError as exc:
        raise ConsentImportError(path.name, [(0, "file", f"not UTF-8 text ({exc.reason} at byte {exc.start})")]) from None
    except pd.errors.EmptyDataError:
        raise ConsentImportError(path.name, [(0, "file", "empty file (expected a header row)")]) from None
    except pd.errors.ParserError as exc:
        raise ConsentImportError(path.name, [(0, "file", f"malformed CSV: {exc}")]) from None
    df.columns = [str(c).strip() for c in df.columns]
    for c in df.columns:
        df[c] = df[c].astype(str).str.strip()
    df["__row__"] = np.arange(1, len(df) + 1)
    return df


def _read_jsonl(path: Path) -> pd.DataFrame:
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
    cols = list(dict.fromkeys(k for r in recs for k in r)) or list(REQUIRED_COLUMNS)
    df = pd.DataFrame({c: [r.get(c, "") for r in recs] for c in cols}, dtype=object)
    for c in cols:
        df[c] = df[c].astype(str).str.strip()
    df["__row__"] = np.asarray(lines, dtype=np.int64)
    return df


def _jsonl_text(name: str, row: int, key: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if key == "scopes" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ";".join(value)
    raise ConsentImportError(name, [(row, key, f"expected text, got JSON {type(value).__name__} {value!r}")])


# -- validation ---------------------------------------------------------------------------
def _parse_times(col: pd.Series) -> np.ndarray:
    """ISO 8601 text -> int64 µs since epoch (UTC); unparseable -> INT64 min."""
    ts = pd.to_datetime(col, utc=True, format="ISO8601", errors="coerce")
    us = ts.dt.tz_localize(None).astype("datetime64[us]").to_numpy()
    return us.view(np.int64)


def prepare_table(
    df: pd.DataFrame,
    *,
    source: str,
    controller: str,
    recorded_at: datetime | None = None,
    default_recorded_by: str = "",
) -> Batch:
    """Validate a frame from :func:`read_table`; raise ConsentImportError naming row and field."""
    n = len(df)
    rows = df["__row__"].to_numpy(dtype=np.int64) if "__row__" in df else np.arange(1, n + 1)
    errors: list[tuple[int, str, str]] = []
    n_err = 0

    def col(name: str, default: str = "") -> pd.Series:
        return df[name] if name in df else pd.Series([default] * n, index=df.index, dtype=object)

    def flag(mask: np.ndarray, fld: str, msg: Any) -> None:
        nonlocal n_err
        idx = np.flatnonzero(mask)
        n_err += len(idx)
        for i in idx[:_MAX_ERRORS]:
            errors.append((int(rows[i]), fld, msg(i) if callable(msg) else msg))

    subject = col("subject_id")
    flag((subject == "").to_numpy(), "subject_id", "must not be empty")
    ctrl = col("controller")
    ctrl_v = ctrl.to_numpy(dtype=object)
    flag((ctrl != controller).to_numpy(), "controller",
         lambda i: f"controller {ctrl_v[i]!r} is not this ledger's controller {controller!r}"
         if ctrl_v[i] else "must not be empty")
    purpose = col("purpose")
    purpose_v = purpose.to_numpy(dtype=object)
    flag((~purpose.isin(PURPOSES)).to_numpy(), "purpose",
         lambda i: f"unknown purpose {purpose_v[i]!r} (vocabulary {VOCAB_VERSION}: {', '.join(PURPOSES)})")
    action = col("action")
    action_v = action.to_numpy(dtype=object)
    flag((~action.isin(ACTIONS)).to_numpy(), "action",
         lambda i: f"unknown consent action {action_v[i]!r} (expected one of {', '.join(ACTIONS)})")
    is_grant = (action == "grant").to_numpy()

    # scopes: few distinct spellings, so validate and encode each once
    s_codes, s_uniq = pd.factorize(col("scopes").to_numpy(dtype=object))
    norm_u: list[tuple[str, ...]] = []
    bad_u: dict[int, str] = {}
    for k, u in enumerate(s_uniq):
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
    eff = _parse_times(eff_raw)
    nat = np.iinfo(np.int64).min
    eff_empty = (eff_raw == "").to_numpy()
    flag(eff_empty, "effective_at", "must not be empty")
    eff_v = eff_raw.to_numpy(dtype=object)
    flag((eff == nat) & ~eff_empty, "effective_at", lambda i: f"not an ISO 8601 timestamp: {eff_v[i]!r}")
    flag((eff != nat) & ((eff < 0) | (eff > _MAX_TS_US)), "effective_at", "timestamp outside 1970..9999")

    exp_raw = col("expires_at")
    exp_v = exp_raw.to_numpy(dtype=object)
    has_exp = (exp_raw != "").to_numpy()
    exp = _parse_times(exp_raw)
    flag(has_exp & (exp == nat), "expires_at", lambda i: f"not an ISO 8601 timestamp: {exp_v[i]!r}")
    flag(has_exp & ~is_grant & (exp != nat), "expires_at",
         lambda i: f"only a grant can carry an expiry, not a {action_v[i]!r}")
    flag(has_exp & is_grant & (exp != nat) & (eff != nat) & (exp <= eff), "expires_at",
         "a grant must expire after it takes effect")
    flag(has_exp & (exp != nat) & ((exp < 0) | (exp > _MAX_TS_US)), "expires_at", "timestamp outside 1970..9999")

    now = recorded_at or datetime.now(timezone.utc)
    rec_at_raw = col("recorded_at")
    rec_at = _parse_times(rec_at_raw)
    rec_has = (rec_at_raw != "").to_numpy()
    rec_v = rec_at_raw.to_numpy(dtype=object)
    flag(rec_has & (rec_at == nat), "recorded_at", lambda i: f"not an ISO 8601 timestamp: {rec_v[i]!r}")
    flag(rec_has & (rec_at != nat) & ((rec_at < 0) | (rec_at > _MAX_TS_US)), "recorded_at",
         "timestamp outside 1970..9999")
    rec_at = np.where(rec_has, rec_at, to_us(now))

    method = col("collection_method")
    notice = col("notice_version")
    juris = col("jurisdiction")
    by = col("recorded_by")
    if default_recorded_by:
        by = by.where(by != "", default_recorded_by)
    vocab = col("vocab_version")
    vocab = vocab.where(vocab != "", VOCAB_VERSION)

    if errors:
        raise ConsentImportError(source, sorted(errors)[:_MAX_ERRORS], n_err)

    scopes_joined = np.array([";".join(t) for t in norm_u], dtype=object)[s_codes]
    eff_txt = _format_us(eff)
    exp_txt = np.where(has_exp, _format_us(np.where(has_exp, exp, 0)), "")

    rid = col("record_id").to_numpy(dtype=object).copy()
    missing_id = rid == ""
    if missing_id.any():
        # content-derived ids: importing the same file twice is refused, not doubled
        # (the key is joined by Arrow in C; one 128-bit BLAKE2b per row)
        keep = pa.array(missing_id)
        parts = [pa.array(p, type=pa.large_string()).filter(keep) for p in (
            subject, ctrl, purpose, scopes_joined, action, eff_txt, exp_txt, method, notice, juris, by)]
        keys = pc.binary_join_element_wise(*parts, pa.scalar("\x1f", pa.large_string()))
        b2 = hashlib.blake2b
        rid[missing_id] = ["c-" + b2(k, digest_size=16).hexdigest()
                           for k in keys.cast(pa.large_binary()).to_pylist()]
    rid_s = pd.Series(rid)
    dup = rid_s.duplicated(keep="first").to_numpy()
    if dup.any():
        first_row = pd.Series(rows).groupby(rid_s).transform("first").to_numpy()
        flag(dup, "record_id", lambda i: f"record_id {rid[i]!r} repeats row {first_row[i]}"
             + (" (identical consent event)" if missing_id[i] else ""))
        raise ConsentImportError(source, sorted(errors)[:_MAX_ERRORS], n_err)

    exp_json = np.where(has_exp, _json_strings(exp_txt, unique=False), "null")
    canonical = fill_canonical([
        _json_strings(action),
        _json_strings(method),
        _json_strings(ctrl),
        _json_strings(eff_txt, unique=False),
        exp_json.tolist(),
        _json_strings(juris),
        _json_strings(notice),
        _json_strings(purpose),
        _json_strings(rid, unique=False),
        _json_strings(_format_us(rec_at)),
        _json_strings(by),
        np.array([json_scopes(t) for t in norm_u], dtype=object)[s_codes].tolist(),
        _json_strings(subject),
        _json_strings(vocab),
    ])
    exp_obj = exp.astype(object)
    exp_obj[~has_exp] = None
    return Batch(
        rows=rows,
        record_id=rid.tolist(),
        subject_id=subject.tolist(),
        purpose=purpose.tolist(),
        action=action.tolist(),
        scopes=scopes_joined.tolist(),
        effective_us=eff.tolist(),
        expires_us=exp_obj.tolist(),
        canonical=canonical,
        controller=ctrl.tolist(),
    )


def _json_strings(values: Any, *, unique: bool = True) -> list[str]:
    """JSON-encode every string; with ``unique``, encode each distinct value once (repetitive columns)."""
    arr = np.asarray(values, dtype=object)
    if not unique:
        return list(map(_q, arr.tolist()))
    codes, uniq = pd.factorize(arr)
    return np.array(list(map(_q, uniq)), dtype=object)[codes].tolist()


def _format_us(us: np.ndarray) -> np.ndarray:
    """µs since epoch -> canonical ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (same text as ``records.format_ts``).

    Repeated values are formatted once; dates come from a per-day cache, so a million
    timestamps cost one short f-string each.
    """
    us = np.asarray(us, dtype=np.int64)
    uniq, inv = np.unique(us, return_inverse=True)
    days, rem = np.divmod(uniq, 86_400_000_000)
    dayset, day_inv = np.unique(days, return_inverse=True)
    day_txt = np.datetime_as_string(dayset.astype("datetime64[D]"), unit="D")[day_inv].tolist()
    secs, frac = np.divmod(rem, 1_000_000)
    hh, r = np.divmod(secs, 3600)
    mm, ss = np.divmod(r, 60)
    txt = [f"{d}T{h:02d}:{m:02d}:{s:02d}.{f:06d}Z"
           for d, h, m, s, f in zip(day_txt, hh.tolist(), mm.tolist(), ss.tolist(), frac.tolist())]
    return np.array(txt, dtype=object)[inv.reshape(-1)]


def prepare_records(records: list[ConsentRecord], *, controller: str) -> Batch:
    """A batch from record objects (already validated on construction)."""
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
    return Batch(
        rows=np.arange(1, len(records) + 1),
        record_id=ids,
        subject_id=[r.subject_id for r in records],
        purpose=[r.purpose for r in records],
        action=[r.action for r in records],
        scopes=[";".join(r.scopes) for r in records],
        effective_us=[to_us(r.effective_at) for r in records],
        expires_us=[None if r.expires_at is None else to_us(r.expires_at) for r in records],
        canonical=[r.canonical_json() for r in records],
        controller=[r.controller for r in records],
    )

