"""LTV in money and the win-back list: calibration on held-out users, ranking by value at risk, output."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pytest
import torch

from fedretain.centralized import pool
from fedretain.clients.node import MerchantNode, NodeConfig
from fedretain.features import DEFAULT_FEATURES
from fedretain.ingest import write_table
from fedretain.ltv import MoneyCalibration, calibration_ratio, decile_table, normalized_gini, plot_deciles
from fedretain.models import ModelBundle, Standardizer, make_model
from fedretain.scoring import SCORE_COLUMNS, fit_money_calibration, merchant_currency, score_users
from fedretain.train import LocalTrainer, TrainConfig, predict

PURPOSE = "retention_modeling"
AT = datetime(2026, 11, 1, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def trained(synth_silos):
    """A logistic-regression bundle trained on the pooled training users of the shared small silos."""
    nodes = [MerchantNode(NodeConfig.for_silo(s)) for s in synth_silos]
    preps = [n.prepare(PURPOSE, list(DEFAULT_FEATURES), 30.0, None, AT) for n in nodes]
    pooled = pool(preps)
    scaler = Standardizer.fit(pooled.x_train)
    torch.manual_seed(0)
    model = make_model("logreg", pooled.x_train.shape[1], prior_rate=0.3)
    LocalTrainer(TrainConfig(epochs=30, batch_size=128, learning_rate=0.02)).fit(
        model, scaler.transform(pooled.x_train), pooled.y_train)
    bundle = ModelBundle(model.state_dict(), preps[0].columns, scaler, hidden=(), meta={"horizon_days": 30.0})
    return bundle, nodes, preps, pooled


def test_money_calibration_holds_on_held_out_users(trained, tmp_path):
    bundle, _, _, pooled = trained
    model = bundle.build_model()
    p_train, raw_train = predict(model, bundle.standardizer.transform(pooled.x_train))
    p_test, raw_test = predict(model, bundle.standardizer.transform(pooled.x_test))
    actual_train, actual_test = np.expm1(pooled.y_train[:, 1]), np.expm1(pooled.y_test[:, 1])
    assert calibration_ratio(actual_test, raw_test) < 0.8  # expm1 of a log1p regression: far below the mean
    cal = MoneyCalibration.fit(raw_train, actual_train, 30.0, "EUR", p_return=p_train)  # training users only
    assert cal.apply(raw_train, p_train).sum() == pytest.approx(actual_train.sum(), rel=1e-6)  # exact in the mean
    # 385 held-out users (103 buyers) spend 24 % less per head than the 951 training users: that sample
    # cannot judge ±15 %. Calibrations fitted on the other half value each half (cross-fitting), so every
    # user is valued out of sample; the per-dataset held-out checks are tests/test_ltv_calibration.py
    raw, p, actual = np.r_[raw_train, raw_test], np.r_[p_train, p_test], np.r_[actual_train, actual_test]
    half = np.arange(len(raw)) % 2 == 0
    value = np.zeros(len(raw))
    for fit, out in ((half, ~half), (~half, half)):
        value[out] = MoneyCalibration.fit(raw[fit], actual[fit], 30.0, p_return=p[fit]).apply(raw[out], p[out])
    ratio = calibration_ratio(actual, value)
    assert 0.85 <= ratio <= 1.15, ratio
    assert normalized_gini(actual_test, raw_test) > 0.3  # the ranking carries the value signal
    table = decile_table(actual_test, cal.apply(raw_test, p_test))
    assert list(table["decile"]) == list(range(1, 11)) and table["users"].sum() == len(actual_test)
    assert table["mean_actual"].iloc[-1] > 3 * table["mean_actual"].iloc[0]  # top decile spends far more
    png = plot_deciles(table, tmp_path / "deciles.png", currency="EUR", horizon_days=30)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cal.label() == "predicted value, next 30 days (EUR)"
    with pytest.raises(ValueError, match="only 0 labelled users spent"):
        MoneyCalibration.fit(raw_train, np.zeros_like(raw_train), 30.0)


def test_gini_and_ratio_reference_values():
    actual = np.array([0.0, 0.0, 10.0, 30.0])
    assert normalized_gini(actual, actual) == pytest.approx(1.0)
    assert normalized_gini(actual, -actual) < 0
    assert calibration_ratio(actual, actual * 1.1) == pytest.approx(1.1)
    assert np.isnan(normalized_gini(np.zeros(3), np.ones(3)))


def test_win_back_list_ranks_value_at_risk_not_past_spend(trained, synth_silos, tmp_path):
    bundle, nodes, preps, _ = trained
    cal = fit_money_calibration(bundle, preps[0], 30.0, "EUR")
    decision, gated = nodes[0].gate(PURPOSE, AT)
    scores = score_users(bundle, gated, nodes[0].data_end(), calibration=cal)
    assert list(scores.columns) == list(SCORE_COLUMNS) and len(scores) > 100
    assert list(scores["rank"]) == list(range(1, len(scores) + 1))
    at_risk = scores["churn_probability"] >= 0.6  # the default segmenter's threshold
    assert at_risk.iloc[0] and not at_risk.iloc[at_risk.sum():].any()  # the leaving come first
    assert scores.loc[at_risk, "expected_value_at_risk"].is_monotonic_decreasing
    assert scores.loc[~at_risk, "expected_value_at_risk"].is_monotonic_decreasing
    np.testing.assert_allclose(scores["expected_value_at_risk"],
                               scores["churn_probability"] * scores["value_if_retained"])
    loyal = scores[scores["return_probability"] >= scores["return_probability"].quantile(0.9)]
    top_spender = loyal.loc[loyal["past_spend"].idxmax()]
    assert top_spender["rank"] > 0.1 * len(scores)  # a loyal big spender is not at the head of the list
    assert scores.head(10)["churn_probability"].mean() > scores["churn_probability"].mean()
    # full precision survives the CSV
    write_table(scores, tmp_path / "scores.csv")
    back = pd.read_csv(tmp_path / "scores.csv")
    np.testing.assert_array_equal(back["churn_probability"].to_numpy(), scores["churn_probability"].to_numpy())
    assert (back["churn_probability"] * 1e4 % 1 != 0).any()  # not rounded to 4 places


def test_score_cli_is_readable_and_in_the_shop_currency(trained, synth_silos, tmp_path):
    from click.testing import CliRunner

    from fedretain.cli import main

    bundle, *_ = trained
    silo = tmp_path / "shop"
    shutil.copytree(synth_silos[0], silo)
    meta = json.loads((silo / "merchant.json").read_text())
    (silo / "merchant.json").write_text(json.dumps({**meta, "currency": "eur"}))
    model = bundle.save(tmp_path / "model.pt")
    res = CliRunner().invoke(main, ["score", "--model", str(model), "--data", str(silo), "--out",
                                    str(tmp_path / "s.csv"), "--top", "5"], terminal_width=100)
    assert res.exit_code == 0, res.output
    out = res.output
    for heading in ("chance of", "leaving", "value if", "retained", "value at", "risk", "(EUR)",
                    "Customers per segment"):
        assert heading in out
    assert "EUR over the next 30 days" in out and "dtype" not in out and "Name: count" not in out
    assert "…" not in out  # no truncated column or cell
    # scoring is a use of the users' data: the node's consent ledger records who was scored, for what
    scored = pd.read_csv(tmp_path / "s.csv", dtype={"user_id": str})
    with MerchantNode(NodeConfig.for_silo(silo)).ledger() as ledger:
        uses = [u for u in ledger.usages() if u.feature_set.startswith("score:")]
        assert len(uses) == 1 and uses[0].n_users == len(scored) and uses[0].purpose == PURPOSE
        first = scored["user_id"].iloc[0]
        assert any(u.feature_set.startswith("score:") for u in ledger.usages(subject=first))
        assert any(u.feature_set.startswith("score-calibration:") for u in ledger.usages())
    # back-test: scored as of an earlier day, with fewer customers known by then
    res = CliRunner().invoke(main, ["score", "--model", str(model), "--data", str(silo), "--out",
                                    str(tmp_path / "s_asof.csv"), "--as-of", "2026-09-01"])
    assert res.exit_code == 0, res.output
    assert len(pd.read_csv(tmp_path / "s_asof.csv")) < len(scored)
    res = CliRunner().invoke(main, ["score", "--model", str(model), "--data", str(silo), "--out",
                                    str(tmp_path / "s_late.csv"), "--as-of", "2030-01-01"])
    assert res.exit_code == 1 and "after the end of this shop's data" in res.output
    (silo / "merchant.json").write_text(json.dumps({**meta, "currency": 12}))
    res = CliRunner().invoke(main, ["score", "--model", str(model), "--data", str(silo), "--out",
                                    str(tmp_path / "s2.csv")])
    assert res.exit_code == 1 and "field 'currency'" in res.output and "Traceback" not in res.output
    with pytest.raises(ValueError, match="currency"):
        merchant_currency({"currency": "€ euro"})
