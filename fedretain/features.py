"""Retention features at a cutoff, each declaring the consent scopes it reads.

The registry is the single source of truth the consent gate enforces: a feature is
computed for a user only if the user granted *every* scope it reads for the run's
purpose; otherwise its value is 0 and the per-scope ``has_<scope>`` indicator tells
the model the value is missing rather than zero. Inputs are the gate's output, so
events of a non-granted scope have already been removed before anything here runs.

Everything is column-wise: the pre-cutoff events are reduced once to per-(user, event type)
statistics (counts and sums in each window, first/last ages; ``Window``), and every feature is
answered from that small table; nothing loops per event. Only events strictly before the
cutoff are read (no label leakage). Every matrix is checked finite before it is returned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from fedretain.consent.vocab import SCOPES, check_scope
from fedretain.schema import CHANNELS, EVENT_TYPES

DAY = np.timedelta64(1, "D")
# "Days since" for users who never did the thing: a long but finite horizon, stretched to the data's
# own span when that is longer (so "never" always reads as older than any real value).
NEVER_DAYS = 365.0
_WINDOWS = (7.0, 30.0, 90.0)  # the "last N days" windows aggregated in the one pass over events
_TOTALS = ("amount", "watch_seconds")


class GatedLike(Protocol):
    """What features need from the consent gate's output (``fedretain.consent.gate.GatedData``)."""

    events: pd.DataFrame
    users: pd.DataFrame
    grants: pd.DataFrame


