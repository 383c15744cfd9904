"""Per-merchant costs of a large simulation, made linear without dropping a check (issue 14).

* the witness judges and stores every reply's heads (SQLite, committed per reply) but rewrites the
  run record once per pull of replies, not once per reply;
* a node's two uses of one message (evaluate the received model, then train) are written in one
  transaction — both or neither;
* the ServerApp polls the SuperLink less often while many replies are pending.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from flwr.app import ConfigRecord, Message, Metadata, RecordDict

from fedretain.clients.node import NodeConfig
from fedretain.clients.witnessing import witness_values
from fedretain.consent.ledger import ConsentLedger
from fedretain.consent.records import ConsentRecord
from fedretain.consent.usage import record_usages
from fedretain.consent.witness_record import WITNESS_RECORD
from fedretain.server.polling import MAX_POLL_S, poll_interval
from fedretain.server.run_record import RunRecord
from fedretain.server.witness import WitnessStore
from fedretain.server.witness_grid import Witness

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
PURPOSE = "retention_modeling"


def make_node(tmp_path, merchant: str) -> NodeConfig:
    silo = tmp_path / merchant
    silo.mkdir()
    (silo / "merchant.json").write_text(json.dumps({"merchant_id": merchant, "data_end": "2024-06-30"}))
    cfg = NodeConfig.for_silo(silo)
    with ConsentLedger.create(cfg.consent_db, controller=merchant, key_path=cfg.node_key) as ledger:
        ledger.append_many([ConsentRecord.grant(f"u{i}", merchant, PURPOSE, ("purchase_history",),
                                                T0 + timedelta(days=i), record_id=f"g{i}") for i in range(4)])
    return cfg


def reply(values: dict, node_id: int) -> Message:
    md = Metadata(run_id=1, message_id=f"r{node_id}", src_node_id=node_id, dst_node_id=0,
                  reply_to_message_id=f"i{node_id}", group_id="", created_at=0.0, ttl=60.0, message_type="train")
    return Message(metadata=md, content=RecordDict({WITNESS_RECORD: ConfigRecord(values)}))


def record_heads(out) -> list[dict]:
    return json.loads((out / "run.json").read_text()).get("witness", {}).get("heads", [])


def test_one_pull_of_replies_rewrites_the_run_record_once_and_loses_no_head(tmp_path):
    nodes = [make_node(tmp_path, f"shop-{i}") for i in range(3)]
    out = tmp_path / "runs" / "r1"
    record = RunRecord.create(out, "r1", {})
    store = WitnessStore(tmp_path / "runs" / "witness.db")
    witness = Witness(store, "r1", out)
    results = [witness.check(reply(witness_values(cfg), 10 + i), 1, save=False) for i, cfg in enumerate(nodes)]
    assert not any(r.has_error() for r in results)
    # every head is already committed to the witness store (the durable copy) ...
    assert sorted(h["merchant"] for h in WitnessStore(store.path).heads()) == ["shop-0", "shop-1", "shop-2"]
    # ... while the run record's file was not rewritten per reply
    assert record_heads(out) == []
    witness.flush()
    assert sorted(h["merchant"] for h in record_heads(out)) == ["shop-0", "shop-1", "shop-2"]
    assert record.data["witness"]["heads"] == record_heads(out)
    # the next round: same heads, nothing added; a refusal is written at once (the alert)
    witness.check(reply(witness_values(nodes[0]), 10), 2, save=False)
    witness.flush()
    assert len(record_heads(out)) == 3
    (tmp_path / "forger").mkdir()
    forger = make_node(tmp_path / "forger", "shop-2")  # shop-2's ledger rebuilt under another key
    forged = witness.check(reply(witness_values(forger), 12), 2, save=False)
    assert forged.has_error() and "re-keyed" in forged.error.reason
    alerts = json.loads((out / "run.json").read_text()).get("alerts", [])
    assert [a["merchant"] for a in alerts] == ["shop-2"]
    store.close()


def usage_entry(ledger: ConsentLedger, phase: str, users: list[str], n_users: int | None = None) -> dict:
    head = ledger.head()
    return dict(run_id="run-1", round=1, purpose=PURPOSE, feature_set=f"{phase}:recency_days",
                scope_counts={"purchase_history": len(users)}, n_users=len(users) if n_users is None else n_users,
                ledger_size=head.size, ledger_root=head.root_hex, at=T0 + timedelta(days=10), subjects=users)


def test_two_uses_of_one_message_are_written_together_or_not_at_all(tmp_path):
    cfg = make_node(tmp_path, "shop-a")
    with ConsentLedger.open(cfg.consent_db, key_path=cfg.node_key) as ledger:
        bad = [usage_entry(ledger, "evaluate", ["u0"]), usage_entry(ledger, "train", ["u1", "u2"], n_users=3)]
        with pytest.raises(ValueError, match="n_users=3"):
            record_usages(ledger.connection, bad)
        assert ledger.usages() == []  # the valid first entry was not written either
        ids = record_usages(ledger.connection, [usage_entry(ledger, "evaluate", ["u0"]),
                                                usage_entry(ledger, "train", ["u1", "u2"])])
        got = ledger.usages()
        assert [u.usage_id for u in got] == ids and [u.feature_set.split(":")[0] for u in got] == ["evaluate", "train"]
        assert [u.usage_id for u in ledger.usages("u1")] == [ids[1]]
        assert got[0].recorded_at == got[1].recorded_at


def test_polling_slows_with_pending_replies_but_not_for_a_small_exchange():
    assert poll_interval(1) == poll_interval(20) == 0.1
    assert 0.1 < poll_interval(200) < poll_interval(400) < poll_interval(1000) == MAX_POLL_S
    assert poll_interval(10_000) == MAX_POLL_S
    assert poll_interval(1000, remaining=0.3) == 0.3 and poll_interval(1000, remaining=-1) == 0.0


def test_simulate_progress_shows_merchants_trained_per_round():
    from fedretain.cli.train import RichRoundObserver

    obs = RichRoundObserver(merchants=4)
    obs.on_start("r", 2, 1)
    try:
        nodes = [{"phase": "train", "error": None}] * 3 + [{"phase": "train", "error": "no consented examples"},
                                                           {"phase": "evaluate", "error": None}]
        obs.on_round_trained({"round": 1, "nodes": nodes})
        assert obs.progress.tasks[0].fields["status"] == "round 1: 3/4 merchants trained"
        obs.on_round_trained({"round": 2, "nodes": nodes[:2]})
        obs.on_round({"round": 1, "evaluate": {"auc": 0.71}})  # round 1 is evaluated in round 2's exchange
        assert obs.progress.tasks[0].fields["status"].startswith("round 1: 3/4 merchants trained AUC 0.71")
    finally:
        obs.on_end("completed", {})


def test_a_full_disk_on_the_joint_usage_write_fails_closed(tmp_path):
    from fedretain.clients.replies import append_usages
    from fedretain.consent.gate import ConsentError

    cfg = make_node(tmp_path, "shop-a")
    with ConsentLedger.open(cfg.consent_db, key_path=cfg.node_key) as ledger:
        subjects = [f"user-with-a-long-pseudonymous-id-{i:06d}" for i in range(3000)]
        entries = [usage_entry(ledger, "evaluate", subjects[:10]), usage_entry(ledger, "train", subjects)]
        pages = ledger.connection.execute("PRAGMA page_count").fetchone()[0]
        ledger.connection.execute(f"PRAGMA max_page_count={pages}")  # the file may not grow: a full disk
        with pytest.raises(ConsentError) as err:
            append_usages(ledger, entries)
        assert "record a data use" in str(err.value) and "fail closed" in str(err.value)
        assert ledger.usages() == []  # neither use half-recorded
