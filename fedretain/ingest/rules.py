"""Validation rules for events and users files: which values a row may hold, checked column-wise.

A rule set turns one raw batch into a list of ``Check`` masks (field, reason, which rows failed)
and a canonical batch. Field names in checks are the file's own column names (the merchant's
vocabulary). Everything here works on whole columns (polars); nothing loops over rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import polars as pl

from fedretain.ingest.values import as_text, numbers, timestamps
from fedretain.mapping import ColumnMapping
from fedretain.schema import (
    CHANNELS,
    EVENT_COLUMNS,
    EVENT_TYPES,
    MEMBER_TIERS,
    MONETARY_EVENTS,
    REFERRALS,
    USER_COLUMNS,
    Column,
)

__all__ = ["Check", "RawColumns", "EventRules", "UserRules", "Rules", "MAX_AMOUNT", "MAX_WATCH_SECONDS"]

# Bounds that keep every sum a feature takes finite (1e308 is a finite float; ten of them are not).
MAX_AMOUNT = 1e12  # per event, in the shop's currency
MAX_WATCH_SECONDS = 1e7  # per view: about 115 days

EVENT_ENUM = pl.Enum(list(EVENT_TYPES))
CHANNEL_ENUM = pl.Enum(list(CHANNELS))
REFERRAL_ENUM = pl.Enum(list(REFERRALS))
TIER_ENUM = pl.Enum(list(MEMBER_TIERS))


@dataclass
class Check:
    """One failed-rule mask over a batch; ``values`` names the raw column whose value is reported."""

    field: str
    reason: str
    mask: np.ndarray
    values: str | None = None
    detail: str = ""


class RawColumns:
    """A raw batch plus the canonical→file column name map, with helpers shared by the rules."""

    def __init__(self, raw: pl.DataFrame, names: dict[str, str]):
        self.raw = raw
        self.names = names  # canonical name -> column name in the file
        self.n = raw.height

    def label(self, name: str) -> str:
        """The field name to report: the file's own column name."""
        return self.names.get(name, name)

    def source(self, name: str) -> str | None:
        return self.names.get(name)

    def col(self, name: str) -> pl.Series:
        if name in self.names:
            return self.raw.get_column(self.names[name])
        return pl.Series(name, [None] * self.n, dtype=pl.String)

    def text(self, name: str) -> pl.Series:
        """Stripped text, missing as ''."""
        return as_text(self.col(name))

    def blank_rows(self, user_empty: np.ndarray) -> np.ndarray:
        """Rows whose every value is empty (only rows with an empty user_id can be)."""
        if not user_empty.any():
            return user_empty.copy()
        exprs = [(pl.col(c).cast(pl.String).str.strip_chars().fill_null("") == "") for c in self.raw.columns]
        return user_empty & self.raw.select(pl.all_horizontal(exprs)).to_series().to_numpy()


def _in(text: pl.Series, allowed: tuple[str, ...]) -> np.ndarray:
    return text.is_in(list(allowed)).to_numpy()


def _map_labels(text: pl.Series, table: dict[str, str]) -> pl.Series:
    return text.replace(table) if table else text


def _enum(text: pl.Series, dtype: pl.Enum) -> pl.Series:
    """Canonical labels as an enum; '' or anything else becomes null (such rows are rejected anyway)."""
    return text.cast(dtype, strict=False)


def _na_if_empty(text: pl.Series) -> pl.Series:
    return pl.select(pl.when(text != "").then(text)).to_series().alias(text.name)


def ts_hint(mapping: ColumnMapping) -> str:
    if mapping.timestamp_format:
        return f"expected format {mapping.timestamp_format!r} or epoch {mapping.timestamp_unit}"
    return f"expected ISO 8601 or epoch {mapping.timestamp_unit}, or set timestamp_format in mapping.json"