class Window:
    """Pre-cutoff events aggregated once per (user, event type), plus the per-user frame all aligns to.

    A few bincounts over the events yield, per user and event type, the counts and sums in every
    window and the first/last ages; each feature's question is then answered from that small table
    (users × types), so the whole matrix costs about one pass over the events. Each sum reads only the
    rows that can add to it (money only on rows with an amount, windows only on recent rows), which keeps
    the random-access passes few when the users × types table outgrows the CPU caches (10M events).
    """

    def __init__(self, events: dict[str, np.ndarray], users: pd.DataFrame, cutoff: pd.Timestamp) -> None:
        self._columns = events  # code (user position), ev (event type index), age_days, amount, watch_seconds, channel
        self._frame: pl.DataFrame | None = None
        self.users = users  # index user_id (the population), attribute columns
        self.cutoff = cutoff
        self.n = len(users)
        age = events["age_days"]
        self.never_days = max(NEVER_DAYS, float(age.max()) if len(age) else 0.0)
        k = len(EVENT_TYPES)
        size = max(self.n * k, 1)
        key = events["code"].astype(np.int64)  # built in place: fresh memory is costly at 10M rows
        key *= k
        key += events["ev"]
        counts = np.bincount(key, minlength=size)
        present = np.flatnonzero(counts)
        table = {"n": counts[present].astype(float), "code": present // k, "ev": present % k}
        del counts

        def add(name: str, rows: np.ndarray, weights: np.ndarray | None = None) -> None:
            """Sum ``weights`` (or count) over ``rows`` (positions) per (user, type)."""
            w = None if weights is None else weights[rows]
            table[name] = np.bincount(key[rows], weights=w, minlength=size)[present].astype(float, copy=False)

        add("n_live", np.flatnonzero(events["channel"] == CHANNELS.index("live")))
        for c in _TOTALS:
            v = events[c]
            add(f"{c}_all", np.flatnonzero(v != 0.0), v)  # adding zeros changes no sum
        recent = np.flatnonzero(age < max(_WINDOWS))
        recent_age = age[recent]
        for w in _WINDOWS:
            inside = recent[recent_age < w]
            add(f"n_{w:g}", inside)
            for c in _TOTALS:
                v = events[c]
                add(f"{c}_{w:g}", inside[v[inside] != 0.0], v)
        for name, fn, start in (("age_min", np.minimum, np.inf), ("age_max", np.maximum, -np.inf)):
            dense = np.full(size, start)
            fn.at(dense, key, age)
            table[name] = dense[present]
        self._table = table
        self._memo: dict[tuple, pd.Series] = {}

    @property
    def events(self) -> pl.DataFrame:
        """The pre-cutoff events as a polars frame (built on first use: only unusual windows need it)."""
        if self._frame is None:
            self._frame = pl.DataFrame(self._columns)
        return self._frame

    def _rows(self, event_types: tuple[str, ...]) -> np.ndarray:
        wanted = [EVENT_TYPES.index(t) for t in event_types]
        return np.isin(self._table["ev"], wanted) if len(self._table["ev"]) else np.zeros(0, dtype=bool)

    def _per_user(self, column: str, event_types: tuple[str, ...]) -> pd.Series:
        rows = self._rows(event_types)
        values = np.bincount(self._table["code"][rows].astype(np.int64),
                             weights=self._table[column][rows].astype(float), minlength=self.n)
        return pd.Series(values[: self.n], index=self.users.index, dtype=float)

    def _cached(self, key: tuple, compute: Callable[[], pd.Series]) -> pd.Series:
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def _direct(self, agg: pl.Expr, event_types: tuple[str, ...], within_days: float | None,
                channel: str | None = None) -> pd.Series:
        """Any other window or channel: one filtered group-by over the events."""
        ev = self.events.filter(pl.col("ev").is_in([EVENT_TYPES.index(t) for t in event_types]))
        if within_days is not None:
            ev = ev.filter(pl.col("age_days") < within_days)
        if channel is not None:
            ev = ev.filter(pl.col("channel") == CHANNELS.index(channel))
        out = ev.group_by("code").agg(agg.alias("v"))
        values = np.zeros(self.n)
        values[out.get_column("code").to_numpy()] = out.get_column("v").to_numpy()
        return pd.Series(values, index=self.users.index, dtype=float)

    def count(self, *event_types: str, within_days: float | None = None, channel: str | None = None) -> pd.Series:
        def compute() -> pd.Series:
            if channel == "live" and within_days is None:
                return self._per_user("n_live", event_types)
            if channel is None and (within_days is None or float(within_days) in _WINDOWS):
                return self._per_user("n" if within_days is None else f"n_{float(within_days):g}", event_types)
            return self._direct(pl.len().cast(pl.Float64), event_types, within_days, channel)

        return self._cached(("count", event_types, within_days, channel), compute)

    def total(self, column: str, *event_types: str, within_days: float | None = None) -> pd.Series:
        def compute() -> pd.Series:
            if column in _TOTALS and (within_days is None or float(within_days) in _WINDOWS):
                suffix = "all" if within_days is None else f"{float(within_days):g}"
                return self._per_user(f"{column}_{suffix}", event_types)
            return self._direct(pl.col(column).sum(), event_types, within_days)

        return self._cached(("total", column, event_types, within_days), compute)

    def _age(self, column: str, event_types: tuple[str, ...], fill: float, pick: Callable) -> pd.Series:
        rows = self._rows(event_types)
        values = np.full(self.n, np.nan)
        codes, ages = self._table["code"][rows].astype(np.int64), self._table[column][rows]
        found = np.full(self.n, np.nan)
        pick.at(found, codes, ages)  # type: ignore[attr-defined]
        values = np.where(np.isnan(found), fill, found)
        return pd.Series(values, index=self.users.index, dtype=float)

    def days_since_last(self, *event_types: str) -> pd.Series:
        return self._cached(("last", event_types), lambda: self._age("age_min", event_types, self.never_days, np.fmin))

    def days_since_first(self, *event_types: str) -> pd.Series:
        return self._cached(("first", event_types), lambda: self._age("age_max", event_types, 0.0, np.fmax))


@dataclass(frozen=True)
class Feature:
    """A named, column-wise feature and the consent scopes whose data it reads."""

    name: str
    scopes: frozenset[str]
    fn: Callable[[Window], pd.Series]
    doc: str


FEATURES: dict[str, Feature] = {}


def feature(name: str, scopes: Iterable[str],
            doc: str) -> Callable[[Callable[[Window], pd.Series]], Callable[[Window], pd.Series]]:
    """Register a feature function under ``name``; unknown scopes fail at import time."""

    def register(fn: Callable[[Window], pd.Series]) -> Callable[[Window], pd.Series]:
        if name in FEATURES:
            raise ValueError(f"feature {name!r} registered twice")
        FEATURES[name] = Feature(name, frozenset(check_scope(s) for s in scopes), fn, doc)
        return fn

    return register


def _log(s: pd.Series) -> pd.Series:
    return np.log1p(s.clip(lower=0.0))


# --- purchase_history ---------------------------------------------------------------
@feature("recency_days", ["purchase_history"], "log days since the last purchase")
def _recency(w: Window) -> pd.Series:
    return _log(w.days_since_last("purchase"))


@feature("frequency", ["purchase_history"], "log number of purchases")
def _frequency(w: Window) -> pd.Series:
    return _log(w.count("purchase"))


@feature("monetary_total", ["purchase_history"], "log total spend")
def _monetary_total(w: Window) -> pd.Series:
    return _log(w.total("amount", "purchase"))


@feature("monetary_avg", ["purchase_history"], "log average order value")
def _monetary_avg(w: Window) -> pd.Series:
    n = w.count("purchase")
    return _log(w.total("amount", "purchase") / n.where(n > 0, 1.0))


@feature("tenure_days", ["purchase_history"], "log days since the first purchase")
def _tenure(w: Window) -> pd.Series:
    return _log(w.days_since_first("purchase"))


@feature("mean_gap_days", ["purchase_history"], "log mean days between purchases (0 with < 2 purchases)")
def _mean_gap(w: Window) -> pd.Series:
    n = w.count("purchase")
    span = w.days_since_first("purchase") - w.days_since_last("purchase").where(n > 0, 0.0)
    return _log((span / (n - 1).where(n > 1, 1.0)).where(n > 1, 0.0))


@feature("overdue_ratio", ["purchase_history"], "recency over mean gap: how late the next order is")
def _overdue(w: Window) -> pd.Series:
    n = w.count("purchase")
    recency = w.days_since_last("purchase")
    span = w.days_since_first("purchase") - recency.where(n > 0, 0.0)
    gap = (span / (n - 1).where(n > 1, 1.0)).where(n > 1, np.nan)
    return np.log1p((recency / gap.clip(lower=1.0)).fillna(0.0).clip(upper=50.0))


@feature("purchases_30d", ["purchase_history"], "log purchases in the last 30 days")
def _purchases_30d(w: Window) -> pd.Series:
    return _log(w.count("purchase", within_days=30))


@feature("purchases_90d", ["purchase_history"], "log purchases in the last 90 days")
def _purchases_90d(w: Window) -> pd.Series:
    return _log(w.count("purchase", within_days=90))


@feature("spend_90d", ["purchase_history"], "log spend in the last 90 days")
def _spend_90d(w: Window) -> pd.Series:
    return _log(w.total("amount", "purchase", within_days=90))


@feature("refund_rate", ["purchase_history"], "refunds per purchase")
def _refund_rate(w: Window) -> pd.Series:
    n = w.count("purchase")
    return (w.count("refund") / n.where(n > 0, 1.0)).clip(upper=1.0)


# --- viewing_behavior ---------------------------------------------------------------
@feature("views_7d", ["viewing_behavior"], "log video views in the last 7 days")
def _views_7d(w: Window) -> pd.Series:
    return _log(w.count("view", within_days=7))


@feature("views_30d", ["viewing_behavior"], "log video views in the last 30 days")
def _views_30d(w: Window) -> pd.Series:
    return _log(w.count("view", within_days=30))


@feature("watch_minutes_30d", ["viewing_behavior"], "log minutes watched in the last 30 days")
def _watch_30d(w: Window) -> pd.Series:
    return _log(w.total("watch_seconds", "view", within_days=30) / 60.0)


@feature("view_recency_days", ["viewing_behavior"], "log days since the last view")
def _view_recency(w: Window) -> pd.Series:
    return _log(w.days_since_last("view"))


@feature("live_view_share", ["viewing_behavior"], "share of views on live streams")
def _live_share(w: Window) -> pd.Series:
    n = w.count("view")
    return (w.count("view", channel="live") / n.where(n > 0, 1.0)).astype(float)


# --- engagement -----------------------------------------------------------------------
@feature("likes_30d", ["engagement"], "log likes and comments in the last 30 days")
def _likes_30d(w: Window) -> pd.Series:
    return _log(w.count("like", "comment", within_days=30))


@feature("favorites_30d", ["engagement"], "log favourites in the last 30 days")
def _favorites_30d(w: Window) -> pd.Series:
    return _log(w.count("favorite", within_days=30))


@feature("carts_30d", ["engagement"], "log add-to-carts in the last 30 days")
def _carts_30d(w: Window) -> pd.Series:
    return _log(w.count("cart", within_days=30))


@feature("engagement_recency_days", ["engagement"], "log days since the last like/comment/favourite/cart")
def _engagement_recency(w: Window) -> pd.Series:
    return _log(w.days_since_last("like", "comment", "favorite", "cart"))


@feature(
    "cart_without_purchase_30d",
    ["engagement", "purchase_history"],
    "log add-to-carts not followed by a purchase in the last 30 days (intent left open)",
)
def _cart_no_purchase(w: Window) -> pd.Series:
    return _log(w.count("cart", within_days=30) - w.count("purchase", within_days=30))


# --- social ---------------------------------------------------------------------------
@feature("shares_30d", ["social"], "log shares in the last 30 days")
def _shares_30d(w: Window) -> pd.Series:
    return _log(w.count("share", within_days=30))


@feature("follows", ["social"], "log follows of the shop or its creators")
def _follows(w: Window) -> pd.Series:
    return _log(w.count("follow"))


@feature("referral_friend", ["social"], "1 if the user arrived through a friend's share")
def _referral(w: Window) -> pd.Series:
    return (w.users["referral"].astype(object) == "friend_share").astype(float)


# --- profile / location -----------------------------------------------------------
_TIER_LEVEL = {"none": 0.0, "silver": 1.0, "gold": 2.0, "platinum": 3.0}


@feature("member", ["profile"], "1 if the user holds any membership tier")
def _member(w: Window) -> pd.Series:
    tier = w.users["member_tier"].astype(object)
    return (tier.notna() & (tier != "none")).astype(float)


@feature("member_tier_level", ["profile"], "membership tier as 0 (none) .. 3 (platinum)")
def _member_level(w: Window) -> pd.Series:
    return w.users["member_tier"].astype(object).map(_TIER_LEVEL).fillna(0.0).astype(float)


@feature("city_tier", ["location"], "city tier scaled to 0 (tier 1) .. 1 (tier 5)")
def _city_tier(w: Window) -> pd.Series:
    return ((w.users["city_tier"].astype("Float64") - 1.0) / 4.0).fillna(0.0).astype(float)


DEFAULT_FEATURES: tuple[str, ...] = tuple(FEATURES)
# Features that need only purchase data: the set used for purchase-only sources such as CDNOW.
PURCHASE_FEATURES: tuple[str, ...] = tuple(n for n, f in FEATURES.items() if f.scopes == {"purchase_history"})


def check_features(names: Iterable[str]) -> tuple[str, ...]:
    """Validate feature names against the registry (unknown → ``ValueError``)."""
    names = tuple(names)
    unknown = [n for n in names if n not in FEATURES]
    if unknown:
        raise ValueError(f"unknown feature(s) {unknown}; known: {', '.join(FEATURES)}")
    return names


def scopes_read(names: Iterable[str]) -> tuple[str, ...]:
    """The scopes a feature set reads, in vocabulary order."""
    used = set().union(*(FEATURES[n].scopes for n in check_features(names)))
    return tuple(s for s in SCOPES if s in used)


def feature_columns(names: Iterable[str]) -> list[str]:
    """Model input columns for a feature set: the features, then one indicator per scope read."""
    names = check_features(names)
    return list(names) + [f"has_{s}" for s in scopes_read(names)]


def compute_features(
    gated: GatedLike, cutoff: pd.Timestamp | str, names: Iterable[str] | None = None
) -> pd.DataFrame:
    """Feature matrix (index user_id, columns ``feature_columns(names)``) at ``cutoff``.

    The population is every user the gate admitted (rows of ``gated.grants``). Only
    events strictly before ``cutoff`` are read. A feature is zeroed for users lacking
    any scope it reads, so its value cannot depend on non-granted data. Every value is
    finite, or ``ValueError`` names the feature (a model must never see inf or NaN).
    """
    names = check_features(names or DEFAULT_FEATURES)
    cutoff = pd.Timestamp(cutoff)
    population = pd.Index(gated.grants.index, name="user_id").astype("string")
    users = gated.users.set_index("user_id").reindex(population) if "user_id" in gated.users else gated.users
    users.index = population.astype(str)
    window = Window(events=_window_events(gated.events, population, cutoff), users=users, cutoff=cutoff)
    grants = gated.grants.reindex(population).fillna(False).astype(bool)
    out = {}
    for name in names:
        feat = FEATURES[name]
        values = feat.fn(window).reindex(users.index).fillna(0.0).astype(float)
        allowed = np.logical_and.reduce([grants[s].to_numpy() for s in feat.scopes])
        out[name] = np.where(allowed, values.to_numpy(), 0.0)
    for scope in scopes_read(names):
        out[f"has_{scope}"] = grants[scope].to_numpy().astype(float)
    frame = pd.DataFrame(out, index=population)
    check_finite(frame)
    return frame


def check_finite(frame: pd.DataFrame) -> None:
    """Refuse a feature matrix holding inf or NaN, naming the features and how many users."""
    values = frame.to_numpy(dtype=float)
    bad = ~np.isfinite(values)
    if bad.any():
        counts = bad.sum(axis=0)
        which = ", ".join(f"{c} ({int(k)} users)" for c, k in zip(frame.columns, counts) if k)
        raise ValueError(f"feature values are not finite: {which}; check the events' amounts and "
                         "watch_seconds (ingest bounds them; other sources must too)")


def _window_events(events: pd.DataFrame, population: pd.Index, cutoff: pd.Timestamp) -> dict[str, np.ndarray]:
    """Pre-cutoff events of the population as numpy columns; users found by one Arrow ``index_in`` lookup."""
    ts = events["ts"].to_numpy(dtype="datetime64[ns]")
    ids = pa.array(events["user_id"].astype("string").array)
    people = pa.array(population.astype("string").array)
    people = people.combine_chunks() if isinstance(people, pa.ChunkedArray) else people
    code = pc.index_in(ids, value_set=people.cast(ids.type))
    cut = cutoff.to_datetime64().astype("datetime64[ns]")
    ev = _codes(events["event"], EVENT_TYPES)
    keep = code.is_valid().to_numpy(zero_copy_only=False) & (ts < cut) & (ev >= 0)
    every = bool(keep.all())
    cols = {"code": pc.fill_null(code, -1).to_numpy(), "ev": ev, "ts": ts,
            "amount": events["amount"].to_numpy(dtype=float),
            "watch_seconds": events["watch_seconds"].to_numpy(dtype=float),
            "channel": _codes(events["channel"], CHANNELS)}
    out = {k: v if every else v[keep] for k, v in cols.items()}
    out["age_days"] = age = (cut - out.pop("ts")).view(np.int64).astype(float)
    age /= 86_400e9
    return out


def _codes(values: pd.Series, vocabulary: tuple[str, ...]) -> np.ndarray:
    """Positions in ``vocabulary`` (-1 for missing or unknown), from categorical codes when possible."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        lut = np.array([vocabulary.index(c) if c in vocabulary else -1 for c in values.cat.categories] + [-1],
                       dtype=np.int8)
        return lut[values.cat.codes.to_numpy()]  # code -1 (missing) picks the trailing -1
    lut_map = {v: i for i, v in enumerate(vocabulary)}
    return values.astype(object).map(lut_map).fillna(-1).to_numpy(dtype=np.int8)
