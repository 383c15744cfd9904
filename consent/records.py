"""Consent records modelled on ISO/IEC TS 27560 (consent record information structure).

A :class:`ConsentRecord` is one immutable consent *event* (a grant, a withdrawal or an
expiry) for one pseudonymous subject, one controller (the merchant) and one purpose.
Records are never edited: a change of mind is a new record. Their canonical byte
encoding (sorted-key compact JSON, UTF-8) is what the ledger hashes, so it must be the
same wherever it is produced; :func:`canonical_json` is the single implementation and
equals ``json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False)``.

This module is the one producer of canonical bytes for the whole tamper-evidence component:
the record-at-a-time encoder and the columnar one (bulk import, the verifier's fast pass)
live here together (only the column-wise timestamp text, a pure function of an integer, is
in :mod:`.timetext`). It is longer than 450 lines because of that: split across modules, the
two encoders of the same bytes could drift apart unnoticed.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from json.encoder import encode_basestring as _q  # the C string encoder json.dumps uses
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from .timetext import format_us  # the columnar timestamp text (its own module: records is long)
from .vocab import VOCAB_VERSION, UnknownTermError, check_action, check_purpose, check_scope

__all__ = [
    "ConsentRecord",
    "RecordError",
    "FIELDS",
    "canonical_json",
    "canonical_json_columns",
    "format_ts",
    "parse_ts",
    "to_us",
    "from_us",
    "new_record_id",
    "canonical_bytes",
    "json_inner",
    "json_quote",
    "format_us",
    "canonical_texts",
    "LAYOUT_KEYS",
    "pack_layout",
    "unpack_layout",
    "layout_of",
]

# Every field of a record, in canonical (sorted) order.
FIELDS: tuple[str, ...] = (
    "action",
    "collection_method",
    "controller",
    "effective_at",
    "expires_at",
    "jurisdiction",
    "notice_version",
    "purpose",
    "record_id",
    "recorded_at",
    "recorded_by",
    "scopes",
    "subject_id",
    "vocab_version",
)

_MIN_TS = datetime(1970, 1, 1, tzinfo=timezone.utc)

_TEMPLATE = "{" + ",".join(f'"{name}":%s' for name in FIELDS) + "}"


class RecordError(ValueError):
    """A consent record field is missing or malformed; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"field {field!r}: {message}")
        self.field = field


def _unknown(field: str, err: UnknownTermError) -> UnknownTermError:
    out = UnknownTermError(f"field {field!r}: {err}")
    out.field = field  # type: ignore[attr-defined]
    return out


def parse_ts(value: Any, field: str = "timestamp") -> datetime:
    """Return ``value`` as an aware UTC datetime (naive input is taken to be UTC already).

    Accepts ISO 8601 text (``Z`` or an offset), ``datetime``, ``pd.Timestamp`` and
    ``np.datetime64``. Sub-microsecond precision is truncated.
    """
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise RecordError(field, "empty timestamp")
        # The same strict ISO 8601 parser the bulk import uses, so both accept the same text.
        ts = pd.to_datetime(pd.Series([text]), utc=True, format="ISO8601", errors="coerce").iloc[0]
        if pd.isna(ts):
            raise RecordError(field, f"not an ISO 8601 timestamp: {value!r}")
    elif isinstance(value, (datetime, np.datetime64)):
        ts = pd.Timestamp(value)
    else:
        raise RecordError(field, f"expected a timestamp, got {type(value).__name__} {value!r}")
    if ts is pd.NaT or pd.isna(ts):
        raise RecordError(field, "missing timestamp")
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    dt = ts.floor("us").to_pydatetime()
    if dt < _MIN_TS:
        raise RecordError(field, f"timestamp {format_ts(dt)} is before 1970-01-01")
    return dt


def format_ts(dt: datetime) -> str:
    """Fixed-width ISO 8601 UTC text, always with microseconds: ``2026-01-02T03:04:05.000000Z``."""
    dt = dt.astimezone(timezone.utc)
    return (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:"
        f"{dt.second:02d}.{dt.microsecond:06d}Z"
    )


def to_us(value: Any, field: str = "timestamp") -> int:
    """Microseconds since the Unix epoch (UTC) — the ledger's indexed time unit."""
    if isinstance(value, datetime) and value.tzinfo is not None:
        dt = value.astimezone(timezone.utc)
    else:
        dt = parse_ts(value, field)
    delta = dt - _MIN_TS
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_us(us: int) -> datetime:
    """Inverse of :func:`to_us`."""
    return pd.Timestamp(int(us), unit="us", tz="UTC").to_pydatetime()


def new_record_id() -> str:
    """A fresh random record id (UUID4), for records entered one at a time."""
    return str(uuid.uuid4())


