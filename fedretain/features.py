"""Retention features at a cutoff, each declaring the consent scopes it reads.

The registry is the single source of truth the consent gate enforces: a feature is
computed for a user only if the user granted *every* scope it reads for the run's
purpose; otherwise its value is 0 and the per-scope ``has_<scope>`` indicator tells
the model the value is missing rather than zero. Inputs are the gate's output, so
events of a non-granted scope have already been removed before anything here runs.

Everything is column-wise (groupby/aggregate); nothing loops per event. Only events
strictly before the cutoff are read (no label leakage).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd

from fedretain.consent.vocab import SCOPES, check_scope

DAY = np.timedelta64(1, "D")
# Cap for "days since" features of users who never did the thing: a long but finite horizon.
NEVER_DAYS = 365.0


class GatedLike(Protocol):
    """What features need from the consent gate's output (``fedretain.consent.gate.GatedData``)."""

    events: pd.DataFrame
    users: pd.DataFrame
    grants: pd.DataFrame


class Window:
    """Pre-cutoff events, split once by event type, plus the per-user frame everything aligns to.

    Features ask many questions of the same few event types; splitting once and
    memoising per-type frames keeps the whole matrix at a handful of passes over the data.
    """

    def __init__(self, events: pd.DataFrame, users: pd.DataFrame, cutoff: pd.Timestamp) -> None:
        self.events = events  # events with ts < cutoff, plus 'age_days' (cutoff - ts in days)
        self.users = users  # index user_id (the population), attribute columns
        self.cutoff = cutoff
        codes = events["event"].astype(str).to_numpy()
        self._by_type = {t: events[codes == t] for t in pd.unique(codes)} if len(events) else {}
        self._memo: dict[tuple, pd.Series] = {}

    def of(self, *event_types: str) -> pd.DataFrame:
        parts = [self._by_type[t] for t in event_types if t in self._by_type]
        if not parts:
            return self.events.iloc[0:0]
        return parts[0] if len(parts) == 1 else pd.concat(parts)

    def _cached(self, key: tuple, compute: Callable[[], pd.Series]) -> pd.Series:
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def count(self, *event_types: str, within_days: float | None = None) -> pd.Series:
        def compute() -> pd.Series:
            ev = self.of(*event_types)
            if within_days is not None:
                ev = ev[ev["age_days"] < within_days]
            return ev.groupby("user_id", observed=True).size().reindex(self.users.index, fill_value=0).astype(float)

        return self._cached(("count", event_types, within_days), compute)

    def total(self, column: str, *event_types: str, within_days: float | None = None) -> pd.Series:
        def compute() -> pd.Series:
            ev = self.of(*event_types)
            if within_days is not None:
                ev = ev[ev["age_days"] < within_days]
            grouped = ev.groupby("user_id", observed=True)[column].sum()
            return grouped.reindex(self.users.index, fill_value=0.0).astype(float)

        return self._cached(("total", column, event_types, within_days), compute)

    def days_since_last(self, *event_types: str) -> pd.Series:
        def compute() -> pd.Series:
            last = self.of(*event_types).groupby("user_id", observed=True)["age_days"].min()
            return last.reindex(self.users.index).fillna(NEVER_DAYS).clip(upper=NEVER_DAYS).astype(float)

        return self._cached(("last", event_types), compute)

    def days_since_first(self, *event_types: str) -> pd.Series:
        def compute() -> pd.Series:
            first = self.of(*event_types).groupby("user_id", observed=True)["age_days"].max()
            return first.reindex(self.users.index).fillna(0.0).clip(upper=NEVER_DAYS).astype(float)

        return self._cached(("first", event_types), compute)


@dataclass(frozen=True)
class Feature:
    """A named, column-wise feature and the consent scopes whose data it reads."""

    name: str
    scopes: frozenset[str]
    fn: Callable[[Window], pd.Series]
    doc: str


FEATURES: dict[str, Feature] = {}


def feature(name: str, scopes: Iterable[str], doc: str) -> Callable[[Callable[[Window], pd.Series]], Callable[[Window], pd.Series]]:
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
    views = w.of("view")
    live = views[views["channel"] == "live"].groupby("user_id", observed=True).size()
    n = w.count("view")
    return (live.reindex(w.users.index, fill_value=0) / n.where(n > 0, 1.0)).astype(float)


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
    any scope it reads, so its value cannot depend on non-granted data.
    """
    names = check_features(names or DEFAULT_FEATURES)
    cutoff = pd.Timestamp(cutoff)
    population = pd.Index(gated.grants.index, name="user_id").astype("string")
    ev = gated.events
    ev = ev[(ev["ts"] < cutoff) & ev["user_id"].isin(population)]
    ev = ev.assign(user_id=pd.Categorical(ev["user_id"].astype(str), categories=population.astype(str)))
    ev = ev.assign(age_days=(cutoff - ev["ts"]) / DAY)
    users = gated.users.set_index("user_id").reindex(population) if "user_id" in gated.users else gated.users
    users.index = population.astype(str)
    window = Window(events=ev, users=users, cutoff=cutoff)
    grants = gated.grants.reindex(population).fillna(False).astype(bool)
    out = {}
    for name in names:
        feat = FEATURES[name]
        values = feat.fn(window).reindex(users.index).fillna(0.0).astype(float)
        allowed = np.logical_and.reduce([grants[s].to_numpy() for s in feat.scopes])
        out[name] = np.where(allowed, values.to_numpy(), 0.0)
    for scope in scopes_read(names):
        out[f"has_{scope}"] = grants[scope].to_numpy().astype(float)
    return pd.DataFrame(out, index=population)
