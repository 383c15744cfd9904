"""Auto retention granularity: a 2,500-user shop at ε = 1 with the defaults publishes most figures, a
50,000-user pool gets a finer grid, the budget ledger carries the size release and the query, and a node
whose budget covers the size release but not the query refuses before spending anything.

The node path runs in-process (no Ray), as in tests/test_analytics_dp.py; the CLI with these defaults runs in
Flower's Simulation Engine in tests/test_analytics_sim.py (heavy)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from fedretain.analytics.charge import QueryRefused
from fedretain.analytics.granularity import (
    BUCKETS,
    AutoSettings,
    SizeAnswer,
    SizeEstimate,
    choose,
    reason,
    size_cells,
    size_spec,
    split_budget,
    sum_sizes,
)
from fedretain.analytics.intervals import IntervalPolicy
from fedretain.analytics.mechanisms import MECHANISM, GaussianMechanism
from fedretain.analytics.queries import QuerySpec, query_inputs
from fedretain.analytics.results import combine

BUDGET = 3.0
POLICY = IntervalPolicy()


def _node(root, n_users: int, budget: float, seed: int = 11):
    from fedretain.clients.node import MerchantNode
    from fedretain.clients.provision import provision_node
    from fedretain.privacy.budget import BudgetLedger, ledger_path
    from fedretain.synth import generate

    (silo,) = generate(root / "silos", n_merchants=1, n_users=n_users, seed=seed)
    cfg = provision_node(silo)
    with BudgetLedger.open(ledger_path(cfg.state_dir), create=True) as led:
        led.set_budget("analytics", budget, note="test")
    return MerchantNode(cfg)


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """One synthetic 2,500-user shop with an analytics budget of ε = 3."""
    return _node(tmp_path_factory.mktemp("shop2500"), 2500, BUDGET)


def _ledger(node):
    from fedretain.privacy.budget import BudgetLedger, ledger_path

    with BudgetLedger.open(ledger_path(node.config.state_dir)) as led:
        state = (led.runs(), led.spends(), led.committed("analytics"))
    with node.ledger() as cl:
        return (*state, [u.run_id for u in cl.usages()])


def _auto_query(node, spec: QuerySpec, auto: AutoSettings):
    """The ServerApp's auto path (server/analytics.py FederatedQuery.size_release) with one in-process node."""
    from fedretain.clients.analytics_handlers import answer_query, answer_size

    split = split_budget(spec.epsilon, spec.delta, auto.size_share)
    then = replace(spec, epsilon=split.query_epsilon, delta=split.query_delta)
    size = sum_sizes([answer_size(node, size_spec(spec, split), then)])
    choice = choose(spec, auto, size, split, POLICY)
    final = replace(then, period=choice.period, cohorts=choice.cohorts, periods=choice.periods)
    return split, size, choice, combine(final, [answer_query(node, final)], POLICY)


def test_a_2500_user_shop_at_epsilon_1_publishes_most_figures_with_the_defaults(shop):
    end = shop.data_end().isoformat()
    spec = QuerySpec("retention_curve", epsilon=1.0, end=end)  # 6 × 6 monthly: only placeholders under auto
    split, size, choice, result = _auto_query(shop, spec, AutoSettings())
    figs = result.figures
    published = float((figs["status"] != "suppressed").mean())
    print(f"auto: {choice.cohorts} {choice.period} cohorts × {choice.periods} periods from ≈{size.total:,.0f} users "
          f"(expected {choice.expected_share:.0%}): {published:.0%} of {len(figs)} figures published")
    assert choice.met_target and published >= 0.8
    assert (choice.period, choice.cohorts, choice.periods) != ("month", 6, 6)
    shown = figs.loc[figs["status"] != "suppressed"]
    for col in ("numerator", "denominator", "estimate", "ci_low"):  # what is displayed is never negative
        assert (figs[col].dropna() >= 0).all() and (shown[col] >= 0).all(), col
    # the noisy size is the users counted (granted analytics for purchase_history), within the noise
    with shop.ledger() as cl:
        counted = [u.n_users for u in cl.usages() if u.run_id.endswith("-size")][-1]
    assert 1_000 <= counted <= 2_500 and abs(size.total - counted) <= 5 * size.total_sd, (counted, size.total)

    # the fixed defaults on the same shop, at the same ε, publish less (the complaint)
    fixed = QuerySpec("retention_curve", epsilon=1.0, end=end, periods=6, cohorts=6)
    from fedretain.clients.analytics_handlers import answer_query

    old = combine(fixed, [answer_query(shop, fixed)], POLICY).figures
    assert (old["status"] != "suppressed").mean() < published

    # the budget ledger shows both charges of the auto query, and their sum is the ε asked for
    runs, spends, _, usages = _ledger(shop)
    mine = {r.run_id: r for r in runs if r.run_id.startswith(spec.query_id)}
    assert set(mine) == {spec.query_id + "-size", spec.query_id}
    assert mine[spec.query_id + "-size"].mode == "analytics:size"
    assert mine[spec.query_id + "-size"].epsilon == pytest.approx(split.size_epsilon) == pytest.approx(0.2)
    assert mine[spec.query_id].epsilon == pytest.approx(0.8) and mine[spec.query_id].mode == "analytics:retention_curve"
    assert sum(r.epsilon for r in mine.values()) <= 1.0 + 1e-9
    assert sum(r.delta for r in mine.values()) <= 1e-6 * (1 + 1e-9)
    assert {s.run_id for s in spends} >= set(mine)
    assert usages.count(spec.query_id + "-size") == 1 and usages.count(spec.query_id) == 1


