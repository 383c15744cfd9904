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


def test_status_keeps_long_run_ids_whole_at_80_columns_and_shows_signed_cap_changes(tmp_path):
    """Issue 13: run ids are never wrapped; issue 10: a raised cap shows with its reason."""
    runner = CliRunner()
    res = runner.invoke(main, ["privacy", "set-budget", "--silo", str(tmp_path), "--epsilon", "4",
                               "--reason", "node policy 2026"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["privacy", "set-budget", "--silo", str(tmp_path), "--epsilon", "9"])
    assert res.exit_code != 0 and "needs a reason" in res.output
    res = runner.invoke(main, ["privacy", "set-budget", "--silo", str(tmp_path), "--epsilon", "9",
                               "--reason", "DPO ticket 42: second model family"])
    assert res.exit_code == 0, res.output
    run_id = "retention-local-dp-2026-12-04T19-00-00-0123456789abcdef"
    with BudgetLedger.open(ledger_path(tmp_path / ".node")) as ledger:
        ledger.reserve(RunPlan(run_id, PURPOSE, "local", "rdp", 3.0, 1e-5, 1.2, 0.1, 40, 400))
    res = runner.invoke(main, ["privacy", "status", "--silo", str(tmp_path)], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert f"  {run_id}" in lines  # the whole id on one line, nothing folded or cut
    assert all(len(line) <= 80 for line in lines if run_id not in line and "privacy.db" not in line
               and not line.startswith("    reason:"))
    i = lines.index(next(x for x in lines if x.endswith("node: raise ε=9 (was ε=4)")))
    assert lines[i + 1] == "    reason: DPO ticket 42: second model family"
    assert "Node cap (all purposes): ε=9.000; committed 3.000, remaining 6.000" in res.output
    data = json.loads(runner.invoke(main, ["privacy", "status", "--silo", str(tmp_path), "--json"]).output)
    assert [(e["kind"], e["reason"]) for e in data["cap_events"]] == [
        ("initial", "node policy 2026"), ("raise", "DPO ticket 42: second model family")]
    assert data["head"]["size"] == 3 and data["node"]["remaining_epsilon"] == 6.0


def test_status_refuses_a_tampered_ledger_with_a_clear_message(tmp_path):
    import sqlite3

    runner = CliRunner()
    assert runner.invoke(main, ["privacy", "set-budget", "--silo", str(tmp_path), "--epsilon", "4"]).exit_code == 0
    conn = sqlite3.connect(tmp_path / ".node" / "privacy.db")
    conn.execute("DROP TRIGGER budgets_no_delete")
    conn.execute("DELETE FROM budgets")
    conn.commit()
    conn.close()
    res = runner.invoke(main, ["privacy", "status", "--silo", str(tmp_path)])
    assert res.exit_code == 1 and "append-only triggers missing (budgets_no_delete)" in res.output
    assert "Traceback" not in res.output
