"""The consent gate: only consented users, only granted scopes, fail closed on any doubt."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedretain.consent import signing
from fedretain.consent.gate import ConsentError, GateDecision, apply_gate, decide, record_use
from fedretain.consent.ledger import ConsentLedger
from fedretain.consent.records import ConsentRecord
from fedretain.consent.vocab import SCOPES
from fedretain.schema import (
    ATTRIBUTE_SCOPE,
    EVENT_SCOPE,
    EVENT_TYPES,
    MEMBER_TIERS,
    REFERRALS,
    canonical_events,
    canonical_users,
)

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
AT = T0 + timedelta(days=30)
P = "retention_modeling"


@pytest.fixture(scope="module")
def ledger(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gate")
    signing.save_private_key(signing.generate_key(), tmp / "node.key")
    led = ConsentLedger.open(tmp / "l.sqlite", key_path=tmp / "node.key", create=True, controller="m1")
    g = lambda u, s, d=0, **kw: ConsentRecord.grant(u, "m1", P, s, T0 + timedelta(days=d), **kw)  # noqa: E731
    led.append_many([
        g("full", SCOPES),
        g("buyer", ("purchase_history",)),
        g("viewer", ("viewing_behavior", "profile")),
        g("social", ("social", "location", "engagement")),
        g("gone", ("purchase_history",)),
        ConsentRecord.withdraw("gone", "m1", P, T0 + timedelta(days=10)),
        g("expired", ("purchase_history",), expires_at=T0 + timedelta(days=20)),
        g("later", ("purchase_history",), d=40),
        ConsentRecord.grant("other_purpose", "m1", "analytics", SCOPES, T0),
    ])
    yield led
    led.close()


USERS = ["full", "buyer", "viewer", "social", "gone", "expired", "later", "other_purpose", "never"]


def frames(n_per_user=None, seed=0, users=USERS):
    rng = np.random.default_rng(seed)
    ev_rows = []
    for u in users:
        for e in EVENT_TYPES:
            ev_rows.append({"user_id": u, "ts": datetime(2024, 1, 1) + timedelta(days=int(rng.integers(0, 30))),
                            "event": e,
                            "amount": float(rng.integers(1, 100)) if e in ("purchase", "refund") else 0.0,
                            "watch_seconds": float(rng.integers(0, 60)) if e == "view" else 0.0,
                            "channel": "live", "item_id": f"i{rng.integers(0, 9)}", "category": "c"})
    events = canonical_events(pd.DataFrame(ev_rows))
    users_df = canonical_users(pd.DataFrame({"user_id": users, "referral": "friend_share", "member_tier": "gold",
                                             "city_tier": 2}))
    return events, users_df


def test_decision(ledger):
    d = decide(ledger, P, AT, USERS)
    assert isinstance(d, GateDecision)
    assert set(d.grants.index) == {"full", "buyer", "viewer", "social"}
    assert d.grants.index.name == "user_id" and list(d.grants.columns) == list(SCOPES)
    assert (d.n_candidates, d.n_excluded) == (9, 5)
    assert d.ledger_size == ledger.size and d.ledger_head == ledger.head().root_hex
    assert d.scope_counts() == {"purchase_history": 2, "viewing_behavior": 2, "engagement": 2, "social": 2,
                                "profile": 2, "location": 2, "device": 1}
    assert d.summary()["n_admitted"] == 4
    # point in time: before the withdrawal and before the expiry those users were in
    early = decide(ledger, P, T0 + timedelta(days=5), USERS)
    assert {"gone", "expired"} <= set(early.grants.index)
    assert "later" in decide(ledger, P, T0 + timedelta(days=41), USERS).grants.index


def test_apply_gate_drops_non_granted_events_and_attributes(ledger):
    events, users = frames()
    gated = apply_gate(decide(ledger, P, AT, USERS), events, users)
    ev = gated.events
    assert set(ev["user_id"]) == {"full", "buyer", "viewer", "social"}
    for u, group in ev.groupby("user_id", observed=True):
        granted = set(gated.grants.columns[gated.grants.loc[u]])
        assert {EVENT_SCOPE[e] for e in group["event"]} <= granted
        expected = {e for e in EVENT_TYPES if EVENT_SCOPE[e] in granted}
        assert set(group["event"].astype(str)) == expected
    assert set(ev.loc[ev["user_id"] == "buyer", "event"].astype(str)) == {"purchase", "refund"}
    us = gated.users.set_index("user_id")
    assert set(us.index) == {"full", "buyer", "viewer", "social"}
    assert us.loc["full"].notna().all()
    assert us.loc["buyer"].isna().all()  # no social/profile/location
    assert us.loc["viewer", "member_tier"] == "gold" and pd.isna(us.loc["viewer", "referral"])
    assert us.loc["social", "referral"] == "friend_share" and us.loc["social", "city_tier"] == 2
    assert pd.isna(us.loc["social", "member_tier"])
    assert gated.users.dtypes.equals(users.dtypes) and gated.events.dtypes.equals(events.dtypes)
    assert gated.dropped["events_in"] == len(events)
    assert gated.dropped["events_out"] + gated.dropped["events_scope_not_granted"] + \
        gated.dropped["events_user_not_consented"] == len(events)


def test_record_use_logs_admitted_users_only(ledger):
    d = decide(ledger, P, AT, USERS)
    before = len(ledger.usages())
    uid = record_use(ledger, d, "run-x", 1, ["recency"], ["full", "buyer"])
    u = ledger.usages("buyer")[-1]
    assert u.usage_id == uid and u.n_users == 2 and u.ledger_root == d.ledger_head
    assert u.scope_counts["purchase_history"] == 2 and u.scope_counts["social"] == 1
    assert ledger.usages("viewer") == [] or ledger.usages("viewer")[-1].run_id != "run-x"
    with pytest.raises(ConsentError, match="not admitted"):
        record_use(ledger, d, "run-x", 2, "f", ["full", "gone"])
    assert len(ledger.usages()) == before + 1
    assert ledger.verify().ok


def test_fail_closed(ledger):
    with pytest.raises(ConsentError, match="unknown purpose"):
        decide(ledger, "marketing", AT, USERS)
    with pytest.raises(ConsentError, match="missing"):
        decide(ledger, P, AT, ["full", None])
    with pytest.raises(ConsentError, match="text"):
        decide(ledger, P, AT, [1, 2])
    with pytest.raises(ConsentError, match="ISO 8601"):
        decide(ledger, P, "last tuesday", USERS)
    d = decide(ledger, P, AT, USERS)
    events, users = frames()
    odd = events.astype({"event": "object"})
    odd.loc[0, "event"] = "teleport"
    with pytest.raises(ConsentError, match="teleport"):
        apply_gate(d, odd, users)
    with pytest.raises(ConsentError, match="income"):
        apply_gate(d, events, users.assign(income=1.0))
    with pytest.raises(ConsentError, match="user_id"):
        apply_gate(d, events.drop(columns="user_id"), users)
    with pytest.raises(ConsentError, match="text"):
        apply_gate(d, events.assign(user_id=range(len(events))), users)


def test_user_id_storage_does_not_matter(ledger):
    d = decide(ledger, P, AT, USERS)
    events, users = frames()
    base = apply_gate(d, events, users)
    for dtype in (object, "category", "str"):
        ev = events.astype({"user_id": dtype})
        us = users.astype({"user_id": dtype})
        got = apply_gate(d, ev, us)
        assert list(got.events["user_id"].astype(str)) == list(base.events["user_id"].astype(str))
        assert list(got.users["user_id"].astype(str)) == list(base.users["user_id"].astype(str))
    missing = events.astype({"user_id": object})
    missing.loc[0, "user_id"] = None  # a missing id is never consented
    assert len(apply_gate(d, missing, users).events) == len(base.events) - (events.loc[0, "user_id"] == "full")


def test_empty_inputs(ledger):
    d = decide(ledger, P, AT, [])
    assert d.grants.empty and d.n_candidates == 0
    events, users = frames()
    gated = apply_gate(d, events, users)
    assert gated.events.empty and gated.users.empty
    d2 = decide(ledger, P, AT, USERS)
    gated2 = apply_gate(d2, events.iloc[:0], users.iloc[:0])
    assert gated2.events.empty and gated2.users.empty


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000))
def test_changing_non_granted_data_changes_nothing_downstream(ledger, seed):
    """The gate's core promise: data a user did not consent to cannot influence its output."""
    d = decide(ledger, P, AT, USERS)
    events, users = frames(seed=1)
    base = apply_gate(d, events, users)
    rng = np.random.default_rng(seed)
    ev2 = events.copy()
    us2 = users.copy()
    g = d.grants
    granted = np.array([u in g.index and g.loc[u, EVENT_SCOPE[e]] for u, e in zip(ev2["user_id"], ev2["event"])])
    idx = np.flatnonzero(~granted)
    ev2.loc[idx, "amount"] = rng.random(len(idx)) * 1e6
    ev2.loc[idx, "watch_seconds"] = rng.random(len(idx)) * 1e4
    ev2.loc[idx, "item_id"] = "zzz"
    extra = ev2.iloc[idx[: rng.integers(0, len(idx) + 1)]]  # duplicate some non-granted events
    ev2 = pd.concat([ev2, extra], ignore_index=True)
    for col, scope in ATTRIBUTE_SCOPE.items():
        mask = np.array([u not in g.index or not g.loc[u, scope] for u in us2["user_id"]])
        if col == "referral":
            us2.loc[mask, col] = rng.choice(REFERRALS, mask.sum())
        elif col == "member_tier":
            us2.loc[mask, col] = rng.choice(MEMBER_TIERS, mask.sum())
        else:
            us2.loc[mask, col] = rng.integers(1, 6, mask.sum())
    after = apply_gate(d, ev2, us2)
    pd.testing.assert_frame_equal(after.events, base.events)
    pd.testing.assert_frame_equal(after.users, base.users)