def _noisy_sizes(exact: pd.DataFrame, merchant: str, scale: float) -> SizeAnswer:
    """A merchant's size release: ``scale`` × the exact cells, noised by the real mechanism at ε = 0.2."""
    mech = GaussianMechanism.calibrated(0.2, 5e-7, 1.0)
    noisy, sd = mech.release(exact["value"].to_numpy(float) * scale, np.ones(len(exact)))
    return SizeAnswer(merchant, "q-size", exact[["group", "bucket"]].assign(value=noisy, sd=sd), 0.2, 5e-7,
                      mech.noise_multiplier, MECHANISM)


def test_a_50000_user_pool_gets_a_finer_grid_than_the_2500_user_shop(shop):
    spec = QuerySpec("retention_curve", epsilon=1.0, end=shop.data_end().isoformat())
    _, gated = shop.gate("analytics")
    exact = size_cells(spec, query_inputs(spec, gated, shop.silo.merchant))
    assert list(exact["bucket"]) == list(BUCKETS) and exact["value"].sum() > 1_700
    split = split_budget(1.0, 1e-6, 0.2)
    small = choose(spec, AutoSettings(), sum_sizes([_noisy_sizes(exact, "m0", 1.0)]), split, POLICY)
    # four merchants of 12,500 users each with the same shape of first purchases: 50,000 users pooled
    pool = sum_sizes([_noisy_sizes(exact, f"m{i}", 5.0) for i in range(4)])
    big = choose(spec, AutoSettings(), pool, split, POLICY)
    print(f"2,500 users: {small}\n50,000 users: {big}")
    assert small.met_target and big.met_target
    assert big.figures > small.figures  # more figures expected to be shown
    assert (big.period, small.period) == ("week", "month")  # shorter periods for the bigger pool

    # every merchant adds its own noise: the same 50,000 users held by 20 merchants get no finer a grid
    twenty = sum_sizes([_noisy_sizes(exact, f"m{i}", 1.0) for i in range(20)])
    assert choose(spec, AutoSettings(), twenty, split, POLICY).figures <= big.figures + 1e-9


def test_choice_respects_explicit_counts_and_falls_back_when_no_grid_reaches_the_target():
    spec = QuerySpec("retention_curve", epsilon=1.0, end="2026-11-01")
    counts = pd.DataFrame({"group": "all", "bucket": list(BUCKETS), "value": [40.0, 60.0, 90.0, 0, 0, 0],
                           "sd": 27.5})
    split = split_budget(1.0, 1e-6, 0.2)
    auto = AutoSettings()
    tiny = choose(spec, auto, SizeEstimate(counts, 1), split, POLICY)  # ≈ 30 first-time buyers a month
    assert not tiny.met_target and tiny.expected_share < 0.8
    assert "no grid of the" in reason(tiny, auto, POLICY) and "small for this ε" in reason(tiny, auto, POLICY)
    ample = SizeEstimate(counts.assign(value=counts["value"] * 20), 1)
    fixed = choose(spec, AutoSettings(period=False, periods=False, cohorts=True), ample, split, POLICY)
    assert (fixed.period, fixed.periods) == ("month", 6) and fixed.met_target  # only the cohorts were auto
    assert choose(spec, auto, ample, split, POLICY).figures >= fixed.figures
    # a breakdown with a tiny group: the group no grid can publish does not force the coarsest grid on the rest
    two = SizeEstimate(pd.concat([ample.counts.assign(group="organic"), counts.assign(group="unknown", value=2.0)]),
                       1)
    split_by = choose(replace(spec, by="referral"), auto, two, split, POLICY)
    assert split_by.met_target and split_by.small_groups == ("unknown",) and split_by.figures > 5
    assert "unknown have too few users for any grid" in reason(split_by, auto, POLICY)


