"""The synthetic merchants: file format, determinism, heavy-tailed sizes, calibration, consent.

The calibration checks are computed from the written files, independently of the generator's code.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from fedretain.consent.vocab import ACTIONS, PURPOSES, SCOPES
from fedretain.ingest import load_silo
from fedretain.schema import CHANNELS, EVENT_COLUMN_NAMES, EVENT_TYPES, MEMBER_TIERS, REFERRALS, USER_COLUMN_NAMES
from fedretain.synth import SILO_FILES, generate, merchant_sizes, simulate, write_silo

DATA_END = pd.Timestamp("2026-10-31")
END = DATA_END + pd.Timedelta(days=1)  # data_end is inclusive: a whole day, as clients.node reads it
CUTOFF = END - pd.Timedelta(days=30)  # features < CUTOFF <= labels < END, as fedretain.labels
DAYS = 180
N_USERS = 20_000


@pytest.fixture(scope="module")
def silos(tmp_path_factory):
    """20k users over 5 merchants, read back from the files: [(merchant, events, users, consent)]."""
    out = tmp_path_factory.mktemp("synth")
    paths = generate(out, n_merchants=5, n_users=N_USERS, seed=0)
    loaded = []
    for p in paths:
        merchant = json.loads((p / "merchant.json").read_text())
        events = pd.read_csv(p / "events.csv", parse_dates=["ts"], dtype={"user_id": str, "item_id": str})
        users = pd.read_csv(p / "users.csv", dtype={"user_id": str})
        consent = pd.read_csv(p / "consent.csv", dtype=str, keep_default_na=False)
        loaded.append((merchant, events, users, consent))
    return loaded


def _pooled(silos):
    """Events and users of all merchants with merchant-qualified user ids."""
    ev, us = [], []
    for m, e, u, _ in silos:
        ev.append(e.assign(user_id=m["merchant_id"] + "/" + e["user_id"]))
        us.append(u.assign(user_id=m["merchant_id"] + "/" + u["user_id"], merchant=m["merchant_id"]))
    return pd.concat(ev, ignore_index=True), pd.concat(us, ignore_index=True).set_index("user_id")


def test_silo_files_and_schema(silos):
    for merchant, events, users, _ in silos:
        assert list(events.columns) == list(EVENT_COLUMN_NAMES)
        assert list(users.columns) == list(USER_COLUMN_NAMES)
        assert {"merchant_id", "name", "category", "data_end", "source"} <= set(merchant)
        assert merchant["data_end"] == "2026-10-31" and merchant["source"] == "synthetic"
        assert set(events["event"].unique()) == set(EVENT_TYPES)  # every event type occurs
        assert set(events["channel"].unique()) <= set(CHANNELS)
        assert set(users["referral"].unique()) == set(REFERRALS)
        assert set(users["member_tier"].unique()) == set(MEMBER_TIERS)
        assert users["city_tier"].between(1, 5).all() and users["user_id"].is_unique
        assert set(events["user_id"].unique()) == set(users["user_id"])  # every user bought at least once
        monetary = events["event"].isin(["purchase", "refund"])
        assert (events.loc[monetary, "amount"] > 0).all() and (events.loc[~monetary, "amount"] == 0).all()
        views = events["event"] == "view"
        assert (events.loc[views, "watch_seconds"] > 0).all() and (events.loc[~views, "watch_seconds"] == 0).all()


def test_timestamps_within_window_and_sorted(silos):
    for merchant, events, _, consent in silos:
        last_day = pd.Timestamp(merchant["data_end"])
        assert events["ts"].max().normalize() <= last_day and events["ts"].max() >= last_day  # last day used
        assert events["ts"].min() >= last_day - pd.Timedelta(days=DAYS - 1)
        assert events["ts"].is_monotonic_increasing
        eff = pd.to_datetime(consent["effective_at"], utc=True).dt.tz_localize(None)
        assert eff.max() < last_day + pd.Timedelta(days=1)


def test_refund_follows_a_purchase_of_the_same_item(silos):
    _, events, _, _ = silos[0]
    ref = events[events["event"] == "refund"]
    assert len(ref) > 0
    bought = events[events["event"] == "purchase"].groupby(["user_id", "item_id"])["ts"].min()
    first_buy = bought.reindex(pd.MultiIndex.from_frame(ref[["user_id", "item_id"]])).to_numpy()
    assert (first_buy < ref["ts"].to_numpy()).all()


def test_heavy_tailed_sizes(silos):
    sizes = [len(u) for _, _, u, _ in silos]
    assert sum(sizes) == N_USERS
    assert sizes == sorted(sizes, reverse=True)
    assert min(sizes) >= 100 and max(sizes) >= 4 * min(sizes) and max(sizes) > 0.3 * N_USERS
    big = merchant_sizes(100_000, 10, np.random.default_rng(3))
    assert big.sum() == 100_000 and big.min() >= 100 and big.max() >= 10 * big.min()
    assert merchant_sizes(250, 5, np.random.default_rng(0)).sum() == 250  # fewer than 100 each: still exact
    with pytest.raises(ValueError, match="n_users"):
        merchant_sizes(3, 5, np.random.default_rng(0))


def test_merchants_are_non_iid(silos):
    price = [e.loc[e["event"] == "purchase", "amount"].median() for _, e, _, _ in silos]
    assert max(price) > 3 * min(price)
    live = [(e["channel"] == "live").mean() for _, e, _, _ in silos]
    assert max(live) - min(live) > 0.1
    assert len({m["category"] for m, *_ in silos}) == len(silos)


def _repeat_labels(events: pd.DataFrame, cutoff: pd.Timestamp) -> pd.Series:
    """Users with a purchase before ``cutoff`` -> 1 if they purchase in [cutoff, cutoff + 30 days)."""
    p = events[events["event"] == "purchase"]
    before = p.loc[p["ts"] < cutoff, "user_id"].unique()
    after = set(p.loc[(p["ts"] >= cutoff) & (p["ts"] < cutoff + pd.Timedelta(days=30)), "user_id"])
    return pd.Series([u in after for u in before], index=before, dtype=int)


def test_calibration_repeat_rate_and_membership(silos):
    events, users = _pooled(silos)
    y = _repeat_labels(events, CUTOFF)
    assert len(y) > 0.7 * N_USERS
    assert 0.25 <= y.mean() <= 0.35
    member = users.loc[y.index, "member_tier"].ne("none").to_numpy()
    assert y[member].mean() >= 1.5 * y[~member].mean()
    per_merchant = y.groupby(users.loc[y.index, "merchant"].to_numpy()).mean()
    assert per_merchant.max() - per_merchant.min() > 0.1  # base rates differ by merchant


def test_calibration_first_month_retention_by_referral(silos):
    """Buyers whose first purchase leaves 30 observed days: share buying again within 30 days of it."""
    events, users = _pooled(silos)
    p = events[events["event"] == "purchase"]
    first = p.groupby("user_id")["ts"].min()
    cohort = first[first < CUTOFF]
    p = p.join(cohort.rename("first"), on="user_id", how="inner")
    again = set(p.loc[(p["ts"] > p["first"]) & (p["ts"] <= p["first"] + pd.Timedelta(days=30)), "user_id"])
    retained = pd.Series(cohort.index.isin(list(again)), index=cohort.index)
    ref = users.loc[cohort.index, "referral"].to_numpy()
    assert abs(retained[ref == "friend_share"].mean() - 0.45) <= 0.05
    assert abs(retained[ref == "organic"].mean() - 0.28) <= 0.05


def test_behaviour_before_cutoff_predicts_repeat_purchase(silos):
    """The signal is in observable behaviour: recent, frequent, engaged buyers come back more."""
    events, _ = _pooled(silos)
    cutoff = CUTOFF
    y = _repeat_labels(events, cutoff)
    hist = events[(events["ts"] < cutoff) & events["user_id"].isin(y.index)]
    n_purchases = hist[hist["event"] == "purchase"].groupby("user_id").size().reindex(y.index)
    watch = hist.groupby("user_id")["watch_seconds"].sum().reindex(y.index)
    recency = (cutoff - hist.groupby("user_id")["ts"].max()).reindex(y.index)
    for feature, sign in ((n_purchases, 1), (watch, 1), (recency.dt.total_seconds(), -1)):
        ranks = (sign * feature).rank()
        pos, neg = ranks[y == 1], ranks[y == 0]  # AUC from ranks (Mann-Whitney)
        auc = (pos.sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))
        assert auc > 0.6, feature.name


def test_consent_coverage_and_vocabulary(silos):
    n_users = sum(len(u) for _, _, u, _ in silos)
    granted, rates = 0, []
    for merchant, events, users, consent in silos:
        assert set(consent["purpose"]) <= set(PURPOSES) and set(consent["action"]) <= set(ACTIONS)
        scopes = {s for v in consent["scopes"] for s in v.split(";") if s}
        assert scopes <= set(SCOPES)
        assert (consent["controller"] == merchant["merchant_id"]).all()
        assert consent["record_id"].is_unique
        assert set(consent["subject_id"]) <= set(users["user_id"])
        assert {"retention_modeling", "analytics", "ltv_modeling"} <= set(consent["purpose"])
        grants = consent[(consent["action"] == "grant") & (consent["purpose"] == "retention_modeling")]
        assert (grants["scopes"] != "").all()
        granted += grants["subject_id"].nunique()
        rates.append(grants["subject_id"].nunique() / len(users))
        # the first grant sits just before the user's first activity
        first = events.groupby("user_id")["ts"].min()
        eff = pd.to_datetime(grants["effective_at"], utc=True).dt.tz_localize(None)
        lag = (first.reindex(grants["subject_id"]).to_numpy() - eff.to_numpy()) / np.timedelta64(1, "s")
        assert (lag >= 0).all() and (lag < 600).all()
    assert 0.65 <= granted / n_users <= 0.75
    assert all(0.5 <= r <= 0.9 for r in rates) and max(rates) - min(rates) > 0.05


def test_withdrawals_and_expiring_grants(silos):
    consent = pd.concat([c for *_, c in silos], ignore_index=True)
    grants, withdrawals = consent[consent["action"] == "grant"], consent[consent["action"] == "withdraw"]
    assert 0.01 < len(withdrawals) / len(grants) < 0.08
    assert (withdrawals["scopes"] == "").any() and (withdrawals["scopes"] != "").any()  # all and partial
    key = ["controller", "subject_id", "purpose"]
    g_at = grants.set_index(key)["effective_at"]
    w_at = withdrawals.set_index(key)["effective_at"]
    assert (pd.to_datetime(w_at.to_numpy()) > pd.to_datetime(g_at.reindex(w_at.index).to_numpy())).all()
    expiring = grants[grants["expires_at"] != ""]
    assert 0.005 < len(expiring) / len(grants) < 0.06
    assert (pd.to_datetime(expiring["expires_at"]) > pd.to_datetime(expiring["effective_at"])).all()
    # a partial withdrawal names only scopes the subject granted for that purpose
    granted = grants.set_index(key)["scopes"]
    for k, scopes in withdrawals.set_index(key)["scopes"].items():
        if scopes:
            assert set(scopes.split(";")) <= set(granted.loc[k].split(";"))


def test_deterministic_for_a_seed(tmp_path):
    a = generate(tmp_path / "a", n_merchants=3, n_users=1_500, seed=11)
    b = generate(tmp_path / "b", n_merchants=3, n_users=1_500, seed=11)
    for pa, pb in zip(a, b, strict=True):
        for name in SILO_FILES:
            assert (pa / name).read_bytes() == (pb / name).read_bytes(), name
    other = simulate(n_merchants=3, n_users=1_500, seed=12)
    assert not other[0].events.equals(pd.read_csv(a[0] / "events.csv", parse_dates=["ts"]))
    # regenerating into the same folders is allowed and gives the same files
    again = generate(tmp_path / "a", n_merchants=3, n_users=1_500, seed=11)
    assert (again[0] / "events.csv").read_bytes() == (b[0] / "events.csv").read_bytes()


def test_other_window_and_sizes(tmp_path):
    silos = simulate(n_merchants=10, n_users=3_000, seed=1, data_end="2025-12-31", days=60)
    assert [s.merchant["merchant_id"] for s in silos] == [f"merchant_{k:02d}" for k in range(10)]
    assert sum(len(s.users) for s in silos) == 3_000 and min(len(s.users) for s in silos) >= 100
    for s in silos:
        assert s.events["ts"].max() < pd.Timestamp("2026-01-01")
        assert s.events["ts"].min() >= pd.Timestamp("2025-11-02")  # 60 whole days ending 2025-12-31
    with pytest.raises(ValueError, match="days"):
        simulate(days=0)


def test_write_silo_refuses_a_folder_with_other_files(tmp_path):
    s = simulate(n_merchants=1, n_users=200, seed=0)[0]
    (tmp_path / "events.parquet").write_bytes(b"stale")
    with pytest.raises(FileExistsError, match="events.parquet"):
        write_silo(tmp_path, s.merchant, s.events, s.users, s.consent)
    assert not (tmp_path / "events.csv").exists()
    node = tmp_path / "m"
    (node / ".node").mkdir(parents=True)
    with pytest.raises(FileExistsError, match=r"\.node"):
        write_silo(node, s.merchant, s.events, s.users, s.consent)


def test_generated_silos_pass_ingest(tmp_path):
    for path in generate(tmp_path, n_merchants=2, n_users=600, seed=5):
        silo = load_silo(path)
        assert silo.report.rows_rejected == 0 and silo.users_report.rows_rejected == 0
        assert silo.report.rows_read == len(silo.events) > 0
