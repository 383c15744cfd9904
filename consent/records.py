"""Consent records modelled on ISO/IEC TS 27560 (consent record information structure).

A :class:`ConsentRecord` is one immutable consent *event* (a grant, a withdrawal or an
expiry) for one pseudonymous subject, one controller (the merchant) and one purpose.
Records are never edited: a change of mind is a new record. Their canonical byte
encoding (sorted-key compact JSON, UTF-8) is what the ledger hashes, so it must be the
same wherever it is produced; :func:`canonical_json` is the single implementation and
equals ``json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False)``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from json.encoder import encode_basestring as _q  # the C string encoder json.dumps uses
from typing import Any

import numpy as np
import pandas as pd

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
