"""End to end in Flower's Simulation Engine: rounds, checkpoints, run record, lineage,
withdrawal between rounds, no user ids on the server, resume, and scoring."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.heavy

ROUNDS = 3


class WithdrawAfterRound:
    """Observer that records a withdrawal in a merchant's ledger right after round 2."""

    def __init__(self, silo: Path, subject: str) -> None:
        self.silo, self.subject, self.done_at = silo, subject, None

    def on_start(self, *args) -> None: ...

    def on_end(self, *args) -> None: ...

    def on_round_trained(self, entry) -> None:
        from fedretain.consent.ledger import ConsentLedger
        from fedretain.consent.records import ConsentRecord

        if entry["round"] != 2:
            return
        node = self.silo / ".node"
        with ConsentLedger.open(node / "consent.db", key_path=node / "node_key.pem") as ledger:
            self.done_at = datetime.now(timezone.utc)
            ledger.append(ConsentRecord.withdraw(self.subject, self.silo.name, "retention_modeling", self.done_at,
                                                 recorded_by="test"))


@pytest.fixture(scope="module")
def run(tmp_path_factory, synth_silos):
    from fedretain.clients.node import MerchantNode, NodeConfig
    from fedretain.server import progress
    from fedretain.server.settings import RunSettings
    from fedretain.server.simulation import run_in_simulation

    data = tmp_path_factory.mktemp("sim") / "silos"
    shutil.copytree(synth_silos[0].parent, data)  # own copy: this test appends to a ledger
    silos = sorted(p for p in data.iterdir() if p.is_dir())
    prep = MerchantNode(NodeConfig.for_silo(silos[0])).prepare("retention_modeling", ["recency_days"], 30)
    subject = str(prep.train_users[0])
    observer = WithdrawAfterRound(silos[0], subject)
    settings = RunSettings(rounds=ROUNDS, local_epochs=3, learning_rate=0.02, out_dir=str(data.parent / "run"),
                           min_nodes=3, run_id="simtest")
    progress.add_observer(observer)
    try:
        run_dir = run_in_simulation(settings, data)
    finally:
        progress.remove_observer(observer)
    return {"dir": run_dir, "record": json.loads((run_dir / "run.json").read_text()), "silos": silos,
            "subject": subject, "observer": observer, "settings": settings}


def test_rounds_checkpoints_and_metrics(run):
    rec = run["record"]
    assert rec["status"] == "completed"
    assert [r["round"] for r in rec["rounds"]] == [1, 2, 3]
    for r in rec["rounds"]:
        assert Path(r["checkpoint"]).is_file()
        assert 0.5 < r["evaluate"]["auc"] <= 1.0
        assert r["evaluate"]["num-examples"] > 0 and "log_loss" in r["evaluate"] and "ece" in r["evaluate"]
        trained = {n["merchant_id"] for n in r["nodes"] if n["phase"] == "train" and not n["error"]}
        assert trained == {p.name for p in run["silos"]}
    # each round's model was evaluated in the next exchange; the last one in a final evaluate exchange
    assert [r["evaluated_in_round"] for r in rec["rounds"]] == [2, 3, 3]
    assert rec["rounds"][-1]["evaluate"]["auc"] > 0.7  # it learned
    assert set(rec["merchants"]) == {p.name for p in run["silos"]}
    assert all(m["rounds"] == [1, 2, 3] for m in rec["merchants"].values())
    assert (run["dir"] / "model.pt").is_file()


def test_every_node_receives_the_final_model_and_scores_with_it(run, tmp_path):
    import hashlib

    from click.testing import CliRunner

    from fedretain.cli.train import score

    rec = run["record"]
    final = hashlib.sha256((run["dir"] / "model.pt").read_bytes()).hexdigest()
    for r in rec["rounds"]:  # each round names its model by the checkpoint file's hash
        assert r["model_sha256"] == hashlib.sha256(Path(r["checkpoint"]).read_bytes()).hexdigest()
    assert rec["rounds"][-1]["model_sha256"] == final
    delivery = rec["delivery"]
    assert delivery["model_sha256"] == final and delivery["round"] == 3
    assert {n["merchant_id"] for n in delivery["nodes"] if n["acknowledged"]} == {p.name for p in run["silos"]}
    assert all(n["model_sha256"] == final and n["error"] is None for n in delivery["nodes"])
    for silo in run["silos"]:
        latest = silo / ".node" / "models" / "latest.pt"
        assert hashlib.sha256(latest.read_bytes()).hexdigest() == final
        assert (silo / ".node" / "models" / "simtest.pt").read_bytes() == latest.read_bytes()
    out = tmp_path / "scores.csv"
    res = CliRunner().invoke(score, ["--silo", str(run["silos"][1]), "--out", str(out)])
    assert res.exit_code == 0, res.output
    import pandas as pd

    scores = pd.read_csv(out)
    assert len(scores) > 0 and "expected_value_at_risk" in scores.columns


