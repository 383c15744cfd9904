"""``fedretain consent impact`` and the report's erasure sections, as an officer runs them (issue 13).

The node: alice and bob grant retention modelling; run A trains on both (rounds 1-2) and
evaluates alice; alice withdraws (through the CLI, now); run B trains on bob only. The
officer asks what happened to alice's data.
"""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from fedretain.cli.consent import consent
from fedretain.consent.ledger import ConsentLedger
from fedretain.consent.records import format_ts, parse_ts

PURPOSE = "retention_modeling"


def _run(*args: object, ok: bool = True):
    res = CliRunner().invoke(consent, [str(a) for a in args])
    assert "Traceback" not in res.output
    assert (res.exit_code == 0) == ok, res.output
    return res


def _run_json(tmp_path: Path, run_id: str, rounds: list[int], dp_mode: str = "local") -> Path:
    folder = tmp_path / "platform" / run_id
    (folder / "checkpoints").mkdir(parents=True)
    entries = []
    for r in rounds:
        ckpt = folder / "checkpoints" / f"round_{r:04d}.pt"
        ckpt.write_bytes(f"weights of {run_id} round {r}".encode())
        entries.append({"round": r, "checkpoint": f"checkpoints/{ckpt.name}"})
    rec = {"run_id": run_id, "config": {"dp_mode": dp_mode, "target_epsilon": 4.0, "target_delta": 1e-5},
           "rounds": entries}
    (folder / "run.json").write_text(json.dumps(rec))
    return folder / "run.json"


def _use(db: Path, run_id: str, rnd: int, phase: str, at: str, users: list[str]) -> None:
    key = db.parent / "node_key.pem" if db.name == "consent.db" else db.with_suffix(".key.pem")
    with ConsentLedger.open(db, key_path=key) as led:
        head = led.head()
        led.record_usage(run_id, rnd, PURPOSE, f"{phase}:recency_days,frequency", {"purchase_history": len(users)},
                         len(users), head.size, head.root_hex, at, users)


def _node(tmp_path: Path, loc: list[object]) -> tuple[Path, Path]:
    for user in ("alice", "bob"):
        _run("grant", user, "--purpose", PURPOSE, "--scopes", "purchase_history", "--at", "2024-01-01", *loc)
    return _run_json(tmp_path, "run-a", [1, 2]), _run_json(tmp_path, "run-b", [1, 2], dp_mode="none")


def _uses(db: Path) -> None:
    for rnd in (1, 2):
        _use(db, "run-a", rnd, "train", "2024-02-01", ["alice", "bob"])
    _use(db, "run-a", 2, "evaluate", "2024-02-01", ["alice"])


def test_impact_of_a_user_who_withdrew_between_two_runs(tmp_path):
    db = tmp_path / "node" / "consent.sqlite"
    _run("init", "--controller", "shop1", "--db", db)
    run_a, run_b = _node(tmp_path, ["--db", db])
    _uses(db)
    _run("withdraw", "alice", "--purpose", PURPOSE, "--db", db)  # effective now, between the runs
    for rnd in (1, 2):
        _use(db, "run-b", rnd, "train", format_ts(parse_ts("2099-01-01", "at")), ["bob"])

    out = _run("impact", "alice", "--runs", run_a, "--runs", run_b, "--db", db).output
    assert "NO CONSENT" in out and "alice no longer consents" in out
    assert "run-a round 1" in out and "run-a round 2" in out  # the models a retrain replaces, named
    assert "run-b" not in out  # run B never read alice's data
    assert "ε=4, δ=1.0e-05 (local DP)" in out and "evaluate" in out

    data = json.loads(_run("impact", "alice", "--runs", run_a, "--runs", run_b, "--json", "--db", db).output)
    assert data["scopes_now"] == {PURPOSE: []}
    assert [(u["run_id"], u["round"], u["phase"], u["consented_now"]) for u in data["uses"]] == [
        ("run-a", 1, "train", False), ("run-a", 2, "train", False), ("run-a", 2, "evaluate", False)]
    assert all(u["scopes_then"] == ["purchase_history"] for u in data["uses"])
    assert [(m["run_id"], m["round"]) for m in data["models_to_replace"]] == [("run-a", 1), ("run-a", 2)]
    assert all(len(m["sha256"]) == 64 for m in data["models_to_replace"])  # hashed from the kept checkpoints
    assert data["uses"][0]["dp"]["source"] == "run record (declared target)"

    bob = json.loads(_run("impact", "bob", "--runs", run_a, "--runs", run_b, "--json", "--db", db).output)
    assert {u["run_id"] for u in bob["uses"]} == {"run-a", "run-b"} and all(u["consented_now"] for u in bob["uses"])
    assert next(u for u in bob["uses"] if u["run_id"] == "run-b")["dp"]["epsilon"] is None

    # at a time before the withdrawal she still consented
    before = json.loads(_run("impact", "alice", "--json", "--at", "2024-03-01", "--db", db).output)
    assert before["scopes_now"] == {PURPOSE: ["purchase_history"]}

    res = _run("impact", "alcie", "--db", db, ok=False)
    assert "'alcie' has no consent record" in res.output

    # the officer's report: the just-recorded withdrawal is listed, run A is in the withdrawn-users table
    _run("report", "--out", tmp_path / "rep", "--runs", run_a, "--subject", "alice", "--db", db)
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [(w["subject_id"], w["action"]) for w in rep["withdrawals"]] == [("alice", "withdraw")]
    gone = rep["models_trained_on_withdrawn_users"]
    assert [(g["run_id"], g["withdrawn_users"], g["users_trained_on"]) for g in gone] == [("run-a", 1, 2)]
    assert [m["round"] for m in gone[0]["models"]] == [1, 2]
    assert rep["subjects"][0]["subject"] == "alice" and len(rep["subjects"][0]["models_to_replace"]) == 2
    assert {u["use"] for u in rep["usage"]} == {"training", "evaluation"}
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "Models trained on since-withdrawn users" in page and "Erasure impact per subject" in page


