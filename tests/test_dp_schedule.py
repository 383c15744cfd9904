"""DP defaults that fit the data (issue 12): batch and rounds from the record count, warnings, overrides.

Every ε below is the Opacus accountant's (``fedretain.privacy.accountant``), never re-derived here.
"""

from __future__ import annotations

import math

import pytest

from fedretain.privacy.accountant import Accountant, DpEvent, default_delta
from fedretain.privacy.schedule import (
    AGGREGATE_ROUND_CHOICES,
    RHO_MAX,
    SIGMA_MAX,
    aggregate_schedule,
    local_batch_size,
    local_schedule_note,
)
from fedretain.server.settings import RunSettings


def _spent(s, epsilon_delta_n):
    eps, n = epsilon_delta_n
    return Accountant("rdp", [DpEvent(s.noise_multiplier, s.sample_rate, s.rounds)]).epsilon(default_delta(n))


@pytest.fixture(scope="module")
def mid():
    return aggregate_schedule(2.7, 0.0, 20_000)


def test_aggregate_auto_fits_a_mid_sized_population(mid):
    # a quarter of the customers per step (q = 1/4), as many rounds as keep σ sane, and the target ε spent
    assert mid.expected_batch == 5000 and mid.sample_rate == pytest.approx(0.25)
    assert mid.rounds in AGGREGATE_ROUND_CHOICES and mid.rounds >= 50
    assert 1.0 <= mid.noise_multiplier <= SIGMA_MAX
    assert mid.noise_multiplier / mid.expected_batch <= RHO_MAX
    assert 0.9 * 2.7 <= _spent(mid, (2.7, 20_000)) <= 2.7 + 1e-6
    nxt = AGGREGATE_ROUND_CHOICES[AGGREGATE_ROUND_CHOICES.index(mid.rounds) + 1]
    # one more round choice would need more noise than the sane range: the accountant says it overspends there
    assert Accountant("rdp", [DpEvent(SIGMA_MAX, mid.sample_rate, nxt)]).epsilon(default_delta(20_000)) > 2.7
    assert mid.warnings == [] and mid.batch_chosen_by == mid.rounds_chosen_by == "auto"
    assert "N/4" in mid.reason and mid.as_dict()["mode"] == "aggregate"


def test_aggregate_auto_grows_with_the_population_and_warns_when_it_is_too_small(mid):
    big = aggregate_schedule(2.7, 0.0, 200_000)
    assert big.expected_batch == 8192 and big.sample_rate < mid.sample_rate  # batch capped, more rounds instead
    assert big.rounds > mid.rounds and big.noise_multiplier < mid.noise_multiplier and big.warnings == []
    tiny = aggregate_schedule(2.7, 0.0, 300)
    assert tiny.rounds == AGGREGATE_ROUND_CHOICES[0] and tiny.sample_rate == pytest.approx(0.25)
    [warning] = tiny.warnings
    assert "pooled population N=300 is small" in warning and "σ/B=" in warning


def test_an_operator_batch_above_the_population_is_clamped_to_one_and_warned():
    s = aggregate_schedule(2.7, 0.0, 3000, batch=4096, rounds=5)  # the old fixed default on a small pool
    assert s.sample_rate == 1.0 and s.rounds == 5 and s.expected_batch == 3000
    assert s.batch_chosen_by == s.rounds_chosen_by == "operator"
    assert any("sampling rate is clamped to 1" in w for w in s.warnings)
    assert _spent(s, (2.7, 3000)) <= 2.7 + 1e-6


def test_server_schedule_follows_dp_schedule_and_records_it(tmp_path):
    from fedretain.server.run_record import RunRecord
    from fedretain.server.secagg import aggregate_schedule as server_schedule
    from fedretain.server.secagg import record_schedule

    base = dict(dp_mode="aggregate", rounds=7, target_epsilon=3.0)
    fixed = server_schedule(RunSettings(**base, extra={"aggregate-population": 3000}))
    assert (fixed.rounds, fixed.sample_rate, fixed.rounds_chosen_by) == (7, 1.0, "operator")  # 4096 ≥ N: clamped
    auto = server_schedule(RunSettings(**base, dp_schedule="auto",
                                       extra={"aggregate-population": 3000, "aggregate-batch-size": 0}))
    assert auto.rounds_chosen_by == "auto" and auto.expected_batch == 750 and auto.sample_rate == 0.25
    record = RunRecord.create(tmp_path, "r1", {})
    record_schedule(record, None, fixed)  # type: ignore[arg-type]  # the run is only read in local mode
    again = RunRecord.load(tmp_path).data
    assert again["dp_schedule"]["rounds"] == 7 and again["dp_schedule"]["batch_chosen_by"] == "operator"
    events = [e["message"] for e in again["events"] if e["kind"] == "dp_schedule_warning"]
    assert events == fixed.warnings and any("clamped to 1" in m for m in events)
    with pytest.raises(ValueError, match="declared number of customers"):
        server_schedule(RunSettings(**base, dp_schedule="auto"))