def test_each_round_is_tied_to_each_merchants_consent_state(run):
    for r in run["record"]["rounds"]:
        for n in r["nodes"]:
            lin = n["lineage"]
            assert len(lin["ledger-root"]) == 64 and lin["ledger-size"] > 0 and lin["purpose"] == "retention_modeling"
            assert n["metrics"]["users-used"] >= n["metrics"]["scope-purchase_history"] > 0
    m0 = run["silos"][0].name
    sizes = [next(n["lineage"]["ledger-size"] for n in r["nodes"] if n["merchant_id"] == m0 and n["phase"] == "train")
             for r in run["record"]["rounds"]]
    assert sizes[2] == sizes[1] + 1  # the withdrawal appended after round 2 is part of round 3's consent state


def test_withdrawal_takes_effect_at_the_next_round(run):
    from fedretain.consent.ledger import ConsentLedger

    with ConsentLedger.open(run["silos"][0] / ".node" / "consent.db") as ledger:
        used = ledger.usages(subject=run["subject"])
        all_usage = [u for u in ledger.usages() if u.run_id == "simtest"]
    assert sorted({u.round for u in used if u.run_id == "simtest"}) == [1, 2]
    assert {u.round for u in all_usage} == {1, 2, 3}  # round 3 ran, without this user
    r3 = [u for u in all_usage if u.round == 3 and u.feature_set.startswith("train:")]
    r2 = [u for u in all_usage if u.round == 2 and u.feature_set.startswith("train:")]
    assert r3[0].n_users == r2[0].n_users - 1


def test_server_records_hold_no_user_id(run):
    text = (run["dir"] / "run.json").read_text()
    ids = pd.read_csv(run["silos"][0] / "users.csv", dtype=str)["user_id"]
    assert not [u for u in ids if f'"{u}"' in text or f" {u} " in text]


def test_scoring_ranks_consented_buyers(run, tmp_path):
    from click.testing import CliRunner

    from fedretain.cli import main

    out = tmp_path / "scores.csv"
    res = CliRunner().invoke(main, ["score", "--model", str(run["dir"] / "model.pt"), "--data",
                                    str(run["silos"][1]), "--out", str(out)])
    assert res.exit_code == 0, res.output
    scores = pd.read_csv(out)
    assert list(scores["rank"]) == list(range(1, len(scores) + 1))
    at_risk = scores["churn_probability"] >= 0.6
    assert scores.loc[at_risk, "expected_value_at_risk"].is_monotonic_decreasing
    assert not at_risk.iloc[at_risk.sum():].any()
    assert scores["churn_probability"].between(0, 1).all() and (scores["predicted_ltv"] >= 0).all()
    assert set(scores["segment"]) <= {"high-value at risk", "low-value at risk", "loyal", "active", "new"}
    assert "Win-back list" in res.output


def test_resume_continues_from_the_last_checkpoint(run, tmp_path):
    """A restarted server with resume=true continues after the last completed round."""
    from dataclasses import replace

    from fedretain.server.simulation import run_in_simulation

    out = tmp_path / "resumed"
    shutil.copytree(run["dir"], out)
    rec = json.loads((out / "run.json").read_text())
    rec["rounds"] = rec["rounds"][:2]  # as if the server died during round 3
    rec["status"] = "running"
    (out / "run.json").write_text(json.dumps(rec))
    (out / "checkpoints" / "round_0003.pt").unlink()
    settings = replace(run["settings"], out_dir=str(out), resume=True, rounds=4)
    run_in_simulation(settings, run["silos"][0].parent)
    again = json.loads((out / "run.json").read_text())
    assert again["status"] == "completed"
    assert [r["round"] for r in again["rounds"]] == [1, 2, 3, 4]
    assert any(e["kind"] == "resumed" and e["from_round"] == 2 for e in again["events"])
    assert again["rounds"][0]["finished"] == rec["rounds"][0]["finished"]  # finished rounds were not rerun


def test_nodes_not_sampled_for_training_still_evaluate(run, tmp_path):
    """With fraction-train < 1, the nodes left out of a round's training get an evaluate
    message in the same exchange, so every round's model is evaluated on every merchant."""
    from dataclasses import replace

    from fedretain.server.simulation import run_in_simulation

    settings = replace(run["settings"], out_dir=str(tmp_path / "sampled"), rounds=2, min_nodes=2,
                       fraction_train=0.6, run_id="sampled", local_epochs=1)
    rec = json.loads((run_in_simulation(settings, run["silos"][0].parent) / "run.json").read_text())
    everyone = {p.name for p in run["silos"]}
    for r in rec["rounds"]:
        trained = {n["merchant_id"] for n in r["nodes"] if n["phase"] == "train" and not n["error"]}
        evaluated = {n["merchant_id"] for n in r["nodes"] if n["phase"] == "evaluate" and not n["error"]}
        assert len(trained) == 2 and evaluated == everyone
        assert r["evaluate"]["num-examples"] == sum(n["metrics"]["num-examples"] for n in r["nodes"]
                                                    if n["phase"] == "evaluate")
