"""Feature correctness on a hand-computed example, scope masking, and no label leakage."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from fedretain.consent.vocab import SCOPES
from fedretain.features import FEATURES, compute_features, feature_columns, scopes_read
from fedretain.labels import make_labels
from fedretain.schema import canonical_events, canonical_users

CUTOFF = pd.Timestamp("2026-06-01")


def _events(rows):
    cols = ["user_id", "ts", "event", "amount", "watch_seconds", "channel"]
    return canonical_events(pd.DataFrame(rows, columns=cols))


def _gated(events, users, grants=None):
    ids = pd.Index(sorted(set(users["user_id"])), name="user_id").astype("string")
    g = pd.DataFrame(True, index=ids, columns=list(SCOPES)) if grants is None else grants
    return SimpleNamespace(events=events, users=users, grants=g)


@pytest.fixture
def example():
    events = _events(
        [
            ("a", "2026-05-01", "purchase", 20.0, 0, "shelf"),
            ("a", "2026-05-11", "purchase", 40.0, 0, "live"),
            ("a", "2026-05-29", "purchase", 60.0, 0, "short_video"),
            ("a", "2026-05-30", "view", 0.0, 120, "live"),
            ("a", "2026-05-31", "view", 0.0, 60, "short_video"),
            ("a", "2026-05-20", "cart", 0.0, 0, "shelf"),
            ("a", "2026-05-21", "cart", 0.0, 0, "shelf"),
            ("a", "2026-05-22", "cart", 0.0, 0, "shelf"),
            ("a", "2026-05-22", "cart", 0.0, 0, "shelf"),
            ("a", "2026-05-25", "refund", 20.0, 0, "shelf"),
            ("b", "2026-03-03", "purchase", 10.0, 0, "search"),
            ("b", "2026-05-30", "share", 0.0, 0, "short_video"),
            # after the cutoff: must never be read by a feature
            ("a", "2026-06-05", "purchase", 99.0, 0, "shelf"),
            ("b", "2026-06-02", "view", 0.0, 500, "live"),
        ]
    )
    users = canonical_users(pd.DataFrame({"user_id": ["a", "b"], "referral": ["organic", "friend_share"],
                                          "member_tier": ["gold", "none"], "city_tier": [1, 5]}))
    return events, users


def test_hand_computed_values(example):
    events, users = example
    f = compute_features(_gated(events, users), CUTOFF)
    a, b = f.loc["a"], f.loc["b"]
    # a: purchases on May 1, 11, 29 → last 3 days before Jun 1, first 31 days before
    assert a["recency_days"] == pytest.approx(math.log1p(3))
    assert a["frequency"] == pytest.approx(math.log1p(3))
    assert a["monetary_total"] == pytest.approx(math.log1p(120))
    assert a["monetary_avg"] == pytest.approx(math.log1p(40))
    assert a["tenure_days"] == pytest.approx(math.log1p(31))
    assert a["mean_gap_days"] == pytest.approx(math.log1p(14))  # (31 - 3) / 2
    assert a["overdue_ratio"] == pytest.approx(math.log1p(3 / 14))
    assert a["purchases_30d"] == pytest.approx(math.log1p(2))  # May 1 is 31 days back
    assert a["refund_rate"] == pytest.approx(1 / 3)
    assert a["views_7d"] == pytest.approx(math.log1p(2))
    assert a["watch_minutes_30d"] == pytest.approx(math.log1p(3.0))
    assert a["live_view_share"] == pytest.approx(0.5)
    assert a["carts_30d"] == pytest.approx(math.log1p(4))
    assert a["cart_without_purchase_30d"] == pytest.approx(math.log1p(2))
    assert a["member"] == 1.0 and a["member_tier_level"] == 2.0
    assert a["city_tier"] == 0.0 and b["city_tier"] == 1.0
    assert b["referral_friend"] == 1.0 and a["referral_friend"] == 0.0
    assert b["shares_30d"] == pytest.approx(math.log1p(1))
    assert b["mean_gap_days"] == 0.0  # a single purchase has no gap
    assert b["views_30d"] == 0.0  # b's only view is after the cutoff
    assert list(f.columns) == feature_columns(FEATURES)


def test_no_label_leakage(example):
    """Changing, adding or deleting events after the cutoff leaves every feature unchanged."""
    events, users = example
    before = compute_features(_gated(events, users), CUTOFF)
    later = events["ts"] >= CUTOFF
    changed = events.copy()
    changed.loc[later, "amount"] = 12345.0
    extra = _events([("b", "2026-06-01", "purchase", 50.0, 0, "shelf"), ("a", "2026-07-01", "view", 0, 9, "live")])
    changed = pd.concat([changed[~later], changed[later], extra], ignore_index=True)
    pd.testing.assert_frame_equal(before, compute_features(_gated(changed, users), CUTOFF))
    dropped = events[~later].reset_index(drop=True)
    pd.testing.assert_frame_equal(before, compute_features(_gated(dropped, users), CUTOFF))


def test_labels_read_only_the_horizon(example):
    events, users = example
    labels = make_labels(events, pd.Index(["a", "b"]), CUTOFF, horizon_days=30)
    assert labels.loc["a", "repurchase"] == 1.0 and labels.loc["a", "spend"] == 99.0
    assert labels.loc["b", "repurchase"] == 0.0 and labels.loc["b", "spend"] == 0.0
    short = make_labels(events, pd.Index(["a"]), CUTOFF, horizon_days=3)
    assert short.loc["a", "repurchase"] == 0.0
    with pytest.raises(ValueError):
        make_labels(events, pd.Index(["a"]), CUTOFF, horizon_days=0)


def test_feature_of_a_missing_scope_is_zero_with_indicator(example):
    events, users = example
    grants = pd.DataFrame(True, index=pd.Index(["a", "b"], dtype="string", name="user_id"), columns=list(SCOPES))
    grants.loc["a", "engagement"] = False
    f = compute_features(_gated(events, users, grants), CUTOFF)
    assert f.loc["a", "carts_30d"] == 0.0
    assert f.loc["a", "cart_without_purchase_30d"] == 0.0  # reads engagement too
    assert f.loc["a", "has_engagement"] == 0.0 and f.loc["b", "has_engagement"] == 1.0
    assert f.loc["a", "frequency"] > 0  # purchase_history still granted


def test_registry_declares_only_vocabulary_scopes():
    for feat in FEATURES.values():
        assert feat.scopes and feat.scopes <= set(SCOPES), feat.name
    assert set(scopes_read(FEATURES)) == {"purchase_history", "viewing_behavior", "engagement", "social",
                                          "profile", "location"}
    with pytest.raises(ValueError, match="unknown feature"):
        feature_columns(["recency_days", "no_such_feature"])


def test_unknown_scope_in_a_feature_declaration_is_an_error():
    from fedretain.consent.vocab import UnknownTermError
    from fedretain.features import feature

    with pytest.raises(UnknownTermError):
        feature("bogus_feature", ["telepathy"], "reads a scope that does not exist")(lambda w: w.users.index)


def test_empty_population():
    events = _events([])
    users = canonical_users(pd.DataFrame({"user_id": []}))
    f = compute_features(_gated(events, users), CUTOFF)
    assert f.empty and list(f.columns) == feature_columns(FEATURES)
    assert np.isfinite(f.to_numpy()).all()


def test_window_answers_any_window_or_channel_and_skips_unknown_users(example):
    """Windows and channels outside the precomputed table go through the direct path; events of users
    outside the population and events at or after the cutoff are never counted."""
    from fedretain.features import Window, _window_events

    events, users = example
    stranger = _events([("zz", "2026-05-30", "purchase", 500.0, 0, "live")])
    events = pd.concat([events, stranger], ignore_index=True)
    population = pd.Index(["b", "a"], dtype="string", name="user_id")  # not in the events' order
    people = users.set_index("user_id").reindex(population)
    w = Window(_window_events(events, population, CUTOFF), people, CUTOFF)
    assert w.count("purchase").tolist() == [1.0, 3.0]  # b, a; zz's purchase is not anyone's
    assert w.count("cart", within_days=12).tolist() == [0.0, 3.0]  # 05-22 twice, 05-21; 05-20 is 12 days back
    assert w.count("purchase", channel="live").tolist() == [0.0, 1.0]
    assert w.total("amount", "purchase", within_days=14).tolist() == [0.0, 60.0]
    assert w.total("watch_seconds", "view", within_days=30).tolist() == [0.0, 180.0]  # b's 06-02 view is after
    assert w.days_since_first("purchase").tolist() == [90.0, 31.0]
