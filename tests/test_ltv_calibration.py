"""LTV in money on held-out users, one test per dataset shape: CDNOW, the synthetic default, rare-repeat.

Each test builds features and labels at a cutoff, trains the logistic-regression recipe on two thirds
of the customers, fits ``MoneyCalibration`` on those training customers only, and checks on the
held-out third (3-fold cross-fitting, so every customer is held out once): mean prediction within
±15 % of the mean actual spend, and a value ranking at least as good (normalized Gini) as the LTV
head's own. The held-out mean is itself a sample: the rare-repeat test is sized so that a few hundred
customers come back (the bench reports the bootstrap interval of its single split, ``bench/bench_ltv.py``).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from fedretain.consent.vocab import SCOPES
from fedretain.features import DEFAULT_FEATURES, PURCHASE_FEATURES, compute_features, feature_columns
from fedretain.labels import make_labels
from fedretain.ltv import MoneyCalibration, calibration_ratio, normalized_gini
from fedretain.models import Standardizer, make_model
from fedretain.train import LocalTrainer, TrainConfig, predict, to_targets

CDNOW = Path(os.environ.get("FEDRETAIN_CDNOW_DIR") or Path(__file__).resolve().parents[2] / "shared/data/cdnow")


def _matrices(events: pd.DataFrame, users: pd.DataFrame, cutoff: pd.Timestamp, horizon: float, names) -> tuple:
    """(x, y) of the customers who bought before ``cutoff`` (all scopes granted: a shop's own test data)."""
    ids = pd.Index(users["user_id"].astype(str), name="user_id")
    gated = SimpleNamespace(events=events, users=users, grants=pd.DataFrame(True, index=ids, columns=list(SCOPES)))
    feats = compute_features(gated, cutoff, names)
    buyers = events.loc[(events["event"] == "purchase") & (events["ts"] < cutoff), "user_id"].astype(str).unique()
    feats = feats[feats.index.isin(buyers)]
    labels = make_labels(events, feats.index, cutoff, horizon)
    x = feats[feature_columns(names)].to_numpy(np.float64)
    return x, to_targets(labels["repurchase"].to_numpy(), labels["spend"].to_numpy())


def _check(x: np.ndarray, y: np.ndarray, horizon: float, prior_rate: float = 0.0, epochs: int = 4) -> dict:
    """3-fold cross-fitting: for each third, train the model and fit the calibration on the other two
    thirds, then value that held-out third. Every customer is valued out of sample, so the check
    compares against the mean of all of them (a single held-out third's own mean swings by ±20 %
    when only 1-3 % come back)."""
    fold = np.arange(len(x)) % 3
    value, head, old = np.zeros(len(x)), np.zeros(len(x)), np.zeros(len(x))
    spend = np.expm1(y[:, 1].astype(float))
    cals = []
    for k in range(3):
        tr, te = fold != k, fold == k
        scaler = Standardizer.fit(x[tr])
        torch.manual_seed(k)
        model = make_model("logreg", x.shape[1], prior_rate=prior_rate)
        LocalTrainer(TrainConfig(epochs=epochs, batch_size=256, learning_rate=0.01, seed=k)).fit(
            model, scaler.transform(x[tr]), y[tr])
        p_tr, raw_tr = predict(model, scaler.transform(x[tr]))
        p_te, raw_te = predict(model, scaler.transform(x[te]))
        cals.append(MoneyCalibration.fit(raw_tr, spend[tr], horizon, "USD", p_return=p_tr))
        value[te], head[te] = cals[-1].apply(raw_te, p_te), raw_te
        old[te] = raw_te * spend[tr].sum() / raw_tr.sum()  # the former single ratio factor, for the record
    return {"ratio": calibration_ratio(spend, value), "gini": normalized_gini(spend, value),
            "gini_head": normalized_gini(spend, head), "ratio_old": calibration_ratio(spend, old),
            "buyers": int((spend > 0).sum()), "cal": cals[0], "value": value}


def _synthetic(n_merchants: int, n_users: int, seed: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    from fedretain.synth import simulate

    cutoff = pd.Timestamp("2026-11-01") - pd.Timedelta(days=30)
    parts = [_matrices(s.events, s.users, cutoff, 30.0, DEFAULT_FEATURES)
             for s in simulate(n_merchants, n_users, seed=seed, mode=mode)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def test_cdnow_value_in_dollars_holds_on_held_out_customers():
    from fedretain.datasets.cdnow import read_cdnow, to_events

    if not (CDNOW / "CDNOW_master.txt").is_file():
        pytest.skip(f"CDNOW master file not found in {CDNOW} (set FEDRETAIN_CDNOW_DIR)")
    events, users = to_events(read_cdnow(CDNOW / "CDNOW_master.txt"))
    x, y = _matrices(events, users, pd.Timestamp("1997-10-01"), 273.0, PURCHASE_FEATURES)  # the issue-2 protocol
    r = _check(x, y, 273.0)
    assert r["buyers"] > 5000
    assert 0.85 <= r["ratio"] <= 1.15, r
    assert r["gini"] >= r["gini_head"] - 0.01 and r["gini"] > 0.6, r
    assert r["cal"].label() == "predicted value, next 273 days (USD)"


def test_synthetic_default_value_holds_and_no_few_customers_dominate():
    x, y = _synthetic(3, 6000, seed=11, mode="default")
    r = _check(x, y, 30.0)
    assert 0.85 <= r["ratio"] <= 1.15, r
    assert r["gini"] >= r["gini_head"] - 0.01, r
    top = np.sort(r["value"])[::-1]
    assert top[: len(top) // 100].sum() / top.sum() < 0.2  # expm1 of a log fit gave the top 1 % ~half the money


def test_rare_repeat_value_holds_on_held_out_customers():
    """1-3 % come back: the mean holds, and the ranking is no worse than the LTV head's alone.

    Whether the return probability enters (``p_exponent > 0``) is decided on the training
    customers by cross-validation; which way it goes depends on the trained model, so the
    test checks the outcome (ratio and ranking on held-out customers), not the branch."""
    x, y = _synthetic(100, 16_000, seed=5, mode="rare-repeat")
    r = _check(x, y, 30.0, prior_rate=0.02)
    assert r["buyers"] >= 250 and 0.005 < y[:, 0].mean() < 0.04
    assert 0.85 <= r["ratio"] <= 1.15, r
    assert r["gini"] >= r["gini_head"] - 0.01 and r["gini"] > 0.6, r