def canonical_json(values: dict[str, Any]) -> str:
    """Canonical JSON text of a record given as a dict of already-normalised field values.

    ``values`` maps every name of :data:`FIELDS` to a ``str`` (timestamps already formatted
    with :func:`format_ts`), ``None`` (only ``expires_at``) or, for ``scopes``, a sorted
    tuple of str. The result equals ``json.dumps(values, sort_keys=True,
    separators=(",", ":"), ensure_ascii=False)`` but is several times faster, which
    matters when a million records are imported at once.
    """
    parts = []
    for name in FIELDS:
        v = values[name]
        if v is None:
            parts.append("null")
        elif name == "scopes":
            parts.append(json_scopes(v))
        else:
            parts.append(_q(v))
    return _TEMPLATE % tuple(parts)


def canonical_json_columns(columns: dict[str, Sequence[Any]]) -> list[str]:
    """Canonical JSON texts of many records given column-wise (the bulk-import fast path).

    Same contract as :func:`canonical_json` per row: ``columns`` maps each name of
    :data:`FIELDS` to a sequence of str/None values, and ``scopes`` to sorted tuples.
    """
    encoded = []
    for name in FIELDS:
        col = columns[name]
        if name == "scopes":
            enc = [json_scopes(v) for v in col]
        elif name == "expires_at":
            enc = ["null" if v is None else _q(v) for v in col]
        else:
            enc = list(map(_q, col))
        encoded.append(enc)
    return fill_canonical(encoded)


# JSON encoding of one string exactly as the canonical encoder writes it (json's own C encoder).
json_string = _q


def json_scopes(scopes: Sequence[str]) -> str:
    """JSON encoding of a sorted scope tuple exactly as the canonical encoder writes it."""
    return "[" + ",".join(_q(s) for s in scopes) + "]"


def fill_canonical(encoded: Sequence[Sequence[str]]) -> list[str]:
    """Assemble canonical JSON texts from per-field JSON fragments given in :data:`FIELDS` order."""
    if len(encoded) != len(FIELDS):
        raise ValueError(f"expected {len(FIELDS)} encoded columns, got {len(encoded)}")
    return list(map(_TEMPLATE.__mod__, zip(*encoded)))


