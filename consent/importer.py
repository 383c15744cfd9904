"""Validate a consent file's rows in bulk and turn them into a :class:`Batch` for the ledger.

Reading is :mod:`.readers`; the canonical encoders are in :mod:`.records`. Everything is
column-wise in Arrow (C loops, no Python object per row) so a million rows
take a few seconds: CSV parsing, validation against the vocabulary, timestamp parsing
and formatting, and the canonical JSON of every record. Python touches only the few
*distinct* values of repetitive columns and the rare value that needs stripping or JSON
escaping, and those go through the very functions the record-at-a-time path uses, so
both paths produce byte-identical canonical text. Every problem is reported with the
file, the row and the field, and a file with any bad row is rejected as a whole — the
ledger import that uses this is one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from .readers import OPTIONAL_COLUMNS, REQUIRED_COLUMNS, ConsentImportError, read_arrow, read_table
from .records import (  # the canonical encoders, record-at-a-time and columnar, live in records (one producer)
    _STR,
    LAYOUT_KEYS,
    ConsentRecord,
    RecordError,
    _content_id_text,
    _Encoder,
    _scopes,
    canonical_texts,
    format_us,
    json_inner,
    json_quote,
    json_scopes,
    json_string,
    layout_of,
    pack_layout,
    to_us,
    unpack_layout,
)
from .vocab import ACTIONS, PURPOSES, VOCAB_VERSION, UnknownTermError

_q = json_string

__all__ = ["ConsentImportError", "Batch", "REQUIRED_COLUMNS", "OPTIONAL_COLUMNS", "read_table", "read_arrow",
           "prepare_table", "prepare_records", "json_inner", "json_quote", "format_us", "canonical_texts",
           "LAYOUT_KEYS", "pack_layout", "unpack_layout", "layout_of"]

_MAX_ERRORS = 100
_MAX_TS_US = to_us("9999-12-31T23:59:59.999999Z")
_NAT = np.iinfo(np.int64).min
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


# -- validation ---------------------------------------------------------------------------
def _parse_times(arr: pa.Array, present: np.ndarray) -> np.ndarray:
    """ISO 8601 text -> int64 µs since epoch (UTC); unparseable or absent -> INT64 min.

    Uses the same pandas ISO 8601 parser as ``records.parse_ts``; only present values are parsed.
    A column of plain UTC text (the usual export) is read by Arrow instead, when that provably
    gives the same values (:func:`_parse_plain_utc`).
    """
    out = np.full(len(arr), _NAT, dtype=np.int64)
    if not present.any():
        return out
    idx = np.flatnonzero(present)
    sub = arr.take(pa.array(idx)) if len(idx) < len(arr) else arr
    fast = _parse_plain_utc(sub)
    if fast is not None:
        out[idx] = fast
        return out
    ts = pd.to_datetime(pd.Series(sub.to_pandas()), utc=True, format="ISO8601", errors="coerce")
    us = ts.dt.tz_localize(None).astype("datetime64[us]").to_numpy().view(np.int64)
    out[idx] = us
    return out


_PLAIN_UTC = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$"


def _parse_plain_utc(sub: pa.Array) -> np.ndarray | None:
    """µs of a column of plain ``YYYY-MM-DDTHH:MM:SS[.f{1,6}]Z`` text, parsed by Arrow in C; else None.

    Only when every value has that form, parses, lies in 1970..9999 and formats back to the
    same instant (the input, zero-padded to microseconds, equals :func:`format_us` of the
    result) is the column taken: a value read so is the one ISO 8601 reading of its text, so
    the pandas parser (the general path, and ``records.parse_ts``) gives the same. Anything
    else (offsets, other spellings, bad dates) goes to that parser, which names the problem.
    """
    if not pc.all(pc.match_substring_regex(sub, _PLAIN_UTC)).as_py():
        return None
    try:
        us = sub.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_numpy()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    if us.min() < 0 or us.max() > _MAX_TS_US:
        return None
    body = pc.utf8_slice_codeunits(sub, 0, -1)  # without the Z
    body = pc.utf8_rpad(pc.if_else(pc.equal(pc.utf8_length(body), 19), pc.binary_join_element_wise(body, ".", ""),
                                   body), width=26, padding="0")
    text = pc.binary_join_element_wise(body, "Z", "").cast(pa.large_string())
    return us if pc.all(pc.equal(text, format_us(us))).as_py() else None


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
        return pa.repeat(pa.scalar(default, type=pa.string()), n)  # an absent column: one value, no objects

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
