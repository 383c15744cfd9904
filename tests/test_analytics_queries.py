"""Exact per-node analytics cells: hand-checked examples, consent scopes, and the contribution bound."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pytest

from fedretain.analytics.queries import (
    QueryError,
    QuerySpec,
    cohort_periods,
    domain,
    exact_cells,
    group_domain,
    observed_periods,
    query_inputs,
)
from fedretain.consent.gate import GatedData, GateDecision
from fedretain.consent.vocab import SCOPES
from fedretain.schema import canonical_events, canonical_users

END = "2026-10-01"


def gated(purchases: list[tuple], users: list[tuple] | None = None, grants: dict[str, tuple[str, ...]] | None = None,
          purpose: str = "analytics") -> GatedData:
    """A GatedData as the gate would hand it over: (user, ts, event, amount) rows, user attributes, grants."""
    ev = canonical_events(pd.DataFrame(purchases, columns=["user_id", "ts", "event", "amount"]))
    ids = sorted({p[0] for p in purchases} | set(grants or {}))
    grants = grants or {u: ("purchase_history",) for u in ids}
    g = pd.DataFrame({s: [s in grants.get(u, ()) for u in ids] for s in SCOPES}, index=pd.Index(ids, dtype=object,
                                                                                               name="user_id"))
    g = g.loc[g.any(axis=1)]
    us = canonical_users(pd.DataFrame(users or [(u, None, None, None) for u in ids],
                                      columns=["user_id", "referral", "member_tier", "city_tier"]))
    d = GateDecision(purpose, datetime(2026, 10, 2, tzinfo=timezone.utc), "0" * 64, 0, g, len(ids), len(ids) - len(g))
    return GatedData(ev, us, g, d)


def cells_dict(cells: pd.DataFrame) -> dict[tuple, float]:
    return {(r.group, r.cohort, int(r.step), r.measure): float(r.value) for r in cells.itertuples()}


RETENTION_EVENTS = [
    ("A", "2026-06-10", "purchase", 20.0), ("A", "2026-06-20", "purchase", 5.0),  # day 10: period 1
    ("A", "2026-06-21", "refund", 5.0), ("A", "2026-06-25", "purchase", 7.0),  # period 1 again: counted once
    ("A", "2026-08-01", "purchase", 9.0),  # day 52: period 2
    ("B", "2026-06-15", "purchase", 10.0),  # no repeat
    ("C", "2026-07-02", "purchase", 10.0), ("C", "2026-08-01", "purchase", 10.0),  # day 30 exactly: period 1
    ("C", "2026-09-30", "purchase", 10.0),  # day 90: period 3, not observed for the July cohort by END
    ("D", "2026-05-03", "purchase", 10.0), ("D", "2026-06-05", "purchase", 10.0),  # May cohort: outside the domain
    ("E", "2026-10-05", "purchase", 10.0),  # after the end: not a buyer yet
    ("G", "2026-08-10", "purchase", 10.0), ("G", "2026-08-10", "purchase", 12.0),  # same instant: not a repeat
]


def test_cohort_domain_depends_on_end_only():
    spec = QuerySpec("retention_curve", periods=3, cohorts=3, end=END)
    assert [str(p) for p in cohort_periods(spec)] == ["2026-06", "2026-07", "2026-08"]
    assert [observed_periods(spec, p) for p in cohort_periods(spec)] == [3, 2, 1]
    dom = domain(spec, ("all",))
    assert len(dom) == 3 + (3 + 2 + 1)
    week = QuerySpec("retention_curve", period="week", periods=2, cohorts=2, end="2026-10-01")
    # weeks start on Monday; the last cohort's first following week must end by the end date
    # (week of Sep 21 ends Sep 28, +7 days > Oct 1; week of Sep 14 ends Sep 21, +7 = Sep 28 <= Oct 1)
    assert [p.start_time.date().isoformat() for p in cohort_periods(week)] == ["2026-09-07", "2026-09-14"]


def test_retention_cells_hand_checked():
    spec = QuerySpec("retention_curve", periods=3, cohorts=3, end=END)
    cells = exact_cells(spec, query_inputs(spec, gated(RETENTION_EVENTS)))
    assert cells_dict(cells) == {
        ("all", "2026-06", 0, "users"): 2, ("all", "2026-06", 1, "retained"): 1,
        ("all", "2026-06", 2, "retained"): 1, ("all", "2026-06", 3, "retained"): 0,
        ("all", "2026-07", 0, "users"): 1, ("all", "2026-07", 1, "retained"): 1, ("all", "2026-07", 2, "retained"): 0,
        ("all", "2026-08", 0, "users"): 1, ("all", "2026-08", 1, "retained"): 0,
    }


def test_users_without_the_scopes_are_not_counted():
    purchases = [("A", "2026-06-10", "purchase", 10.0), ("A", "2026-06-20", "purchase", 10.0),
                 ("B", "2026-06-11", "purchase", 10.0), ("C", "2026-06-12", "purchase", 10.0),
                 ("F", "2026-06-12", "purchase", 10.0)]
    users = [("A", "friend_share", "gold", 1), ("B", None, None, None), ("C", "organic", None, 2),
             ("F", "organic", None, 2)]
    grants = {"A": ("purchase_history", "social"), "B": ("purchase_history", "social"),
              "C": ("purchase_history",), "F": ("social",)}
    spec = QuerySpec("retention_curve", by="referral", periods=1, cohorts=1, end="2026-08-01")
    inputs = query_inputs(spec, gated(purchases, users, grants))
    # C lacks 'social' (the breakdown's scope), F lacks 'purchase_history'; B granted social but has no value
    assert dict(inputs.groups) == {"A": "friend_share", "B": "unknown"}
    c = cells_dict(exact_cells(spec, inputs))
    assert c[("friend_share", "2026-06", 0, "users")] == 1 and c[("friend_share", "2026-06", 1, "retained")] == 1
    assert c[("unknown", "2026-06", 0, "users")] == 1 and c[("organic", "2026-06", 0, "users")] == 0
    assert {k[0] for k in c} == set(group_domain("referral"))  # zero cells are released too


def test_queries_need_the_analytics_purpose():
    spec = QuerySpec("repeat_rate", end=END)
    with pytest.raises(QueryError, match="analytics"):
        query_inputs(spec, gated([("A", "2026-06-10", "purchase", 1.0)], purpose="retention_modeling"))


def test_repeat_rate_windows_and_eligibility():
    purchases = [
        ("A", "2026-06-01", "purchase", 1.0), ("A", "2026-07-01", "purchase", 1.0),  # repeat at day 30
        ("B", "2026-06-01", "purchase", 1.0), ("B", "2026-07-15", "purchase", 1.0),  # day 44: within 60 only
        ("C", "2026-08-15", "purchase", 1.0), ("C", "2026-08-20", "purchase", 1.0),  # 47 days observed: 30 only
        ("D", "2026-06-01", "purchase", 1.0),  # never again
    ]
    spec = QuerySpec("repeat_rate", windows=(30, 60), end=END)
    c = cells_dict(exact_cells(spec, query_inputs(spec, gated(purchases))))
    assert c == {("all", "all", 30, "eligible"): 4, ("all", "all", 30, "repeat"): 2,
                 ("all", "all", 60, "eligible"): 3, ("all", "all", 60, "repeat"): 2}


def test_spend_per_retained_user_clips_and_nets_refunds():
    purchases = [
        ("A", "2026-06-01", "purchase", 300.0), ("A", "2026-06-10", "purchase", 400.0),  # 700 → clipped to 500
        ("B", "2026-06-01", "purchase", 50.0), ("B", "2026-06-20", "purchase", 30.0),
        ("B", "2026-06-25", "refund", 20.0), ("B", "2026-09-20", "purchase", 999.0),  # after the 90-day window
        ("C", "2026-06-01", "purchase", 80.0),  # eligible, not retained: no spend counted
    ]
    spec = QuerySpec("spend_per_retained_user", window_days=90, spend_cap=500, end=END)
    c = cells_dict(exact_cells(spec, query_inputs(spec, gated(purchases))))
    assert c == {("all", "all", 90, "eligible"): 3, ("all", "all", 90, "retained"): 2,
                 ("all", "all", 90, "spend"): pytest.approx(500.0 + 60.0)}


def test_spec_validation_and_wire_format():
    with pytest.raises(QueryError, match="unknown query"):
        QuerySpec("churn")
    with pytest.raises(QueryError, match="breakdown"):
        QuerySpec("repeat_rate", by="device")
    with pytest.raises(QueryError, match="epsilon"):
        QuerySpec("repeat_rate", epsilon=0)
    with pytest.raises(QueryError, match="delta"):
        QuerySpec("repeat_rate", delta=1.0)
    with pytest.raises(QueryError, match="spend_cap"):
        QuerySpec("spend_per_retained_user", spend_cap=-1)
    with pytest.raises(QueryError, match="ISO date"):
        QuerySpec("repeat_rate", end="not a date")
    spec = QuerySpec("repeat_rate", by="city_tier", windows=(90, 30), end=END)
    assert spec.windows == (30, 90) and spec.scopes() == ("location", "purchase_history")
    assert QuerySpec.from_config(spec.to_config()) == spec
    assert spec.query_id in spec.describe() and "repeat_rate(by=city_tier" in spec.describe()
    assert spec.cells_per_user() == 4 and spec.l2_sensitivity() == pytest.approx(2.0)
    assert QuerySpec("spend_per_retained_user", spend_cap=250).bound("spend") == 250
    assert QuerySpec("retention_curve", by="member_tier").scopes() == ("profile", "purchase_history")


def _random_purchases(rng: np.random.Generator, n_users: int) -> list[tuple]:
    rows = []
    start = pd.Timestamp("2026-04-01")
    for u in range(n_users):
        first = start + pd.Timedelta(days=float(rng.uniform(0, 180)))
        for _ in range(int(rng.integers(1, 8))):
            ts = first + pd.Timedelta(days=float(rng.exponential(40)) * (rng.random() < 0.8))
            ev = "refund" if rng.random() < 0.1 else "purchase"
            rows.append((f"u{u:03d}", ts.isoformat(), ev, float(np.round(rng.lognormal(4, 1), 2))))
        rows.append((f"u{u:03d}", first.isoformat(), "purchase", float(np.round(rng.lognormal(4, 1), 2))))
    return rows


@pytest.mark.parametrize("spec", [
    QuerySpec("retention_curve", period="month", periods=4, cohorts=5, end=END),
    QuerySpec("retention_curve", period="week", periods=6, cohorts=10, end=END),
    QuerySpec("repeat_rate", end=END),
    QuerySpec("spend_per_retained_user", spend_cap=150, end=END),
], ids=["month", "week", "repeat", "spend"])
def test_removing_one_user_moves_the_scaled_cells_by_at_most_the_l2_sensitivity(spec):
    """The bound the noise is calibrated to: ‖Δ cells / bounds‖₂ ≤ sqrt(cells_per_user), |Δ| ≤ bound per cell."""
    rng = np.random.default_rng(5)
    rows = _random_purchases(rng, 40)
    full = exact_cells(spec, query_inputs(spec, gated(rows)))
    bounds = np.array([spec.bound(m) for m in full["measure"]])
    worst = 0.0
    for u in sorted({r[0] for r in rows})[:12]:
        rest = exact_cells(spec, query_inputs(spec, gated([r for r in rows if r[0] != u])))
        assert rest[["group", "cohort", "step", "measure"]].equals(full[["group", "cohort", "step", "measure"]])
        diff = (full["value"].to_numpy() - rest["value"].to_numpy()) / bounds
        assert np.all(np.abs(diff) <= 1 + 1e-12)
        worst = max(worst, float(np.linalg.norm(diff)))
    assert 0 < worst <= spec.l2_sensitivity() + 1e-12


def test_category_breakdown_uses_the_merchants_public_category():
    spec = QuerySpec("repeat_rate", by="category", windows=(30,), end=END)
    assert spec.scopes() == ("purchase_history",)
    inputs = query_inputs(spec, gated([("A", "2026-06-01", "purchase", 1.0), ("A", "2026-06-11", "purchase", 1.0)]),
                          {"merchant_id": "m", "category": "beauty"})
    assert cells_dict(exact_cells(spec, inputs)) == {("beauty", "all", 30, "eligible"): 1,
                                                     ("beauty", "all", 30, "repeat"): 1}
    with pytest.raises(QueryError, match="consent_at"):
        QuerySpec("repeat_rate", consent_at="yesterday")