def test_budget_split_is_stated_and_fails_clearly_when_too_small():
    s = split_budget(1.0, 1e-6, 0.2)
    assert (s.size_epsilon, s.query_epsilon, s.size_delta, s.query_delta) == (0.2, 0.8, 5e-7, 5e-7)
    raised = split_budget(1.0, 1e-6, 0.1)  # ε = 0.1 cannot be calibrated by the RDP accountant at δ = 5e-7
    assert raised.size_epsilon == 0.2 and "below what the accountant can calibrate" in raised.note
    from fedretain.analytics.queries import QueryError

    with pytest.raises(QueryError, match="give --cohorts and --periods as numbers"):
        split_budget(0.3, 1e-6, 0.2)


def test_a_node_whose_budget_covers_the_size_release_but_not_the_query_refuses_before_spending(tmp_path):
    from fedretain.clients.analytics_handlers import answer_size

    node = _node(tmp_path, 600, budget=0.5, seed=5)  # covers ε = 0.2 (size), not 0.2 + 0.8
    spec = QuerySpec("retention_curve", epsilon=1.0, end=node.data_end().isoformat())
    split = split_budget(1.0, 1e-6, 0.2)
    before = _ledger(node)
    # the server (or an attacker in its place) skips its own budget check and asks the node directly
    with pytest.raises(QueryRefused, match=r"refused before its size release, nothing spent.*needs ε=1"):
        answer_size(node, size_spec(spec, split), replace(spec, epsilon=split.query_epsilon,
                                                          delta=split.query_delta))
    assert _ledger(node) == before  # no reservation, no spend, no usage record
    # announcing a smaller query to get the size released does not buy the query later
    cheap = replace(spec, epsilon=0.3, delta=split.query_delta)
    answer_size(node, size_spec(spec, split), cheap)
    from fedretain.clients.analytics_handlers import answer_query

    with pytest.raises(QueryRefused, match="remains"):
        answer_query(node, replace(cheap, epsilon=0.8, periods=2, cohorts=2))


def test_run_config_carries_auto_for_deployment_and_explicit_numbers_stay_as_before(tmp_path):
    from click.testing import CliRunner

    from fedretain.cli import main
    from fedretain.server.analytics import AnalyticsSettings

    def cfg(*args: str) -> dict:
        out = CliRunner().invoke(main, ["analytics", "retention-curve", "--out", str(tmp_path), "--print-run-config",
                                        *args])
        assert out.exit_code == 0, out.output
        return dict(kv.split("=", 1) for kv in out.output.split())

    auto = cfg()
    assert (auto["analytics-period"], auto["analytics-periods"], auto["analytics-cohorts"]) == ("'auto'",) * 3
    assert auto["analytics-size-share"] == "0.2" and auto["analytics-auto-target"] == "0.8"
    settings = AnalyticsSettings.from_run_config({k: v.strip("'") for k, v in auto.items()})
    assert settings.auto_applies and settings.auto.names() == ["period", "cohorts", "periods"]
    assert settings.to_run_config()["analytics-periods"] == "auto"
    explicit = cfg("--periods", "3", "--cohorts", "4")
    assert (explicit["analytics-period"], explicit["analytics-periods"], explicit["analytics-cohorts"]) == (
        "'month'", "3", "4")
    assert "analytics-size-share" not in explicit
    assert not AnalyticsSettings.from_run_config({k: v.strip("'") for k, v in explicit.items()}).auto_applies
    week = cfg("--period", "week", "--periods", "4")
    assert (week["analytics-period"], week["analytics-periods"], week["analytics-cohorts"]) == ("'week'", "4",
                                                                                                "'auto'")
    bad = CliRunner().invoke(main, ["analytics", "retention-curve", "--out", str(tmp_path), "--cohorts", "many"])
    assert bad.exit_code == 2 and "neither a whole number nor 'auto'" in bad.output
