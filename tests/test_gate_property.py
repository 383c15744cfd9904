"""Invariant 1: no feature value and no trained update depends on data of a scope the user
did not grant (for the purpose, at the time) — checked on random consent states and data."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pandas as pd
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedretain.consent.gate import GateDecision, apply_gate
from fedretain.consent.vocab import SCOPES
from fedretain.features import compute_features, feature_columns
from fedretain.labels import make_labels
from fedretain.models import RetentionNet, Standardizer
from fedretain.schema import ATTRIBUTE_SCOPE, CHANNELS, EVENT_SCOPE, EVENT_TYPES, canonical_events, canonical_users
from fedretain.train import LocalTrainer, TrainConfig, to_targets

CUTOFF = pd.Timestamp("2026-06-01")
USERS = [f"u{i}" for i in range(6)]

event_rows = st.lists(
    st.tuples(
        st.sampled_from(USERS), st.integers(-120, 40), st.sampled_from(EVENT_TYPES),
        st.floats(1, 500), st.floats(0, 900), st.sampled_from(CHANNELS),
    ),
    min_size=1, max_size=60,
)
grant_rows = st.lists(st.lists(st.booleans(), min_size=len(SCOPES), max_size=len(SCOPES)),
                      min_size=len(USERS), max_size=len(USERS))
consented = st.lists(st.booleans(), min_size=len(USERS), max_size=len(USERS))


def _events(rows) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=["user_id", "day", "event", "amount", "watch_seconds", "channel"])
    df["ts"] = CUTOFF + pd.to_timedelta(df.pop("day"), unit="D")
    df.loc[~df["event"].isin(["purchase", "refund"]), "amount"] = 0.0
    return canonical_events(df)


def _users(seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return canonical_users(pd.DataFrame({
        "user_id": USERS, "referral": rng.choice(["organic", "friend_share"], len(USERS)),
        "member_tier": rng.choice(["none", "silver", "gold"], len(USERS)), "city_tier": rng.integers(1, 6, len(USERS)),
    }))


def _decision(grants: list[list[bool]], has_consent: list[bool]) -> GateDecision:
    g = pd.DataFrame(grants, index=pd.Index(USERS, dtype=object, name="user_id"), columns=list(SCOPES))
    g = g[np.asarray(has_consent) & g.to_numpy().any(axis=1)]
    return GateDecision("retention_modeling", datetime(2026, 6, 1, tzinfo=timezone.utc), "0" * 64, 1, g,
                        len(USERS), len(USERS) - len(g))


def _not_granted(decision: GateDecision, users: pd.Series, scopes: pd.Series) -> np.ndarray:
    """True where the row's (user, scope) is not granted (or the user has no consent at all)."""
    g = decision.grants
    out = np.ones(len(users), dtype=bool)
    for i, (u, s) in enumerate(zip(users, scopes)):
        if u in g.index:
            out[i] = not bool(g.loc[u, s])
    return out


def _perturb(events: pd.DataFrame, users: pd.DataFrame, decision: GateDecision, rng: np.random.Generator):
    """Change, add and delete only data the user did not grant."""
    ev = events.copy()
    hidden = _not_granted(decision, ev["user_id"], ev["event"].astype(str).map(EVENT_SCOPE))
    n = int(hidden.sum())
    ev.loc[hidden, "watch_seconds"] = rng.uniform(0, 5000, n)
    ev.loc[hidden & ev["event"].isin(["purchase", "refund"]).to_numpy(), "amount"] = 999.0
    ev.loc[hidden, "ts"] = ev.loc[hidden, "ts"] - pd.to_timedelta(rng.integers(0, 30, n), unit="D")
    ev = ev[~(hidden & (rng.random(len(ev)) < 0.3))]
    extra = []
    for u in USERS:
        for etype, scope in EVENT_SCOPE.items():
            if _not_granted(decision, pd.Series([u]), pd.Series([scope]))[0] and rng.random() < 0.2:
                extra.append((u, CUTOFF - pd.Timedelta(days=int(rng.integers(1, 60))), etype,
                              50.0 if etype in ("purchase", "refund") else 0.0, 30.0, "live"))
    if extra:
        add = canonical_events(pd.DataFrame(extra, columns=["user_id", "ts", "event", "amount", "watch_seconds",
                                                            "channel"]))
        ev = pd.concat([ev, add], ignore_index=True)
    us = users.copy()
    for col, scope in ATTRIBUTE_SCOPE.items():
        hide = _not_granted(decision, us["user_id"], pd.Series([scope] * len(us)))
        if col == "city_tier":
            us.loc[hide, col] = 5
        elif col == "referral":
            us.loc[hide, col] = "friend_share"
        else:
            us.loc[hide, col] = "platinum"
    return canonical_events(ev.sort_values("ts", kind="mergesort")), canonical_users(us)


def _features_and_update(events, users, decision):
    gated = apply_gate(decision, events, users)
    feats = compute_features(gated, CUTOFF)
    labels = make_labels(gated.events, feats.index, CUTOFF, 30)
    x = feats[feature_columns(feats.columns[~feats.columns.str.startswith("has_")])].to_numpy()
    torch.manual_seed(0)
    model = RetentionNet(x.shape[1], (8,))
    if len(x):
        y = to_targets(labels["repurchase"].to_numpy(), labels["spend"].to_numpy())
        LocalTrainer(TrainConfig(epochs=2, batch_size=4, seed=1)).fit(
            model, Standardizer(np.zeros(x.shape[1]), np.ones(x.shape[1])).transform(x), y)
    return feats, model.state_dict()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=event_rows, grants=grant_rows, has_consent=consented, seed=st.integers(0, 2**16))
def test_non_granted_data_never_changes_features_or_update(rows, grants, has_consent, seed):
    events, users = _events(rows), _users(seed)
    decision = _decision(grants, has_consent)
    feats, update = _features_and_update(events, users, decision)
    ev2, us2 = _perturb(events, users, decision, np.random.default_rng(seed))
    feats2, update2 = _features_and_update(ev2, us2, decision)
    pd.testing.assert_frame_equal(feats, feats2)
    for k in update:
        torch.testing.assert_close(update[k], update2[k], rtol=0, atol=0)
    assert set(feats.index) == set(decision.grants.index)  # users without consent are absent entirely
