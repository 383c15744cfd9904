"""Analytics queries: what is asked (:class:`QuerySpec`) and the exact per-node answer.

A node answers a query with a table of *cells*: one row per (group, cohort, step, measure),
each a count or a clipped sum over the node's consented users. Everything is computed
column-wise with pandas; nothing here adds noise (see :mod:`.mechanisms`) or talks to Flower.

Contribution bounds, which the noise is calibrated to:

* every user belongs to exactly one group (the breakdown value) and one cohort;
* a user adds at most 1 to any count cell (``drop_duplicates`` on user × cell);
* a user's spend is clipped to ``[0, spend_cap]`` before it is summed;
* a user touches at most :meth:`QuerySpec.cells_per_user` cells, so after dividing each cell
  by its per-user bound (1 for counts, ``spend_cap`` for spend) the L2 sensitivity of the
  whole table under adding or removing one user is ``sqrt(cells_per_user)``.

The domain (which cells exist) depends only on public parameters — the query, its end date
and the breakdown's fixed vocabulary — never on the data, so a zero cell is released as a
(noisy) zero rather than left out.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from fedretain.schema import CITY_TIERS, MEMBER_TIERS, REFERRALS

KINDS: tuple[str, ...] = ("retention_curve", "repeat_rate", "spend_per_retained_user")
# breakdown -> consent scope it reads (besides purchase_history, which every query reads)
BREAKDOWNS: dict[str, str | None] = {
    "none": None,
    "referral": "social",
    "member_tier": "profile",
    "category": "purchase_history",
    "city_tier": "location",
}
BASE_SCOPE = "purchase_history"
PERIOD_DAYS: dict[str, int] = {"week": 7, "month": 30}
_PERIOD_FREQ = {"week": "W-SUN", "month": "M"}  # calendar cohorts: ISO weeks (Monday start), months
UNKNOWN = "unknown"  # group of a user who granted the scope but whose attribute is missing
ALL = "all"
CELL_COLUMNS = ("group", "cohort", "step", "measure")

# measure -> per-user bound ("cap" = the query's spend cap)
MEASURES: dict[str, dict[str, str]] = {
    "retention_curve": {"users": "1", "retained": "1"},
    "repeat_rate": {"eligible": "1", "repeat": "1"},
    "spend_per_retained_user": {"eligible": "1", "retained": "1", "spend": "cap"},
}


class QueryError(ValueError):
    """A query is malformed or cannot be answered on this data (a clear, user-facing message)."""


def _float(name: str, value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise QueryError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise QueryError(f"{name} must be finite, got {value!r}")
    return out


@dataclass(frozen=True)
class QuerySpec:
    """One analytics query, as the server sends it and every node answers it.

    ``epsilon``/``delta`` are what *each node* spends on its answer (nodes hold disjoint
    users, so a node's users are covered by that node's spend alone). ``end`` is the
    exclusive end of the observed data (ISO date); the server fills it in with the earliest
    data end of the answering nodes, so every node releases the same cells.
    """

    kind: str
    by: str = "none"
    epsilon: float = 1.0
    delta: float = 1e-6
    period: str = "month"  # retention_curve: cohort and period length
    periods: int = 6  # retention_curve: following periods per cohort
    cohorts: int = 6  # retention_curve: most recent cohorts whose first period is observed
    windows: tuple[int, ...] = (30, 60, 90)  # repeat_rate: days after the first purchase
    window_days: int = 90  # spend_per_retained_user: days after the first purchase
    spend_cap: float = 500.0  # spend_per_retained_user: per-user clip, currency units
    end: str = ""
    query_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    consent_at: str = ""  # legacy wire field: nodes ignore it and evaluate consent at their own clock

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise QueryError(f"unknown query {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.by not in BREAKDOWNS:
            raise QueryError(f"unknown breakdown --by {self.by!r}; choose one of {', '.join(BREAKDOWNS)}")
        eps, delta = _float("epsilon", self.epsilon), _float("delta", self.delta)
        if eps <= 0:
            raise QueryError(f"epsilon must be > 0, got {self.epsilon}")
        if not 0 < delta < 1:
            raise QueryError(f"delta must be in (0, 1), got {self.delta}")
        if self.period not in PERIOD_DAYS:
            raise QueryError(f"unknown period {self.period!r}; choose one of {', '.join(PERIOD_DAYS)}")
        if int(self.periods) < 1 or int(self.cohorts) < 1:
            raise QueryError(f"periods and cohorts must be >= 1, got {self.periods} and {self.cohorts}")
        windows = tuple(sorted({int(w) for w in self.windows}))
        if not windows or windows[0] < 1:
            raise QueryError(f"windows must be positive day counts, got {self.windows}")
        if int(self.window_days) < 1:
            raise QueryError(f"window_days must be >= 1, got {self.window_days}")
        cap = _float("spend_cap", self.spend_cap)
        if cap <= 0:
            raise QueryError(f"spend_cap must be > 0, got {self.spend_cap}")
        if self.end:
            self.end_ts()
        if self.consent_at:
            try:
                datetime.fromisoformat(str(self.consent_at))
            except ValueError:
                raise QueryError(f"consent_at must be an ISO 8601 time, got {self.consent_at!r}") from None
        if not str(self.query_id).strip():
            raise QueryError("query_id must be non-empty")
        for name, value in (("epsilon", eps), ("delta", delta), ("spend_cap", cap), ("windows", windows),
                            ("periods", int(self.periods)), ("cohorts", int(self.cohorts)),
                            ("window_days", int(self.window_days))):
            object.__setattr__(self, name, value)

    # -- what the query reads and releases -------------------------------------------
    def scopes(self) -> tuple[str, ...]:
        """Consent scopes (purpose ``analytics``) a user must have granted to be counted."""
        extra = BREAKDOWNS[self.by]
        return tuple(sorted({BASE_SCOPE} | ({extra} if extra else set())))

    def cells_per_user(self) -> int:
        """The most cells one user can change (each by at most its measure's bound)."""
        if self.kind == "retention_curve":
            # cohort size + retained in each following period that is observed for some cohort
            # (the domain is public: it depends on the end date only, not on the data)
            observed = max(observed_periods(self, p) for p in cohort_periods(self)) if self.end else self.periods
            return 1 + observed
        if self.kind == "repeat_rate":
            return 2 * len(self.windows)  # eligible + repeat per window
        return 3  # eligible, retained, spend

    def l2_sensitivity(self) -> float:
        """L2 sensitivity of the bound-scaled cell vector under adding/removing one user."""
        return math.sqrt(self.cells_per_user())

    def bound(self, measure: str) -> float:
        """Per-user bound of one measure (1 for counts, ``spend_cap`` for spend)."""
        b = MEASURES[self.kind][measure]
        return self.spend_cap if b == "cap" else float(b)

    def end_ts(self) -> pd.Timestamp:
        if not self.end:
            raise QueryError("the query has no end date yet (the server sets it from the nodes' data end)")
        try:
            ts = pd.Timestamp(self.end)
        except (ValueError, TypeError):
            raise QueryError(f"end must be an ISO date, got {self.end!r}") from None
        if ts.tzinfo is not None:
            ts = ts.tz_convert("UTC").tz_localize(None)
        return ts

    def with_end(self, end: pd.Timestamp | str) -> QuerySpec:
        return replace(self, end=pd.Timestamp(end).isoformat())

    def describe(self) -> str:
        """What the node's usage record names: the query, its parameters and its spend."""
        params = {"retention_curve": f"period={self.period},periods={self.periods},cohorts={self.cohorts}",
                  "repeat_rate": "windows=" + "/".join(str(w) for w in self.windows),
                  "spend_per_retained_user": f"window={self.window_days}d,spend_cap={self.spend_cap:g}"}[self.kind]
        return (f"analytics-query:{self.kind}(by={self.by},{params},end={self.end[:10]},"
                f"epsilon={self.epsilon:g},delta={self.delta:g}) id={self.query_id}")

    # -- wire format (Flower ConfigRecord values: str / int / float / lists) ------------
    def to_config(self) -> dict[str, Any]:
        d = asdict(self)
        d["windows"] = [int(w) for w in self.windows]
        return d

    @classmethod
    def from_config(cls, cfg: Any) -> QuerySpec:
        names = {f for f in cls.__dataclass_fields__}
        data = {k: cfg[k] for k in names if k in cfg}
        if "kind" not in data:
            raise QueryError("query config names no kind")
        if "windows" in data:
            data["windows"] = tuple(int(w) for w in data["windows"])
        return cls(**data)


# -- domain -------------------------------------------------------------------------------
def group_domain(by: str, merchant_category: str | None = None) -> tuple[str, ...]:
    """The fixed group labels of a breakdown (public: from the schema or the merchant's metadata)."""
    if by == "none":
        return (ALL,)
    if by == "referral":
        return (*REFERRALS, UNKNOWN)
    if by == "member_tier":
        return (*MEMBER_TIERS, UNKNOWN)
    if by == "city_tier":
        return (*(str(t) for t in CITY_TIERS), UNKNOWN)
    if by == "category":
        return (str(merchant_category) if merchant_category else UNKNOWN,)
    raise QueryError(f"unknown breakdown {by!r}")


def cohort_periods(spec: QuerySpec) -> list[pd.Period]:
    """The ``spec.cohorts`` latest calendar cohorts whose first following period ends by ``end``."""
    end, length = spec.end_ts(), pd.Timedelta(days=PERIOD_DAYS[spec.period])
    p = pd.Period(end - length, _PERIOD_FREQ[spec.period])
    while (p + 1).start_time + length > end:
        p -= 1
    return [p - i for i in reversed(range(spec.cohorts))]


def cohort_label(p: pd.Period) -> str:
    return str(p) if p.freqstr.startswith("M") else p.start_time.strftime("%Y-%m-%d")


def observed_periods(spec: QuerySpec, p: pd.Period) -> int:
    """How many following periods of cohort ``p`` lie wholly before ``end`` (at most ``periods``)."""
    days = (spec.end_ts() - (p + 1).start_time) / pd.Timedelta(days=PERIOD_DAYS[spec.period])
    return int(min(spec.periods, max(math.floor(days + 1e-12), 0)))


def domain(spec: QuerySpec, groups: tuple[str, ...]) -> pd.DataFrame:
    """Every cell the query releases, in a fixed order (columns ``CELL_COLUMNS``)."""
    rows: list[tuple[str, str, int, str]] = []
    for g in groups:
        if spec.kind == "retention_curve":
            for p in cohort_periods(spec):
                c = cohort_label(p)
                rows.append((g, c, 0, "users"))
                rows.extend((g, c, k, "retained") for k in range(1, observed_periods(spec, p) + 1))
        elif spec.kind == "repeat_rate":
            for w in spec.windows:
                rows.extend([(g, ALL, w, "eligible"), (g, ALL, w, "repeat")])
        else:
            w = spec.window_days
            rows.extend([(g, ALL, w, "eligible"), (g, ALL, w, "retained"), (g, ALL, w, "spend")])
    return pd.DataFrame(rows, columns=list(CELL_COLUMNS)).astype({"step": "int64"})


# -- inputs ---------------------------------------------------------------------------------
@dataclass
class QueryInputs:
    """What the exact computation reads: consented users' groups and their money events."""

    groups: pd.Series  # index user_id (users counted), value: group label
    events: pd.DataFrame  # purchase/refund rows of counted users: user_id, ts, event, amount
    group_labels: tuple[str, ...]


def query_inputs(spec: QuerySpec, gated: Any, merchant: dict[str, Any] | None = None) -> QueryInputs:
    """Select the users a query may count and label each with its group.

    ``gated`` is a :class:`fedretain.consent.gate.GatedData` for purpose ``analytics``: a user
    is counted only if they granted every scope in :meth:`QuerySpec.scopes`.
    """
    if gated.decision.purpose != "analytics":
        raise QueryError(f"analytics queries need consent for purpose 'analytics', got {gated.decision.purpose!r}")
    grants = gated.grants
    ok = np.ones(len(grants), dtype=bool)
    for scope in spec.scopes():
        ok &= grants[scope].to_numpy(dtype=bool)
    users = pd.Index(grants.index[ok], dtype=object, name="user_id")
    labels = group_domain(spec.by, (merchant or {}).get("category"))
    if spec.by == "none" or spec.by == "category":
        groups = pd.Series(labels[0], index=users, dtype=object)
    else:
        attrs = gated.users.drop_duplicates("user_id").set_index("user_id")[spec.by]
        attrs.index = pd.Index(attrs.index.astype(object), dtype=object)
        values = attrs.reindex(users)
        text = values.astype(object).where(values.notna(), None)
        groups = pd.Series([UNKNOWN if v is None else str(v) for v in text], index=users, dtype=object)
        bad = set(groups.unique()) - set(labels)
        if bad:
            raise QueryError(f"{spec.by} values outside the schema vocabulary: {sorted(bad)}")
    ev = gated.events
    money = ev.loc[ev["event"].isin(["purchase", "refund"]), ["user_id", "ts", "event", "amount"]]
    money = money.assign(user_id=money["user_id"].astype(object))
    money = money.loc[money["user_id"].isin(users)]
    return QueryInputs(groups=groups, events=money.reset_index(drop=True), group_labels=labels)


# -- exact computation ---------------------------------------------------------------------------
def _first_purchases(inputs: QueryInputs, end: pd.Timestamp) -> tuple[pd.DataFrame, pd.Series]:
    ev = inputs.events.loc[inputs.events["ts"] < end]
    purchases = ev.loc[ev["event"] == "purchase"]
    first = purchases.groupby("user_id", sort=False)["ts"].min()
    return ev, first


def _with_days(ev: pd.DataFrame, first: pd.Series) -> pd.DataFrame:
    """Rows of users with a first purchase, with ``days`` since it (float)."""
    out = ev.loc[ev["user_id"].isin(first.index)].copy()
    out["days"] = (out["ts"] - out["user_id"].map(first).astype("datetime64[ns]")) / pd.Timedelta(days=1)
    return out


def _count(keys: pd.DataFrame, measure: str) -> pd.DataFrame:
    """Distinct users per cell: a user counts once per cell, whatever their number of events."""
    keys = keys.drop_duplicates(["user_id", "group", "cohort", "step"])
    out = keys.groupby(["group", "cohort", "step"], sort=False).size().rename("value").reset_index()
    out["measure"] = measure
    return out


def exact_cells(spec: QuerySpec, inputs: QueryInputs) -> pd.DataFrame:
    """The exact (non-private) cells of ``spec`` on one node: ``CELL_COLUMNS`` + ``value`` (float)."""
    end = spec.end_ts()
    ev, first = _first_purchases(inputs, end)
    group = inputs.groups
    parts: list[pd.DataFrame] = []
    if spec.kind == "retention_curve":
        length = PERIOD_DAYS[spec.period]
        cohort = first.dt.to_period(_PERIOD_FREQ[spec.period]).map(cohort_label)
        users = pd.DataFrame({"user_id": first.index, "group": first.index.map(group), "cohort": cohort.to_numpy(),
                              "step": 0})
        parts.append(_count(users, "users"))
        rep = _with_days(ev.loc[ev["event"] == "purchase"], first)
        rep = rep.loc[rep["days"] > 0]
        parts.append(_count(pd.DataFrame({
            "user_id": rep["user_id"].to_numpy(), "group": rep["user_id"].map(group).to_numpy(),
            "cohort": rep["user_id"].map(cohort).to_numpy(), "step": np.ceil(rep["days"].to_numpy() / length),
        }), "retained"))
    else:
        windows = spec.windows if spec.kind == "repeat_rate" else (spec.window_days,)
        horizon = (end - first) / pd.Timedelta(days=1)  # days observed after each first purchase
        rep = _with_days(ev.loc[ev["event"] == "purchase"], first)
        next_buy = rep.loc[rep["days"] > 0].groupby("user_id")["days"].min().reindex(first.index)
        for w in windows:
            eligible = horizon >= w
            repeat = eligible & (next_buy <= w)
            hit = "repeat" if spec.kind == "repeat_rate" else "retained"
            for measure, mask in (("eligible", eligible), (hit, repeat)):
                ids = first.index[mask.to_numpy()]
                parts.append(_count(pd.DataFrame({"user_id": ids, "group": ids.map(group), "cohort": ALL, "step": w}),
                                    measure))
            if spec.kind == "spend_per_retained_user":
                money = _with_days(ev, first)
                retained = first.index[repeat.to_numpy()]
                money = money.loc[(money["days"] >= 0) & (money["days"] <= w) & money["user_id"].isin(retained)]
                signed = np.where(money["event"] == "refund", -1.0, 1.0) * money["amount"].to_numpy(float)
                spend = pd.Series(signed, index=money["user_id"].to_numpy()).groupby(level=0).sum()
                spend = spend.clip(lower=0.0, upper=spec.spend_cap)  # per-user bound
                parts.append(pd.DataFrame({"group": spend.index.map(group), "cohort": ALL, "step": w,
                                           "value": spend.to_numpy()}).groupby(
                    ["group", "cohort", "step"], sort=False)["value"].sum().reset_index().assign(measure="spend"))
    counts = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=[*CELL_COLUMNS, "value"])
    counts["step"] = counts["step"].astype("int64")
    cells = domain(spec, inputs.group_labels).merge(counts, on=list(CELL_COLUMNS), how="left")
    cells["value"] = cells["value"].astype(float).fillna(0.0)
    return cells


def users_counted(inputs: QueryInputs) -> pd.Index:
    """Users whose data the query read (for the node's usage record; never sent to the server)."""
    return inputs.groups.index
