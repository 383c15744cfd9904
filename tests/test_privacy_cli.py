"""``fedretain privacy status`` / ``set-budget`` on a node's state folder."""

from __future__ import annotations

import json

from click.testing import CliRunner

from fedretain.cli import main
from fedretain.privacy.budget import BudgetLedger, RunPlan, ledger_path

PURPOSE = "retention_modeling"


def test_set_budget_then_status_shows_spent_and_remaining(tmp_path):
    silo = tmp_path / "shop"
    silo.mkdir()
    runner = CliRunner()
    res = runner.invoke(main, ["privacy", "set-budget", "--silo", str(silo), "--purpose", PURPOSE, "--epsilon", "4"])
    assert res.exit_code == 0, res.output
    assert (silo / ".node" / "privacy.db").is_file()
    with BudgetLedger.open(ledger_path(silo / ".node")) as ledger:
        ledger.reserve(RunPlan("run-a", PURPOSE, "local", "rdp", 3.0, 1e-5, 1.2, 0.1, 40, 400))

    res = runner.invoke(main, ["privacy", "status", "--state-dir", str(silo / ".node"), "--json"])
    assert res.exit_code == 0, res.output
    [row] = json.loads(res.output)["purposes"]
    assert (row["budget_epsilon"], row["committed_epsilon"], row["remaining_epsilon"]) == (4.0, 3.0, 1.0)
    assert row["runs"][0]["run_id"] == "run-a" and row["runs"][0]["spent_epsilon"] == 0.0

    res = runner.invoke(main, ["privacy", "status", "--silo", str(silo)])
    assert res.exit_code == 0, res.output
    assert "run-a" in res.output and "4.000" in res.output and "1.000" in res.output


def test_errors_are_clear(tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["privacy", "status", "--silo", str(tmp_path)])
    assert res.exit_code != 0 and "privacy ledger not found" in res.output
    res = runner.invoke(main, ["privacy", "status"])
    assert res.exit_code != 0 and "exactly one of --silo or --state-dir" in res.output
    res = runner.invoke(main, ["privacy", "set-budget", "--silo", str(tmp_path), "--purpose", "marketing",
                               "--epsilon", "1"])
    assert res.exit_code != 0 and "unknown purpose" in res.output
