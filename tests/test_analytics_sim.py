"""Analytics queries end to end in Flower's Simulation Engine: the CLI, the ServerApp, the ClientApp
handlers, the nodes' ledgers, and a refusal that changes nothing."""

from __future__ import annotations

import json
import shutil

import pytest

pytestmark = pytest.mark.heavy

BUDGET = 3.0


@pytest.fixture(scope="module")
def silos(tmp_path_factory, synth_silos):
    from fedretain.privacy.budget import BudgetLedger, ledger_path

    data = tmp_path_factory.mktemp("analytics-sim") / "silos"
    shutil.copytree(synth_silos[0].parent, data)  # own copy: these tests write to the ledgers
    out = sorted(p for p in data.iterdir() if p.is_dir())
    for silo in out:
        with BudgetLedger.open(ledger_path(silo / ".node"), create=True) as led:
            led.set_budget("analytics", BUDGET)
    return out


def _ledgers(silos):
    from fedretain.consent.ledger import ConsentLedger
    from fedretain.privacy.budget import BudgetLedger, ledger_path

    out = {}
    for silo in silos:
        with BudgetLedger.open(ledger_path(silo / ".node")) as led:
            budget = (led.runs(), led.spends())
        with ConsentLedger.open(silo / ".node" / "consent.db") as cl:
            out[silo.name] = (*budget, [u.run_id for u in cl.usages()])
    return out


def test_cli_retention_curve_in_simulation(silos, tmp_path):
    """The CLI with its defaults (auto granularity): size release, choice, query, on every merchant."""
    from click.testing import CliRunner

    from fedretain.cli import main

    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["analytics", "retention-curve", "--by", "none", "--epsilon", "1",
                                       "--data", str(silos[0].parent), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "auto: " in result.output and "(noisy, ε=0.2)" in result.output
    for ext in ("png", "csv", "json"):
        assert (out / f"retention_curve_by-none.{ext}").is_file()
    record = json.loads((out / "retention_curve_by-none.json").read_text())
    qid = record["query"]["query_id"]
    assert sorted(record["merchants"]) == [s.name for s in silos]
    assert {n["merchant-id"] for n in record["nodes"]} == {s.name for s in silos}
    assert record["auto"]["budget_split"]["size_epsilon"] == 0.2
    assert [c["id"] for c in record["privacy"]["charges"]] == [qid + "-size", qid]
    assert any(f["status"] != "suppressed" for f in record["figures"] if f["level"] == "curve")
    assert all(f[k] is None or f[k] >= 0 for f in record["figures"] for k in ("estimate", "ci_low"))
    for name, (runs, spends, usages) in _ledgers(silos).items():
        assert [r.run_id for r in runs] == [qid + "-size", qid], name
        assert 0.98 <= sum(s.epsilon for s in spends) <= 1.0
        assert usages.count(qid) == 1 and usages.count(qid + "-size") == 1


def test_over_budget_query_is_refused_in_simulation_and_changes_nothing(silos, tmp_path):
    from fedretain.analytics.queries import QuerySpec
    from fedretain.server.analytics import AnalyticsRefused
    from fedretain.server.analytics_app import run_query_in_simulation

    before = _ledgers(silos)
    spec = QuerySpec("repeat_rate", by="referral", epsilon=BUDGET + 1)
    with pytest.raises(AnalyticsRefused) as err:
        run_query_in_simulation(spec, silos[0].parent, tmp_path)
    msg = str(err.value)
    assert "refused before any node spent anything" in msg
    assert all(s.name in msg for s in silos) and f"needs ε={BUDGET + 1:g}" in msg
    assert _ledgers(silos) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repeat_rate_by-referral.refused.json"]