def _text(name: str, value: Any, *, required: bool) -> str:
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise RecordError(name, f"expected text, got {type(value).__name__} {value!r}")
    value = value.strip()
    if required and not value:
        raise RecordError(name, "must not be empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RecordError(name, "is not valid UTF-8 text") from exc
    return value


@dataclass(frozen=True)
class ConsentRecord:
    """One consent event (ISO/IEC TS 27560 style); validated against the vocabulary on creation.

    ``scopes`` is stored sorted and de-duplicated. A ``withdraw``/``expire`` with no
    scopes means "every scope of this purpose". Timestamps are aware UTC datetimes.
    """

    record_id: str
    subject_id: str
    controller: str
    purpose: str
    scopes: tuple[str, ...]
    action: str
    effective_at: datetime
    expires_at: datetime | None = None
    collection_method: str = ""
    notice_version: str = ""
    jurisdiction: str = ""
    recorded_by: str = ""
    recorded_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    vocab_version: str = VOCAB_VERSION

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        for name in ("record_id", "subject_id", "controller", "vocab_version"):
            set_(self, name, _text(name, getattr(self, name), required=True))
        for name in ("collection_method", "notice_version", "jurisdiction", "recorded_by"):
            set_(self, name, _text(name, getattr(self, name), required=False))
        try:
            check_purpose(_text("purpose", self.purpose, required=True))
        except UnknownTermError as err:
            raise _unknown("purpose", err) from None
        try:
            check_action(_text("action", self.action, required=True))
        except UnknownTermError as err:
            raise _unknown("action", err) from None
        set_(self, "purpose", self.purpose.strip())
        set_(self, "action", self.action.strip())
        set_(self, "scopes", _scopes(self.scopes))
        set_(self, "effective_at", parse_ts(self.effective_at, "effective_at"))
        set_(self, "recorded_at", parse_ts(self.recorded_at, "recorded_at"))
        if self.expires_at is not None:
            set_(self, "expires_at", parse_ts(self.expires_at, "expires_at"))
        if self.action == "grant":
            if not self.scopes:
                raise RecordError("scopes", "a grant must name at least one scope")
            if self.expires_at is not None and self.expires_at <= self.effective_at:
                raise RecordError("expires_at", "a grant must expire after it takes effect")
        elif self.expires_at is not None:
            raise RecordError("expires_at", f"only a grant can carry an expiry, not a {self.action}")

    # -- encoding -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: timestamps as canonical ISO text, scopes as a list."""
        d = self._canonical_values()
        d["scopes"] = list(d["scopes"])
        return d

    def _canonical_values(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "collection_method": self.collection_method,
            "controller": self.controller,
            "effective_at": format_ts(self.effective_at),
            "expires_at": None if self.expires_at is None else format_ts(self.expires_at),
            "jurisdiction": self.jurisdiction,
            "notice_version": self.notice_version,
            "purpose": self.purpose,
            "record_id": self.record_id,
            "recorded_at": format_ts(self.recorded_at),
            "recorded_by": self.recorded_by,
            "scopes": self.scopes,
            "subject_id": self.subject_id,
            "vocab_version": self.vocab_version,
        }

    def canonical_json(self) -> str:
        """Canonical JSON text (sorted keys, compact, no ASCII escaping)."""
        return canonical_json(self._canonical_values())

    def canonical_bytes(self) -> bytes:
        """UTF-8 canonical encoding: the Merkle leaf and hash-chain input."""
        return self.canonical_json().encode("utf-8")

    @classmethod
    def from_json(cls, data: str | bytes | dict[str, Any]) -> ConsentRecord:
        """Parse a record from its JSON form (as stored in the ledger or exported)."""
        d = json.loads(data) if isinstance(data, (str, bytes)) else dict(data)
        missing = [f for f in FIELDS if f not in d and f not in ("expires_at",)]
        if missing:
            raise RecordError(missing[0], "missing from the JSON record")
        extra = sorted(set(d) - set(FIELDS))
        if extra:
            raise RecordError(extra[0], "is not a consent record field")
        scopes = d["scopes"]
        if not isinstance(scopes, (list, tuple)):
            raise RecordError("scopes", f"expected a list, got {scopes!r}")
        return cls(
            record_id=d["record_id"],
            subject_id=d["subject_id"],
            controller=d["controller"],
            purpose=d["purpose"],
            scopes=tuple(scopes),
            action=d["action"],
            effective_at=d["effective_at"],
            expires_at=d.get("expires_at"),
            collection_method=d["collection_method"],
            notice_version=d["notice_version"],
            jurisdiction=d["jurisdiction"],
            recorded_by=d["recorded_by"],
            recorded_at=d["recorded_at"],
            vocab_version=d["vocab_version"],
        )

    @classmethod
    def grant(cls, subject_id: str, controller: str, purpose: str, scopes: Any, effective_at: Any,
              **kw: Any) -> ConsentRecord:
        """A new grant with a fresh record id."""
        return cls(kw.pop("record_id", None) or new_record_id(), subject_id, controller, purpose,
                   scopes, "grant", effective_at, **kw)

    @classmethod
    def withdraw(cls, subject_id: str, controller: str, purpose: str, effective_at: Any, scopes: Any = (),
                 **kw: Any) -> ConsentRecord:
        """A new withdrawal (no scopes: every scope of the purpose) with a fresh record id."""
        return cls(kw.pop("record_id", None) or new_record_id(), subject_id, controller, purpose,
                   scopes, "withdraw", effective_at, **kw)


def _scopes(value: Any) -> tuple[str, ...]:
    """Validate scopes (iterable or ``;``/``,``-separated text); sorted, de-duplicated."""
    if value is None:
        return ()
    if isinstance(value, str):
        items = [s.strip() for s in value.replace(";", ",").split(",")]
    else:
        try:
            items = [s.strip() if isinstance(s, str) else s for s in value]
        except TypeError:
            raise RecordError("scopes", f"expected a list of scopes, got {value!r}") from None
    out = set()
    for s in items:
        if s == "":
            continue
        if not isinstance(s, str):
            raise RecordError("scopes", f"expected scope names, got {s!r}")
        try:
            out.add(check_scope(s))
        except UnknownTermError as err:
            raise _unknown("scopes", err) from None
    return tuple(sorted(out))


def canonical_bytes(values: dict[str, Any]) -> bytes:
    """Canonical bytes of any JSON-able mapping, by the same definition as :func:`canonical_json`.

    Sorted keys, compact separators, UTF-8, no NaN/Infinity. Other append-only logs (the
    privacy-budget ledger) hash these bytes, so there is one canonical encoding in the project.
    """
    return json.dumps(values, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


# == the columnar encoder: the same canonical bytes for a whole column at a time ===========
# The bulk import (and the verifier's fast pass) build canonical texts column-wise in Arrow.
# It lives here, beside canonical_json, so there is one producer of canonical bytes; the
# hypothesis tests in tests/test_consent_fastpath.py prove both paths byte-identical.
# Characters json.dumps(ensure_ascii=False) escapes: '"', '\\' and controls below 0x20.
_NEEDS_ESCAPE = r'["\\\x00-\x1f]'
_STR = pa.large_string()  # 64-bit offsets: a column of many long texts never overflows
_CHUNK = 1 << 16


def _needs_escape(arr: pa.Array) -> bool:
    """Does any value of a string array contain a byte json.dumps escapes (``"``, ``\\``, below 0x20)?

    Three comparisons over the data buffer (they stream through memory; a 256-entry table
    look-up would gather byte by byte).
    """
    _, offsets, data = arr.buffers()[:3]
    if data is None or len(arr) == 0:
        return False
    off = np.frombuffer(offsets, dtype=np.int64 if pa.types.is_large_string(arr.type) else np.int32)
    off = off[arr.offset : arr.offset + len(arr) + 1]
    raw = np.frombuffer(data, dtype=np.uint8)[off[0] : off[-1]]
    return bool((raw < 0x20).any() or (raw == ord('"')).any() or (raw == ord("\\")).any())


# -- column helpers (shared with the verifier) ------------------------------------------
def json_inner(arr: pa.Array) -> pa.Array:
    """JSON string literal of every value *without its quotes*, byte-identical to json.dumps's.

    Values with nothing to escape are returned as they are (checked in C); the rare value
    that contains a quote, a backslash or a control character goes through json's own encoder.
    The result has the type of ``arr``.
    """
    if len(arr) == 0 or not _needs_escape(arr):
        return arr
    special = pc.match_substring_regex(arr, _NEEDS_ESCAPE)
    idx = pa.array(np.flatnonzero(special.to_numpy(zero_copy_only=False)))
    fixed = pa.array([_q(v)[1:-1] for v in arr.take(idx).to_pylist()], type=arr.type)
    return pc.replace_with_mask(arr, special, fixed)


def json_quote(arr: pa.Array) -> pa.Array:
    """JSON string literal of every value, byte-identical to ``json.dumps(v, ensure_ascii=False)``."""
    arr = arr.cast(_STR) if arr.type != _STR else arr
    return pc.binary_join_element_wise(_lit('"'), json_inner(arr), _lit('"'), _lit(""))


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

    consts: dict[str, pa.Scalar | None] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return self.n

    def _constant(self, name: str, arr: pa.Array) -> pa.Scalar | None:
        """The JSON-escaped text (no quotes) of a column that holds one value in every row, else None."""
        if name not in self.consts:
            one = len(arr) > 0 and bool(pc.all(pc.equal(arr, arr[0])).as_py())
            self.consts[name] = _lit(json_inner(arr.slice(0, 1).cast(_STR))[0].as_py()) if one else None
        return self.consts[name]

    def texts(self, lo: int, hi: int) -> tuple[pa.Array, np.ndarray]:
        """Canonical texts of rows ``lo:hi`` and their packed ``layout`` (see :data:`LAYOUT_KEYS`)."""
        k = hi - lo
        has_exp = self.has_exp[lo:hi]

        def text(name: str, arr: pa.Array, escape: bool = True) -> pa.Array | pa.Scalar:
            const = self._constant(name, arr)
            if const is not None:  # one value in the whole column (common: method, notice, ...): join a scalar
                return const
            out = arr.slice(lo, k).cast(_STR)
            return json_inner(out) if escape else out

        rec_at = self.rec_at[lo:hi]
        values = {
            "action": text("action", self.action, escape=False),  # vocabulary terms: nothing to escape
            "collection_method": text("collection_method", self.method),
            "controller": _lit(self.controller),
            "effective_at": format_us(self.eff[lo:hi]),
            "expires_at": pc.if_else(pa.array(has_exp), format_us(np.where(has_exp, self.exp[lo:hi], 0), quoted=True),
                                     _lit("null")),
            "jurisdiction": text("jurisdiction", self.juris),
            "notice_version": text("notice_version", self.notice),
            "purpose": text("purpose", self.purpose, escape=False),
            "record_id": json_inner(self.rid.slice(lo, k).cast(_STR)),
            "recorded_at": (_lit(format_us(rec_at[:1])[0].as_py()) if k and rec_at.min() == rec_at.max()
                            else format_us(rec_at)),
            "recorded_by": text("recorded_by", self.by),
            "scopes": _take_distinct(self.scope_json, self.scope_codes[lo:hi]),
            "subject_id": json_inner(self.subject.slice(lo, k).cast(_STR)),
            "vocab_version": text("vocab_version", self.vocab),
        }
        return canonical_texts(values).combine_chunks(), _marker_offsets(values)

    def content_digests(self, which: np.ndarray) -> np.ndarray:
        """BLAKE2b-128 digests (rows of 16 bytes) of the content keys of the rows in ``which``.

        The key is the record's fields joined by U+001F: the same event imported twice gets
        the same id and is refused, not doubled. Keys are joined by Arrow, a slice at a time.
        """
        out: list[bytes] = []
        blake = hashlib.blake2b(digest_size=16)  # copied per key: cheaper than parsing the parameters each time
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
            append = out.append
            for key in keys.to_numpy(zero_copy_only=False).tolist():
                h = blake.copy()
                h.update(key)
                append(h.digest())
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
