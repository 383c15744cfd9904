"""Person-level ε (issue 10 point 6) and the DP preflight of `fedretain simulate` (issue 13)."""

from __future__ import annotations

import shutil
import sys

import pytest
from click.testing import CliRunner

from fedretain.privacy.accountant import calibrate, default_delta, independent_epsilon
from fedretain.privacy.budget import BudgetLedger, RunPlan, ledger_path
from fedretain.privacy.person import (
    PersonCapExceeded,
    check_person_cap,
    person_epsilon,
    person_history,
    person_table,
    plan_events,
)

PURPOSE = "retention_modeling"


@pytest.fixture(scope="module")
def local_plan() -> RunPlan:
    """A local-mode node plan: 2000 records, batch 256, 2 epochs × 5 rounds, ε=3."""
    n, batches = 2000, 8
    delta = default_delta(n)
    sigma = calibrate(3.0, delta, 1 / batches, 5 * 2 * batches, "rdp")
    return RunPlan("local", PURPOSE, "local", "rdp", 3.0, delta, sigma, 1 / batches, 5 * 2 * batches, n)


@pytest.fixture(scope="module")
def aggregate_plan() -> RunPlan:
    """The aggregate-mode plan of 20 000 records over all nodes, batch 4096, 5 rounds, ε=3."""
    from fedretain.privacy.aggregate import plan_aggregate

    p = plan_aggregate(3.0, 0.0, 20_000, 4096, 5, 10.0)
    return RunPlan("agg", PURPOSE, "aggregate", "rdp", 3.0, p.delta, p.noise_multiplier, p.sample_rate, p.rounds,
                   20_000)


@pytest.mark.parametrize("which", ["local_plan", "aggregate_plan"])
def test_person_epsilon_at_k_2_matches_dp_accounting_and_exceeds_per_record(which, request):
    plan = request.getfixturevalue(which)
    per_record = person_epsilon(plan, 1)
    person = person_epsilon(plan, 2)
    # independent: Google's dp-accounting composing the same person-level events
    expected = independent_epsilon(person_history(plan.mode, plan_events(plan), 2), plan.delta, "rdp")
    assert person == pytest.approx(expected, rel=0.01)
    assert per_record <= plan.epsilon < person


def test_local_mode_person_history_is_k_copies_and_aggregate_divides_the_noise(local_plan, aggregate_plan):
    [ev] = plan_events(local_plan)
    assert person_history("local", [ev], 3) == [ev, ev, ev]
    [agg] = person_history("aggregate", plan_events(aggregate_plan), 2)
    assert agg.noise_multiplier == pytest.approx(aggregate_plan.noise_multiplier / 2)
    assert agg.sample_rate == pytest.approx(1 - (1 - aggregate_plan.sample_rate) ** 2)
    rows = person_table(local_plan)
    assert [r.k for r in rows] == [1, 2, 5]
    assert rows[0].person_epsilon == rows[0].per_record_epsilon
    assert rows[0].person_epsilon < rows[1].person_epsilon < rows[2].person_epsilon


def test_a_plan_over_the_person_cap_is_refused(local_plan):
    assert check_person_cap(local_plan, 2, 0.0) > 3.0  # no cap: reported only
    with pytest.raises(PersonCapExceeded, match=r"person at up to 2 merchants ε=4\.\d+, above the person-level cap"):
        check_person_cap(local_plan, 2, 4.0)
    check_person_cap(local_plan, 1, 4.0)


@pytest.fixture()
def silos(tmp_path, synth_silos):
    data = tmp_path / "silos"
    shutil.copytree(synth_silos[0].parent, data)
    return sorted(p for p in data.iterdir() if p.is_dir())


def _simulate(silos, out, *extra):
    from fedretain.cli import main

    args = ["simulate", "--data", str(silos[0].parent), "--out", str(out), "--rounds", "2", "--local-epochs", "1",
            "--dp-mode", "local", "--target-epsilon", "3", *extra]
    return CliRunner().invoke(main, args)


def _no_simulation_started(out):
    assert not out.exists()  # no run folder, no run record
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()


def test_simulate_refuses_an_exhausted_budget_before_starting_ray(tmp_path, silos):
    for i, silo in enumerate(silos):
        with BudgetLedger.open(ledger_path(silo / ".node"), create=True) as ledger:
            ledger.set_node_cap(5.0 if i else 2.0, reason="test policy")
    out = tmp_path / "run"
    res = _simulate(silos, out)
    assert res.exit_code == 1, res.output
    assert "DP run refused before starting the simulation" in res.output
    assert f"{silos[0].name}: run " in res.output and "only ε=2 of the lifetime budget ε=2 remains" in res.output
    assert silos[1].name + ":" not in res.output  # only the silo without room is named
    _no_simulation_started(out)


def test_simulate_refuses_a_tampered_or_missing_ledger_before_starting_ray(tmp_path, silos):
    out = tmp_path / "run"
    res = _simulate(silos, out)  # no budgets at all
    assert res.exit_code == 1 and "privacy ledger not found" in res.output
    _no_simulation_started(out)


def test_simulate_refuses_a_run_over_the_person_cap_before_any_training(tmp_path, silos):
    for silo in silos:
        with BudgetLedger.open(ledger_path(silo / ".node"), create=True) as ledger:
            ledger.set_node_cap(10.0, reason="test policy")
    out = tmp_path / "run"
    res = _simulate(silos, out, "--max-merchants-per-person", "2", "--person-epsilon-cap", "3.5")
    assert res.exit_code == 1, res.output
    assert "Per-record vs person-level ε" in res.output  # reported next to the per-record ε
    assert "gives a person at up to 2 merchants ε=" in res.output and "person-epsilon-cap=3.5" in res.output
    _no_simulation_started(out)
    for silo in silos:  # nothing reserved anywhere
        with BudgetLedger.open(ledger_path(silo / ".node")) as ledger:
            assert ledger.runs() == []
