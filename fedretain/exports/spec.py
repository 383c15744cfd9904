"""Mapping v2: the declarative description of a shop's own export, parsed and validated.

Why so strict: a mapping is the merchant's only "code". A typo in it must fail at once with a
message naming the key (``mapping.json: events.join[0].on: unknown column 'ordr_id' in
orders.csv``), not quietly reject or skip half the rows. Validation has two steps: the structure
(``parse_spec``, no files needed) and the column names against the files' headers
(``check_columns``, see ``fedretain.exports.sources``).

The JSON form (every key other than ``version``, ``sources`` and ``events`` is optional)::

    {"version": 2,
     "ids": {"trim": true, "integer_floats": true, "case": "keep", "strip_leading_zeros": false},
     "numbers": {"decimal": ",", "thousands": "."},
     "timestamp_format": "%m/%d/%Y %H:%M", "timestamp_unit": "s",
     "sources": {"lines": {"file": "Online Retail.csv", "format": "csv", "delimiter": ",",
                           "skip_duplicate_rows": false}},
     "events": {
        "from": "lines",
        "join": [{"source": "orders", "on": "order_id", "right_on": "id", "unmatched": "quarantine"}],
        "aggregate": [{"source": "payments", "on": "order_id", "sum": {"paid": "payment_value"},
                       "count": "n_payments", "unmatched": "quarantine"}],
        "derive": {"line_amount": "Quantity * UnitPrice"},
        "skip": {"fee_lines": "StockCode in ('POST', 'M')"},
        "fields": {"user_id": "CustomerID", "ts": "InvoiceDate", "event": "'purchase'", "amount": "line_amount"},
        "group": {"by": ["InvoiceNo"], "sum": ["amount"]},
        "values": {"channel": {"map": {"App": "short_video"}, "unknown": "missing"}}},
     "users": {"from": "customers", "fields": {"user_id": "id", "member_tier": "Tier"},
               "values": {"member_tier": {"map": {"VIP Gold": "gold"}, "unknown": "missing"}}}}
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import Any, NoReturn

from fedretain.exports.expr import Expr, ExprError, NumberFormat, parse
from fedretain.mapping import TIMESTAMP_UNITS, IngestError
from fedretain.schema import CHANNELS, EVENT_COLUMN_NAMES, EVENT_TYPES, MEMBER_TIERS, REFERRALS, USER_COLUMN_NAMES

FORMATS = ("csv", "parquet", "whitespace")
UNMATCHED = ("quarantine", "skip", "keep")
UNKNOWN_VALUES = ("missing", "reject")
CASES = ("keep", "lower", "upper")
VALUE_TARGETS: dict[str, tuple[str, ...]] = {
    "event": EVENT_TYPES, "channel": CHANNELS, "referral": REFERRALS, "member_tier": MEMBER_TIERS,
    "city_tier": tuple(str(i) for i in range(1, 6)),
}


class MappingError(IngestError):
    """The mapping itself is wrong (a file-level error: nothing is read until it is fixed)."""


@dataclass(frozen=True)
class IdRules:
    """How ids (user ids and join keys) are normalised before they are compared or stored."""

    trim: bool = True
    integer_floats: bool = True  # '12471.0' -> '12471'
    case: str = "keep"
    strip_leading_zeros: bool = False


@dataclass(frozen=True)
class Source:
    name: str
    file: str
    format: str = "csv"
    delimiter: str = ","
    columns: tuple[str, ...] | None = None  # names for a file without a header row
    skip_duplicate_rows: bool = False  # rows equal to an earlier row are skipped (rule 'duplicate_row')
    encoding: str = "utf-8"  # e.g. "cp1252" for a spreadsheet saved on Windows


@dataclass(frozen=True)
class Join:
    """Many-to-one: each row finds at most one row of ``source`` whose ``right`` equals ``left``."""

    source: str
    left: Expr
    right: str
    unmatched: str
    key: str  # where it is in the mapping, for messages


@dataclass(frozen=True)
class Aggregate:
    """One-to-many: rows of ``source`` are summed per key and attached to the row with that key."""

    source: str
    left: Expr
    right: str
    sums: dict[str, Expr]
    firsts: dict[str, Expr]
    count: str | None
    unmatched: str
    key: str


@dataclass(frozen=True)
class ValueMap:
    mapping: dict[str, str]
    unknown: str


@dataclass(frozen=True)
class TableSpec:
    """How one output table (events or users) is built from the sources."""

    kind: str
    source: str
    joins: tuple[Join, ...] = ()
    aggregates: tuple[Aggregate, ...] = ()
    derive: dict[str, Expr] = field(default_factory=dict)
    skip: dict[str, Expr] = field(default_factory=dict)
    fields: dict[str, Expr] = field(default_factory=dict)
    group_by: tuple[Expr, ...] = ()
    group_sum: tuple[str, ...] = ()
    values: dict[str, ValueMap] = field(default_factory=dict)


@dataclass(frozen=True)
class MappingV2:
    where: str
    sources: dict[str, Source]
    events: TableSpec
    users: TableSpec | None
    ids: IdRules = IdRules()
    timestamp_format: str | None = None
    timestamp_unit: str = "s"
    numbers: NumberFormat = field(default_factory=NumberFormat)


_TOP = ("version", "ids", "numbers", "timestamp_format", "timestamp_unit", "sources", "events", "users")
_THOUSANDS = ("", ",", ".", " ", "'", "\u00a0")
_TABLE = ("from", "join", "aggregate", "derive", "skip", "fields", "group", "values")


def is_v2(data: Any) -> bool:
    """True for a decoded mapping that declares ``"version": 2``."""
    return isinstance(data, dict) and data.get("version") == 2


def parse_spec(data: Any, where: str = "mapping.json") -> MappingV2:
    """Validate the structure of a decoded v2 mapping; raise ``MappingError`` naming the key."""
    p = _P(where)
    obj = p.obj(data, "")
    p.keys(obj, _TOP, "")
    if obj.get("version") != 2:
        p.fail("version", f"must be 2 for this mapping format, got {obj.get('version')!r}")
    ids = IdRules()
    if "ids" in obj:
        raw = p.obj(obj["ids"], "ids")
        p.keys(raw, ("trim", "integer_floats", "case", "strip_leading_zeros"), "ids")
        for k in ("trim", "integer_floats", "strip_leading_zeros"):
            if k in raw and not isinstance(raw[k], bool):
                p.fail(f"ids.{k}", f"must be true or false, got {raw[k]!r}")
        if raw.get("case", "keep") not in CASES:
            p.fail("ids.case", f"must be one of {', '.join(CASES)}, got {raw.get('case')!r}")
        ids = IdRules(**raw)
    numbers = NumberFormat()
    if "numbers" in obj:
        raw = p.obj(obj["numbers"], "numbers")
        p.keys(raw, ("decimal", "thousands"), "numbers")
        dec, th = raw.get("decimal", "."), raw.get("thousands", "")
        if dec not in (".", ","):
            p.fail("numbers.decimal", f"must be '.' or ',', got {dec!r}")
        if th not in _THOUSANDS or th == dec:
            p.fail("numbers.thousands", f"must be one of {_THOUSANDS} and differ from the decimal mark, got {th!r}")
        numbers = NumberFormat(dec, th)
    fmt = obj.get("timestamp_format")
    if fmt is not None and (not isinstance(fmt, str) or not fmt):
        p.fail("timestamp_format", f"must be a non-empty strftime string, got {fmt!r}")
    unit = obj.get("timestamp_unit", "s")
    if unit not in TIMESTAMP_UNITS:
        p.fail("timestamp_unit", f"must be one of {', '.join(TIMESTAMP_UNITS)}, got {unit!r}")
    sources = {name: _source(p, name, raw) for name, raw in p.obj(obj.get("sources"), "sources").items()}
    if not sources:
        p.fail("sources", "declare at least one source file")
    if "events" not in obj:
        p.fail("events", "missing: say how events are built (at least 'from' and 'fields')")
    events = _table(p, "events", obj["events"], sources)
    users = _table(p, "users", obj["users"], sources) if obj.get("users") is not None else None
    primary: dict[str, str] = {}
    for t in (events, users):
        if t is None:
            continue
        for src, key in [(t.source, f"{t.kind}.from"), *((a.source, a.key) for a in t.aggregates)]:
            if src in primary:
                p.fail(key, f"source {src!r} already feeds {primary[src]}; a file can feed one table "
                            "(use it as a 'join' lookup elsewhere)")
            primary[src] = key
    return MappingV2(where, sources, events, users, ids, fmt, unit, numbers)


def _source(p: _P, name: str, raw: Any) -> Source:
    key = f"sources.{name}"
    raw = p.obj(raw, key)
    p.keys(raw, ("file", "format", "delimiter", "columns", "skip_duplicate_rows", "encoding"), key)
    file = raw.get("file")
    if not isinstance(file, str) or not file.strip():
        p.fail(f"{key}.file", f"must name a file in the silo folder, got {file!r}")
    if "/" in file or "\\" in file or file in (".", ".."):
        p.fail(f"{key}.file", f"must be a file name inside the silo folder (no folders), got {file!r}")
    default = "parquet" if file.lower().endswith(".parquet") else "csv"
    fmt = raw.get("format", default)
    if fmt not in FORMATS:
        p.fail(f"{key}.format", f"must be one of {', '.join(FORMATS)}, got {fmt!r}")
    delim = raw.get("delimiter", ",")
    if not isinstance(delim, str) or len(delim) != 1:
        p.fail(f"{key}.delimiter", f"must be one character, got {delim!r}")
    cols = raw.get("columns")
    if cols is not None and (not isinstance(cols, list) or not cols or not all(isinstance(c, str) and c for c in cols)
                             or len(set(cols)) != len(cols)):
        p.fail(f"{key}.columns", "must be a list of distinct column names (for a file without a header row)")
    dups = raw.get("skip_duplicate_rows", False)
    if not isinstance(dups, bool):
        p.fail(f"{key}.skip_duplicate_rows", f"must be true or false, got {dups!r}")
    enc = raw.get("encoding", "utf-8")
    try:
        known = isinstance(enc, str) and bool(codecs.lookup(enc))
    except LookupError:
        known = False
    if not known:
        p.fail(f"{key}.encoding", f"unknown text encoding {enc!r} (e.g. utf-8, cp1252, latin-1)")
    return Source(name, file, fmt, delim, tuple(cols) if cols else None, dups, enc)


def _table(p: _P, kind: str, raw: Any, sources: dict[str, Source]) -> TableSpec:
    raw = p.obj(raw, kind)
    p.keys(raw, _TABLE, kind)
    src = raw.get("from")
    if src not in sources:
        p.fail(f"{kind}.from", f"must name one of the sources ({', '.join(sorted(sources))}), got {src!r}")
    joins = tuple(_join(p, f"{kind}.join[{i}]", j, sources)
                  for i, j in enumerate(p.lst(raw.get("join", []), f"{kind}.join")))
    aggs = tuple(_aggregate(p, f"{kind}.aggregate[{i}]", a, sources)
                 for i, a in enumerate(p.lst(raw.get("aggregate", []), f"{kind}.aggregate")))
    derive = {str(k): p.expr(v, f"{kind}.derive.{k}")
              for k, v in p.obj(raw.get("derive", {}), f"{kind}.derive").items()}
    skip = {str(k): p.expr(v, f"{kind}.skip.{k}") for k, v in p.obj(raw.get("skip", {}), f"{kind}.skip").items()}
    allowed = EVENT_COLUMN_NAMES if kind == "events" else USER_COLUMN_NAMES
    fields_raw = p.obj(raw.get("fields"), f"{kind}.fields")
    for name in fields_raw:
        if name not in allowed:
            p.fail(f"{kind}.fields.{name}", f"not a {kind} field; allowed: {', '.join(allowed)}")
    fields = {k: p.expr(v, f"{kind}.fields.{k}") for k, v in fields_raw.items()}
    required = ("user_id", "ts", "event") if kind == "events" else ("user_id",)
    for name in required:
        if name not in fields:
            p.fail(f"{kind}.fields", f"missing {name!r} (required: {', '.join(required)})")
    group_by: tuple[Expr, ...] = ()
    group_sum: tuple[str, ...] = ()
    if "group" in raw:
        g = p.obj(raw["group"], f"{kind}.group")
        p.keys(g, ("by", "sum"), f"{kind}.group")
        group_by = tuple(p.expr(e, f"{kind}.group.by[{i}]")
                         for i, e in enumerate(p.lst(g.get("by"), f"{kind}.group.by")))
        if not group_by:
            p.fail(f"{kind}.group.by", "name at least one key (e.g. the order id)")
        group_sum = tuple(p.lst(g.get("sum", []), f"{kind}.group.sum"))
        for name in group_sum:
            if name not in fields or name not in ("amount", "watch_seconds"):
                p.fail(f"{kind}.group.sum",
                       f"{name!r} is not a summable field in {kind}.fields (amount, watch_seconds)")
    values: dict[str, ValueMap] = {}
    for name, vm in p.obj(raw.get("values", {}), f"{kind}.values").items():
        key = f"{kind}.values.{name}"
        if name not in VALUE_TARGETS or name not in allowed:
            p.fail(key, f"value maps apply to {', '.join(n for n in VALUE_TARGETS if n in allowed)}")
        if name not in fields:
            p.fail(key, f"{name!r} has a value map but no entry in {kind}.fields")
        vm = p.obj(vm, key)
        p.keys(vm, ("map", "unknown"), key)
        table = p.obj(vm.get("map", {}), f"{key}.map")
        for theirs, ours in table.items():
            if str(ours) not in VALUE_TARGETS[name]:
                p.fail(f"{key}.map.{theirs}", f"maps to {ours!r}, not one of {', '.join(VALUE_TARGETS[name])}")
        unknown = vm.get("unknown", "missing")
        if unknown not in UNKNOWN_VALUES:
            p.fail(f"{key}.unknown", f"must be one of {', '.join(UNKNOWN_VALUES)}, got {unknown!r}")
        if name == "event" and unknown == "missing":
            unknown = "reject"  # an event cannot be missing: an unmapped label is rejected by validation
        values[name] = ValueMap({str(k): str(v) for k, v in table.items()}, unknown)
    return TableSpec(kind, src, joins, aggs, derive, skip, fields, group_by, group_sum, values)


def _join(p: _P, key: str, raw: Any, sources: dict[str, Source]) -> Join:
    raw = p.obj(raw, key)
    p.keys(raw, ("source", "on", "right_on", "unmatched"), key)
    src, left, right, unmatched = _link(p, key, raw, sources)
    return Join(src, left, right, unmatched, key)


def _aggregate(p: _P, key: str, raw: Any, sources: dict[str, Source]) -> Aggregate:
    raw = p.obj(raw, key)
    p.keys(raw, ("source", "on", "right_on", "unmatched", "sum", "first", "count"), key)
    src, left, right, unmatched = _link(p, key, raw, sources)
    if unmatched == "keep":
        p.fail(f"{key}.unmatched", "rows of an aggregated file without a matching row cannot be kept; "
                                   "use quarantine or skip")
    sums = {str(k): p.expr(v, f"{key}.sum.{k}") for k, v in p.obj(raw.get("sum", {}), f"{key}.sum").items()}
    firsts = {str(k): p.expr(v, f"{key}.first.{k}") for k, v in p.obj(raw.get("first", {}), f"{key}.first").items()}
    count = raw.get("count")
    if count is not None and (not isinstance(count, str) or not count.isidentifier()):
        p.fail(f"{key}.count", f"must be a name for the count column, got {count!r}")
    return Aggregate(src, left, right, sums, firsts, count, unmatched, key)


def _link(p: _P, key: str, raw: dict, sources: dict[str, Source]) -> tuple[str, Expr, str, str]:
    src = raw.get("source")
    if src not in sources:
        p.fail(f"{key}.source", f"must name one of the sources ({', '.join(sorted(sources))}), got {src!r}")
    on = raw.get("on")
    if not isinstance(on, str) or not on:
        p.fail(f"{key}.on", f"must be the key column, got {on!r}")
    right = raw.get("right_on", on)
    if not isinstance(right, str) or not right:
        p.fail(f"{key}.right_on", f"must be a column of {src!r}, got {right!r}")
    unmatched = raw.get("unmatched", "quarantine")
    if unmatched not in UNMATCHED:
        p.fail(f"{key}.unmatched", f"must be one of {', '.join(UNMATCHED)}, got {unmatched!r}")
    return src, p.expr(on, f"{key}.on"), right, unmatched


class _P:
    """Small helpers that raise ``MappingError`` with the file and the key path."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, key: str, why: str) -> NoReturn:
        raise MappingError(f"{self.where}: {key}: {why}" if key else f"{self.where}: {why}")

    def obj(self, v: Any, key: str) -> dict:
        if not isinstance(v, dict):
            self.fail(key, f"expected an object, got {type(v).__name__ if v is not None else 'nothing'}")
        return v

    def lst(self, v: Any, key: str) -> list:
        if not isinstance(v, list):
            self.fail(key, f"expected a list, got {type(v).__name__}")
        return v

    def keys(self, obj: dict, allowed: tuple[str, ...], key: str) -> None:
        unknown = sorted(set(obj) - set(allowed))
        if unknown:
            self.fail(f"{key}.{unknown[0]}" if key else unknown[0], f"unknown key; allowed: {', '.join(allowed)}")

    def expr(self, v: Any, key: str) -> Expr:
        try:
            return parse(v)
        except ExprError as exc:
            self.fail(key, str(exc))
