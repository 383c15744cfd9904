"""The Gaussian mechanism, intervals, the server's sum, and charging the analytics budget."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from fedretain.analytics.charge import QueryRefused, budget_state, charge_query
from fedretain.analytics.intervals import IntervalPolicy, ratio_estimates, sum_interval, z_value
from fedretain.analytics.mechanisms import GaussianMechanism, noise_multiplier
from fedretain.analytics.queries import QuerySpec
from fedretain.analytics.results import NodeAnswer, combine, sum_answers
from fedretain.privacy.accountant import DpEvent, PrivacyError, independent_epsilon
from fedretain.privacy.budget import BudgetLedger


@pytest.mark.parametrize("eps,delta", [(1.0, 1e-6), (0.5, 1e-5), (3.0, 1e-7)])
def test_noise_is_calibrated_within_epsilon_by_three_accountants(eps, delta):
    mech = GaussianMechanism.calibrated(eps, delta, l2_sensitivity=math.sqrt(7))
    opacus = mech.accountant().epsilon(delta)
    assert eps - 0.02 <= opacus <= eps  # Opacus' search stops just below the target
    assert mech.opendp_epsilon() <= eps + 1e-9  # OpenDP's own zCDP → (ε, δ) map of the measurement
    ev = [DpEvent(mech.noise_multiplier, 1.0, 1)]
    assert independent_epsilon(ev, delta, "pld") <= eps + 1e-3  # Google dp-accounting, tight PLD
    assert mech.scale == pytest.approx(mech.noise_multiplier * math.sqrt(7))


def test_more_privacy_means_more_noise():
    assert noise_multiplier(0.5, 1e-6) > noise_multiplier(1.0, 1e-6) > noise_multiplier(2.0, 1e-6)
    assert noise_multiplier(1.0, 1e-8) > noise_multiplier(1.0, 1e-5)


def test_check_fails_closed_when_noise_is_too_small():
    weak = GaussianMechanism(epsilon=1.0, delta=1e-6, l2_sensitivity=2.0, noise_multiplier=1.0)
    with pytest.raises(PrivacyError, match="refusing to release"):
        weak.check()


def test_release_adds_noise_of_the_stated_sd_per_bound():
    mech = GaussianMechanism.calibrated(1.0, 1e-6, l2_sensitivity=math.sqrt(3))
    n = 2000
    values = np.tile([100.0, 50.0, 20_000.0], n)
    bounds = np.tile([1.0, 1.0, 500.0], n)
    noisy, sd = mech.release(values, bounds)
    assert np.allclose(sd, mech.scale * bounds)
    err = (noisy - values) / bounds
    assert abs(err.mean()) < 4 * mech.scale / math.sqrt(err.size)
    assert np.std(err) == pytest.approx(mech.scale, rel=0.04)
    assert not np.array_equal(noisy, mech.release(values, bounds)[0])  # fresh noise each release
    with pytest.raises(PrivacyError):
        mech.release(np.array([1.0, np.nan]), np.array([1.0, 1.0]))
    with pytest.raises(PrivacyError):
        mech.release(np.array([1.0]), np.array([0.0]))


def test_intervals_cover_the_exact_ratio_at_the_stated_rate():
    """Delta-method interval of a noisy ratio, with noise from the real mechanism: ≈95% coverage."""
    mech = GaussianMechanism.calibrated(1.0, 1e-6, l2_sensitivity=math.sqrt(2))
    reps = 4000
    num, den = np.full(reps, 300.0), np.full(reps, 1000.0)
    noisy, sd = mech.release(np.concatenate([num, den]), np.ones(2 * reps))
    est = ratio_estimates(noisy[:reps], sd[:reps], noisy[reps:], sd[reps:], IntervalPolicy(), is_rate=True)
    covered = (est["ci_low"] <= 0.3) & (0.3 <= est["ci_high"])
    assert 0.93 <= covered.mean() <= 0.97
    assert z_value(0.95) == pytest.approx(1.959964, abs=1e-6)
    lo, hi = sum_interval(np.array([10.0]), np.array([2.0]), 0.95)
    assert lo[0] == pytest.approx(10 - 3.919928, abs=1e-5) and hi[0] == pytest.approx(10 + 3.919928, abs=1e-5)


def test_small_or_noisy_figures_are_suppressed_or_flagged():
    pol = IntervalPolicy(confidence=0.95, min_snr=10, flag_width=0.2)
    out = ratio_estimates(num=np.array([40.0, 400.0, 300.0, -5.0]), num_sd=np.array([10.0, 10.0, 40.0, 10.0]),
                          den=np.array([90.0, 1000.0, 420.0, 1000.0]), den_sd=np.array([10.0, 10.0, 40.0, 10.0]),
                          policy=pol, is_rate=True)
    assert list(out["status"]) == ["suppressed", "ok", "flagged", "ok"]
    assert math.isnan(out["estimate"][0])
    assert out["estimate"][3] == 0.0 and out["ci_low"][3] == 0.0  # rates are clipped to [0, 1]
    assert out["ci_low"][1] < 0.4 < out["ci_high"][1]


def _answer(spec: QuerySpec, merchant: str, values: list[float], sd: float) -> NodeAnswer:
    cells = pd.DataFrame({"group": "all", "cohort": ["2026-06", "2026-06", "2026-07", "2026-07"], "step": [0, 1, 0, 1],
                          "measure": ["users", "retained", "users", "retained"], "value": [float(v) for v in values],
                          "sd": float(sd)})
    return NodeAnswer(merchant, spec.query_id, cells, spec.epsilon, spec.delta, 4.5, 2.0, "gaussian")


def test_server_sums_answers_and_pools_cohorts():
    spec = QuerySpec("retention_curve", periods=1, cohorts=2, end="2026-09-01")
    a = _answer(spec, "m0", [1000, 300, 2000, 500], 10.0)
    b = _answer(spec, "m1", [3000, 900, 1000, 400], 20.0)
    b2 = NodeAnswer.from_config(b.to_config())
    assert b2.cells.equals(b.cells) and b2.merchant_id == "m1"
    summed = sum_answers([a, b2])
    assert summed["value"].tolist() == [4000, 1200, 3000, 900]
    assert summed["sd"].tolist() == pytest.approx([math.sqrt(500)] * 4)
    res = combine(spec, [a, b2], IntervalPolicy())
    curve = res.curve()
    assert len(curve) == 1
    assert curve["estimate"].iloc[0] == pytest.approx((1200 + 900) / (4000 + 3000))
    assert curve["denominator_sd"].iloc[0] == pytest.approx(math.sqrt(1000))
    cohorts = res.figures.loc[res.figures["level"] == "cohort"].set_index("cohort")
    assert cohorts.loc["2026-06", "estimate"] == pytest.approx(0.3)
    other = QuerySpec("retention_curve", periods=1, cohorts=2, end="2026-09-01")
    with pytest.raises(ValueError, match="not"):
        combine(other, [a])


def test_charge_records_each_query_and_refuses_over_budget(tmp_path):
    ledger_file = tmp_path / "privacy.db"
    spec = QuerySpec("repeat_rate", epsilon=1.0, end="2026-09-01")
    mech = GaussianMechanism.calibrated(spec.epsilon, spec.delta, spec.l2_sensitivity())
    with pytest.raises(QueryRefused, match="not found"):
        charge_query(ledger_file, spec, mech, 10)
    assert not ledger_file.exists() and not budget_state(ledger_file).ledger_found
    with BudgetLedger.open(ledger_file, create=True) as led:
        with pytest.raises(QueryRefused, match="no lifetime privacy budget"):
            charge_query(ledger_file, spec, mech, 10)
        led.set_budget("analytics", 1.5)
    spend = charge_query(ledger_file, spec, mech, 10)
    assert spend.run_id == spec.query_id and 0.98 <= spend.epsilon <= 1.0
    with pytest.raises(QueryRefused, match="already answered"):
        charge_query(ledger_file, spec, mech, 10)
    state = budget_state(ledger_file)
    assert state.committed_epsilon == pytest.approx(1.0) and state.remaining_epsilon == pytest.approx(0.5)
    assert "only ε=0.5" in state.refusal(1.0, 1e-6)
    second = QuerySpec("repeat_rate", epsilon=1.0, end="2026-09-01")
    with BudgetLedger.open(ledger_file) as led:
        before = (led.runs(), led.spends())
    with pytest.raises(QueryRefused, match="refused"):
        charge_query(ledger_file, second, mech, 10)
    with BudgetLedger.open(ledger_file) as led:
        assert (led.runs(), led.spends()) == before  # nothing written
        (run,) = led.runs("analytics")
        assert run.mode == "analytics:repeat_rate" and run.epsilon == 1.0
        assert [r["run_id"] for r in led.status()[0]["runs"]] == [spec.query_id]


def test_analytics_settings_from_a_deployment_run_config():
    """The keys documented for `flwr run` (pyproject defaults, "" = unset) parse into the same query."""
    from fedretain.server.analytics import AnalyticsSettings

    defaults = {"analytics-query": "repeat_rate", "analytics-by": "referral", "analytics-epsilon": 0.5,
                "analytics-delta": 1e-6, "analytics-period": "month", "analytics-periods": 6, "analytics-cohorts": 6,
                "analytics-windows": "30,60", "analytics-window-days": 90, "analytics-spend-cap": 500.0,
                "analytics-end": "", "analytics-query-id": "", "analytics-confidence": 0.9,
                "analytics-min-snr": 10.0, "analytics-flag-width": 0.2, "consent-at": "", "out-dir": "runs/a",
                "min-nodes": 2, "node-wait-timeout": 120.0, "round-timeout": 600.0, "data-dir": ""}
    s = AnalyticsSettings.from_run_config(defaults)
    assert (s.spec.kind, s.spec.by, s.spec.epsilon, s.spec.windows) == ("repeat_rate", "referral", 0.5, (30, 60))
    assert s.spec.query_id and s.policy.confidence == 0.9 and s.min_nodes == 2 and s.out_dir == "runs/a"
    again = AnalyticsSettings.from_run_config(s.to_run_config())
    assert again.spec == s.spec and again.policy == s.policy
    assert AnalyticsSettings.from_run_config(defaults).spec.query_id != s.spec.query_id  # fresh id per run
    with pytest.raises(ValueError, match="names no analytics query"):
        AnalyticsSettings.from_run_config({**defaults, "analytics-query": ""})


def test_negative_noisy_counts_are_shown_as_zero_and_advice_names_the_knobs():
    """A small shop's noisy sums can fall below 0: figures clamp them (post-processing) and say what to change."""
    spec = QuerySpec("repeat_rate", by="referral", epsilon=1.0, end="2024-06-01", windows=(30, 60))
    groups = ["friend_share", "organic"]
    rows = [(g, "all", w, m) for g in groups for w in (30, 60) for m in ("eligible", "repeat")]
    cells = pd.DataFrame(rows, columns=["group", "cohort", "step", "measure"])
    cells["value"] = [-3.0, -7.0, -2.0, 1.0, 900.0, 90.0, 900.0, 120.0]
    cells["sd"] = 4.0
    answer = NodeAnswer("m1", spec.query_id, cells, 1.0, spec.delta, 1.0, spec.l2_sensitivity(), "gaussian")
    result = combine(spec, [answer])
    figs = result.figures
    assert (figs["numerator"] >= 0).all() and (figs["denominator"] >= 0).all()
    friend = figs.loc[figs["group"] == "friend_share"]
    assert set(friend["status"]) == {"suppressed"}
    organic = figs.loc[figs["group"] == "organic"]
    assert set(organic["status"]) != {"suppressed"}
    assert (organic["ci_low"] <= organic["estimate"]).all()
    advice = result.suppression_advice()
    assert advice.startswith("2 of 4 figures suppressed")
    assert "--epsilon" in advice and "--windows" in advice and "--by referral" in advice