def test_a_withdrawal_effective_exactly_at_the_report_time_is_listed(tmp_path):
    db = tmp_path / "consent.sqlite"
    _run("init", "--controller", "shop1", "--db", db)
    _run("grant", "alice", "--purpose", PURPOSE, "--scopes", "purchase_history", "--at", "2024-01-01", "--db", db)
    _run("withdraw", "alice", "--purpose", PURPOSE, "--at", "2024-05-01T12:00:00Z", "--db", db)
    _run("report", "--out", tmp_path / "rep", "--at", "2024-05-01T12:00:00Z", "--db", db)
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [w["subject_id"] for w in rep["withdrawals"]] == ["alice"]
    assert rep["coverage_at"][PURPOSE]["any_scope"] == 0  # withdrawn at that instant
    _run("report", "--out", tmp_path / "rep2", "--at", "2024-05-01T11:59:59Z", "--db", db)
    rep = json.loads((tmp_path / "rep2" / "report.json").read_text())
    assert rep["withdrawals"] == [] and rep["coverage_at"][PURPOSE]["any_scope"] == 1


def test_impact_takes_the_dp_bound_from_the_nodes_privacy_ledger(tmp_path):
    from fedretain.privacy.budget import BudgetLedger, ledger_path
    from fedretain.privacy.budget_records import RunPlan

    silo = tmp_path / "shop"
    silo.mkdir()
    _run("init", "--controller", "shop1", "--silo", silo)
    run_a, _ = _node(tmp_path, ["--silo", silo])
    state = silo / ".node"
    _uses(state / "consent.db")
    with BudgetLedger.open(ledger_path(state), create=True, controller="shop1") as budget:
        budget.set_budget(PURPOSE, 10.0, 1e-4)
        budget.reserve(RunPlan("run-a", PURPOSE, "local", "rdp", 2.5, 1e-5, 1.1, 0.01, 100, 1000))
    _run("withdraw", "alice", "--purpose", PURPOSE, "--silo", silo)
    data = json.loads(_run("impact", "alice", "--runs", run_a, "--json", "--silo", silo).output)
    dp = data["uses"][0]["dp"]
    assert (dp["epsilon"], dp["delta"], dp["source"]) == (2.5, 1e-5, "privacy ledger (reserved)")
    assert "privacy ledger" in data["dp_source"]


def test_export_filtered_by_subject_with_the_usage_log(tmp_path, monkeypatch):
    import fedretain.consent.cli_export as cli_export

    monkeypatch.setattr(cli_export, "PROGRESS_FROM", 0)  # the progress bar (stderr) runs on this small export
    db = tmp_path / "consent.sqlite"
    _run("init", "--controller", "shop1", "--db", db)
    _node(tmp_path, ["--db", db])
    _uses(db)
    _run("withdraw", "alice", "--purpose", PURPOSE, "--db", db)
    res = _run("export", "--format", "json", "--out", tmp_path / "a.json", "--subject", "alice", "--with-usage",
               "--db", db)
    assert "exported 2 record(s)" in res.output and "3 usage entries" in res.output
    data = json.loads((tmp_path / "a.json").read_text())
    assert {r["subject_id"] for r in data["records"]} == {"alice"} and data["subjects"] == ["alice"]
    assert [(u["run_id"], u["round"]) for u in data["usage"]] == [("run-a", 1), ("run-a", 2), ("run-a", 2)]
    _run("export", "--format", "csv", "--out", tmp_path / "b.csv", "--subject", "bob", "--with-usage", "--db", db)
    assert "alice" not in (tmp_path / "b.csv").read_text()
    assert (tmp_path / "b.usage.csv").read_text().count("run-a") == 2  # bob: two training rounds
    res = _run("export", "--format", "csv", "--out", tmp_path / "c.csv", "--subject", "alcie", "--db", db, ok=False)
    assert "'alcie'" in res.output and not (tmp_path / "c.csv").exists()