def test_local_batches_are_sized_per_silo_with_a_note_for_tiny_silos():
    assert [local_batch_size(n) for n in (20, 100, 1000, 4000, 100_000)] == [32, 32, 125, 500, 1024]
    for n in (300, 1000, 4000, 9000):  # at least 8 DP-SGD steps an epoch below the cap
        assert math.ceil(n / local_batch_size(n)) >= 8
    assert "clamped to 1" in local_schedule_note(20, 32, "auto")["note"]
    assert "tiny silo (100 customers)" in local_schedule_note(100, 32, "auto")["note"]
    assert local_schedule_note(1000, 125, "auto") == {"batch": 125, "sample_rate": 0.125, "chosen_by": "auto",
                                                      "note": ""}


def test_preflight_plans_local_nodes_with_the_batch_the_node_will_use():
    from fedretain.privacy.preflight import node_plans

    auto = RunSettings(dp_mode="local", dp_schedule="auto", rounds=2, local_epochs=1)
    [(_, small), (_, large)] = node_plans(auto, [("a", 200), ("b", 5000)], epsilon=2.7)
    assert small.sample_rate == pytest.approx(1 / math.ceil(200 / 32))  # batch 32 (n/8 = 25 → the floor 32)
    assert large.sample_rate == pytest.approx(1 / 8) and small.epsilon == 2.7
    [(_, fixed)] = node_plans(RunSettings(dp_mode="local", rounds=2, local_epochs=1), [("b", 5000)])
    assert fixed.sample_rate == pytest.approx(1 / math.ceil(5000 / 256)) and fixed.epsilon == 3.0


def test_local_schedule_record_names_the_rule_not_the_counts():
    from fedretain.privacy.schedule import local_schedule_record

    rec = local_schedule_record(RunSettings(dp_mode="local", dp_schedule="auto"))
    assert rec["schedule"] == "auto" and "its training users / 8" in rec["rule"] and "does not send" in rec["chosen_by"]
    assert local_schedule_record(RunSettings(dp_mode="local", batch_size=64))["rule"] == "batch-size 64 on every node"


def test_bad_schedule_values_are_refused_with_the_key_named():
    with pytest.raises(ValueError, match="unknown dp-schedule 'sometimes'"):
        RunSettings(dp_schedule="sometimes")
    from fedretain.privacy.accountant import PrivacyError
    from fedretain.privacy.schedule import operator_batch

    with pytest.raises(PrivacyError, match="aggregate-batch-size must be a number"):
        operator_batch(RunSettings(extra={"aggregate-batch-size": "big"}))
    assert operator_batch(RunSettings(extra={"aggregate-batch-size": 0})) is None


def test_simulate_shows_the_schedule_and_its_warnings_before_starting(monkeypatch, synth_silos):
    from rich.console import Console

    import fedretain.cli.train as cli

    out = Console(record=True, width=200)
    monkeypatch.setattr(cli, "console", out)
    cli.print_dp_schedule(RunSettings(dp_mode="aggregate", dp_schedule="auto",
                                      extra={"aggregate-population": 300}), synth_silos)
    text = out.export_text()
    assert "aggregate DP schedule: N=300, expected batch 75 (auto), q=0.25, 50 rounds (auto)" in text
    assert "warning:" in text and "pooled population N=300 is small" in text
    cli.print_dp_schedule(RunSettings(dp_mode="local", dp_schedule="auto"), synth_silos)
    text = out.export_text()
    assert "Local DP batches, sized per silo" in text
    for silo in synth_silos:
        assert silo.name in text