class EventRules:
    kind = "events"
    columns: tuple[Column, ...] = EVENT_COLUMNS
    duplicate_reason = "duplicate row"

    def __init__(self, now: pd.Timestamp):
        self.now = now

    def validate(self, c: RawColumns, mapping: ColumnMapping) -> tuple[list[Check], pl.DataFrame]:
        user = c.text("user_id")
        user_empty = (user == "").to_numpy()
        checks = [Check("*", "blank row", c.blank_rows(user_empty))]
        checks.append(Check(c.label("user_id"), "empty user_id", user_empty, c.source("user_id")))

        ts_raw = c.col("ts")
        ts = timestamps(ts_raw, mapping.timestamp_format, mapping.timestamp_unit)
        ts_missing = (as_text(ts_raw) == "").to_numpy()
        nat = ts.is_null().to_numpy()
        src = c.source("ts")
        checks.append(Check(c.label("ts"), "missing timestamp", ts_missing, src))
        checks.append(Check(c.label("ts"), "unparseable timestamp", nat & ~ts_missing, src, ts_hint(mapping)))
        now = np.datetime64(self.now.to_datetime64(), "ns")
        with np.errstate(invalid="ignore"):
            future = ts.to_numpy() > now  # NaT compares False
        checks.append(Check(c.label("ts"), "future timestamp", future, src,
                            f"later than now = {self.now.isoformat()} UTC"))

        event = _map_labels(c.text("event"), mapping.events)
        checks.append(Check(c.label("event"), "unknown event label", ~_in(event, EVENT_TYPES), c.source("event"),
                            f"expected one of {', '.join(EVENT_TYPES)}, or map it in mapping.json"))

        amount, a_missing, a_bad = numbers(c.col("amount"))
        src = c.source("amount")
        with np.errstate(invalid="ignore"):
            a_neg = ~a_bad & (amount < 0)
            a_big = ~a_bad & (amount > MAX_AMOUNT)
            monetary = _in(event, tuple(sorted(MONETARY_EVENTS)))
            a_nonpos = monetary & ~a_bad & ~a_neg & (a_missing | (amount <= 0))
        checks.append(Check(c.label("amount"), "non-numeric amount", a_bad, src))
        checks.append(Check(c.label("amount"), "negative amount", a_neg, src))
        checks.append(Check(c.label("amount"), "purchase/refund amount must be > 0", a_nonpos, src))
        checks.append(Check(c.label("amount"), "amount too large", a_big, src,
                            f"above {MAX_AMOUNT:g} for one event; check the unit or the decimal separator"))

        watch, _, w_bad = numbers(c.col("watch_seconds"))
        src = c.source("watch_seconds")
        with np.errstate(invalid="ignore"):
            w_neg = ~w_bad & (watch < 0)
            w_big = ~w_bad & (watch > MAX_WATCH_SECONDS)
        checks.append(Check(c.label("watch_seconds"), "non-numeric watch_seconds", w_bad, src))
        checks.append(Check(c.label("watch_seconds"), "negative watch_seconds", w_neg, src))
        checks.append(Check(c.label("watch_seconds"), "watch_seconds too large", w_big, src,
                            f"above {MAX_WATCH_SECONDS:g} seconds for one view"))

        channel = _map_labels(c.text("channel"), mapping.channels)
        ch_bad = (channel != "").to_numpy() & ~_in(channel, CHANNELS)
        checks.append(Check(c.label("channel"), "unknown channel", ch_bad, c.source("channel"),
                            f"expected one of {', '.join(CHANNELS)}, empty, or map it in mapping.json"))

        clean = pl.DataFrame({
            "user_id": user,
            "ts": ts,
            "event": _enum(event, EVENT_ENUM),
            "item_id": _na_if_empty(c.text("item_id")),
            "category": _na_if_empty(c.text("category")),
            "amount": np.where(np.isnan(amount), 0.0, amount),
            "watch_seconds": np.where(np.isnan(watch), 0.0, watch),
            "channel": _enum(channel, CHANNEL_ENUM),
        })
        return checks, clean

    def key_frame(self, c: RawColumns) -> pl.DataFrame:
        """An exact duplicate is a row whose file values are all equal to an earlier row's."""
        return c.raw


class UserRules:
    kind = "users"
    columns: tuple[Column, ...] = USER_COLUMNS
    duplicate_reason = "duplicate user_id"

    def validate(self, c: RawColumns, mapping: ColumnMapping) -> tuple[list[Check], pl.DataFrame]:
        user = c.text("user_id")
        user_empty = (user == "").to_numpy()
        checks = [Check("*", "blank row", c.blank_rows(user_empty))]
        checks.append(Check(c.label("user_id"), "empty user_id", user_empty, c.source("user_id")))
        referral = c.text("referral")
        checks.append(Check(c.label("referral"), "unknown referral",
                            (referral != "").to_numpy() & ~_in(referral, REFERRALS),
                            c.source("referral"), f"expected one of {', '.join(REFERRALS)} or empty"))
        tier = c.text("member_tier")
        checks.append(Check(c.label("member_tier"), "unknown member_tier",
                            (tier != "").to_numpy() & ~_in(tier, MEMBER_TIERS),
                            c.source("member_tier"), f"expected one of {', '.join(MEMBER_TIERS)} or empty"))
        city, city_missing, city_bad = numbers(c.col("city_tier"))
        with np.errstate(invalid="ignore"):
            out_of_range = ~city_missing & ~city_bad & ((city < 1) | (city > 5) | (city != np.round(city)))
        src = c.source("city_tier")
        checks.append(Check(c.label("city_tier"), "non-numeric city_tier", city_bad, src))
        checks.append(Check(c.label("city_tier"), "city_tier out of 1..5", out_of_range, src,
                            "expected an integer 1..5 or empty"))
        ok_city = ~city_missing & ~city_bad & ~out_of_range
        clean = pl.DataFrame({
            "user_id": user,
            "referral": _enum(referral, REFERRAL_ENUM),
            "member_tier": _enum(tier, TIER_ENUM),
            "city_tier": pl.Series(np.where(ok_city, np.nan_to_num(city), 0).astype("int64")),
        }).with_columns(pl.when(pl.Series(ok_city)).then(pl.col("city_tier")).alias("city_tier"))
        return checks, clean

    def key_frame(self, c: RawColumns) -> pl.DataFrame:
        """A user may appear once: the key is the (stripped) user_id."""
        return pl.DataFrame({"user_id": c.text("user_id")})


Rules = EventRules | UserRules
