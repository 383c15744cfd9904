"""Attacks on a merchant's ledger that the node's own checks cannot see, and the platform's witness.

A node operator who edits files can truncate the consent ledger together with its signed
heads, restore an older copy, or build another history under the same key: the node's
``verify`` and gate still pass (shown below). The platform, which witnessed earlier heads,
refuses each at the next exchange, with an alert naming the merchant in the run record —
also after a restart (a new witness over the same store). The officer's
``fedretain consent verify --against`` finds the same from the platform's records.

Unit-level tests drive the node's real witness record (``clients/witnessing.py``) into the
platform's real judgement (``server/witness_grid.Witness`` over ``server/witness.WitnessStore``);
one simulation (heavy) runs the whole path through Flower.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner
from flwr.app import ConfigRecord, Message, Metadata, RecordDict

from fedretain.clients.node import NodeConfig
from fedretain.clients.witnessing import witness_values
from fedretain.consent import signing
from fedretain.consent.ledger import PROTECTED_TABLES, ConsentLedger, _trigger_sql
from fedretain.consent.records import ConsentRecord
from fedretain.consent.witness_check import check_file
from fedretain.consent.witness_record import (
    WITNESS_RECORD,
    HeadClaim,
    SignedHead,
    decode,
    encode,
)
from fedretain.server.run_record import RunRecord
from fedretain.server.witness import WitnessStore
from fedretain.server.witness_grid import WITNESS_REFUSED, Witness

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
MERCHANT = "shop-a"
PURPOSE = "retention_modeling"


# -- the node ------------------------------------------------------------------------------
def grant(i: int, subject: str | None = None) -> ConsentRecord:
    return ConsentRecord.grant(subject or f"u{i}", MERCHANT, PURPOSE, ("purchase_history",), T0 + timedelta(days=i),
                               record_id=f"g-{i}-{subject or ''}")


def withdraw(subject: str, day: int = 30) -> ConsentRecord:
    return ConsentRecord.withdraw(subject, MERCHANT, PURPOSE, T0 + timedelta(days=day), record_id=f"w-{subject}")


@pytest.fixture
def node(tmp_path) -> NodeConfig:
    """A merchant node with 8 consent records (one signed head over them)."""
    silo = tmp_path / "silo"
    silo.mkdir()
    (silo / "merchant.json").write_text(json.dumps({"merchant_id": MERCHANT, "data_end": "2024-06-30"}))
    cfg = NodeConfig.for_silo(silo)
    with ConsentLedger.create(cfg.consent_db, controller=MERCHANT, key_path=cfg.node_key) as ledger:
        ledger.append_many([grant(i) for i in range(8)])
    return cfg


def append(cfg: NodeConfig, *records: ConsentRecord) -> None:
    with ConsentLedger.open(cfg.consent_db, key_path=cfg.node_key) as ledger:
        ledger.append_many(list(records))


def size_of(cfg: NodeConfig) -> int:
    with ConsentLedger.open(cfg.consent_db) as ledger:
        return ledger.size


def node_verifies(cfg: NodeConfig) -> bool:
    """What the node itself checks before using data (the gate calls this verify)."""
    with ConsentLedger.open(cfg.consent_db, key_path=cfg.node_key) as ledger:
        return ledger.verify().ok


def snapshot(cfg: NodeConfig, dest: Path) -> Path:
    """The operator keeps a copy of the ledger file (SQLite's backup API: a consistent copy)."""
    src, dst = sqlite3.connect(cfg.consent_db), sqlite3.connect(dest)
    with dst:
        src.backup(dst)
    src.close()
    dst.close()
    return dest


def restore(cfg: NodeConfig, copy: Path) -> None:
    for suffix in ("-wal", "-shm"):
        Path(str(cfg.consent_db) + suffix).unlink(missing_ok=True)
    shutil.copyfile(copy, cfg.consent_db)


def truncate_with_heads(cfg: NodeConfig, keep: int) -> None:
    """Delete the records after ``keep`` and every head (and usage entry) covering them, as a
    file-editing operator would: drop the append-only triggers, delete, re-create the triggers."""
    conn = sqlite3.connect(cfg.consent_db, isolation_level=None)
    for table in PROTECTED_TABLES:
        conn.execute(f"DROP TRIGGER IF EXISTS {table}_no_update")
        conn.execute(f"DROP TRIGGER IF EXISTS {table}_no_delete")
    conn.execute("DELETE FROM records WHERE seq > ?", (keep,))
    conn.execute("DELETE FROM heads WHERE size > ?", (keep,))
    # usage entries pin the ledger size they used (audit.py checks them): those go too
    conn.execute("DELETE FROM usage_subjects WHERE usage_id IN (SELECT usage_id FROM usage WHERE ledger_size > ?)",
                 (keep,))
    conn.execute("DELETE FROM usage WHERE ledger_size > ?", (keep,))
    conn.executescript("".join(_trigger_sql(t) for t in PROTECTED_TABLES))
    conn.close()


# -- the platform --------------------------------------------------------------------------
def reply(values: dict, node_id: int, message_type: str = "train") -> Message:
    md = Metadata(run_id=1, message_id=f"r{node_id}", src_node_id=node_id, dst_node_id=0,
                  reply_to_message_id=f"i{node_id}", group_id="", created_at=0.0, ttl=60.0, message_type=message_type)
    return Message(metadata=md, content=RecordDict({WITNESS_RECORD: ConfigRecord(values)}))


class Platform:
    """One server process: a run record, and the witness over the persistent store in ``root``."""

    def __init__(self, root: Path, run: str) -> None:
        self.out = root / run
        self.record = RunRecord.create(self.out, run, {})
        self.witness = Witness(WitnessStore(root / "witness.db"), run, self.out)

    def exchange(self, cfg: NodeConfig, node_id: int = 11, rnd: int = 1) -> Message:
        """What the witnessed grid does for one instruction and its reply (identify, stamp, judge)."""
        if node_id not in self.witness.merchant_of:
            self.witness.learn(reply(witness_values(cfg), node_id, "query.witness"))
        seen = self.witness.seen_record(node_id)
        return self.witness.check(reply(witness_values(cfg, dict(seen or {})), node_id), rnd)

    def restart(self, run: str) -> Platform:
        self.witness.store.close()
        return Platform(self.out.parent, run)

    def alerts(self) -> list[dict]:
        return json.loads((self.out / "run.json").read_text()).get("alerts", [])


def accepted(msg: Message) -> bool:
    return not msg.has_error()


def refused(msg: Message, *words: str) -> str:
    assert msg.has_error(), "the witness accepted the reply"
    assert msg.error.code == WITNESS_REFUSED
    for w in words:
        assert w in msg.error.reason, msg.error.reason
    return msg.error.reason


@pytest.fixture
def witnessed(node, tmp_path):
    """Run 1 witnessed the ledger at 8 records, then at 9 after a withdrawal (appended honestly)."""
    before = snapshot(node, tmp_path / "consent-before-withdrawal.db")
    platform = Platform(tmp_path / "platform", "run-1")
    assert accepted(platform.exchange(node, rnd=1))
    append(node, withdraw("u3"))
    assert accepted(platform.exchange(node, rnd=2))  # grew by one: consistency proof 8 -> 9 verifies
    return platform, before


def test_honest_growth_is_accepted_across_a_restart_and_recorded(node, witnessed):
    platform, _ = witnessed
    append(node, grant(20), grant(21))
    platform = platform.restart("run-2")
    assert accepted(platform.exchange(node, node_id=99))  # a new node id after the restart: identified again
    heads = platform.witness.store.heads(MERCHANT, "consent")
    assert [h["size"] for h in heads] == [8, 9, 11]
    record = json.loads((platform.out / "run.json").read_text())
    assert [(h["merchant"], h["size"]) for h in record["witness"]["heads"]] == [(MERCHANT, 11)]
    assert record.get("alerts", []) == []


def test_an_unchanged_ledger_is_recorded_in_every_run(node, witnessed):
    platform = witnessed[0].restart("run-2")
    assert accepted(platform.exchange(node))
    record = json.loads((platform.out / "run.json").read_text())
    assert [(h["merchant"], h["size"], h["round"]) for h in record["witness"]["heads"]] == [(MERCHANT, 9, 1)]
    assert len(platform.witness.store.heads(MERCHANT)) == 2  # the store keeps each distinct head once
    platform.record = RunRecord.load(platform.out)  # the run resumed by a new server process
    platform.witness = Witness(WitnessStore(platform.out.parent / "witness.db"), "run-2", platform.out)
    assert accepted(platform.exchange(node, node_id=12, rnd=2))
    assert len(json.loads((platform.out / "run.json").read_text())["witness"]["heads"]) == 1


def test_a_node_claiming_another_merchant_learns_nothing_and_is_refused(node, witnessed, tmp_path):
    platform, _ = witnessed
    silo = tmp_path / "impostor"
    silo.mkdir()
    (silo / "merchant.json").write_text(json.dumps({"merchant_id": MERCHANT, "data_end": "2024-06-30"}))
    fake = NodeConfig.for_silo(silo)
    with ConsentLedger.create(fake.consent_db, controller=MERCHANT, key_path=fake.node_key) as ledger:
        ledger.append_many([grant(i) for i in range(12)])
    platform.witness.learn(reply(witness_values(fake), 66, "query.witness"))
    assert dict(platform.witness.seen_record(66)) == {}  # the real merchant's ledger size is not revealed
    assert dict(platform.witness.seen_record(11)) == {"consent": 9}
    refused(platform.exchange(fake, node_id=66), "re-keyed consent ledger")


def test_truncation_with_heads_passes_the_node_but_is_refused_after_a_restart(node, witnessed):
    platform, _ = witnessed
    truncate_with_heads(node, keep=8)  # the withdrawal of u3 and its head are gone
    assert size_of(node) == 8 and node_verifies(node)  # the node's own checks see nothing
    platform = platform.restart("run-2")
    reason = refused(platform.exchange(node), "shrank from 9 to 8", "truncation or rollback")
    [alert] = platform.alerts()
    assert alert["merchant"] == MERCHANT and alert["reason"] == reason.split(": ", 1)[1]
    assert platform.witness.store.alerts(MERCHANT)[0]["reason"].startswith("the consent ledger shrank")
    assert refused(platform.exchange(node, rnd=2))  # and at every later exchange, while it stays truncated


def test_rollback_to_an_older_copy_is_refused_at_the_next_round(node, witnessed):
    platform, before = witnessed
    restore(node, before)
    assert size_of(node) == 8 and node_verifies(node)
    refused(platform.exchange(node, rnd=3), "shrank from 9 to 8")  # same server process, next round
    refused(platform.restart("run-2").exchange(node), "shrank from 9 to 8")  # and after a restart


def test_fork_of_the_same_size_under_the_same_key_is_refused(node, witnessed):
    platform, before = witnessed
    restore(node, before)
    append(node, grant(9, subject="u3"))  # 9 records again, but a re-grant where the withdrawal was
    assert size_of(node) == 9 and node_verifies(node)
    platform = platform.restart("run-2")
    refused(platform.exchange(node), "forked consent ledger", "same size 9")
    assert platform.alerts()[0]["merchant"] == MERCHANT


def test_larger_fork_fails_its_consistency_proof(node, witnessed):
    platform, before = witnessed
    restore(node, before)
    append(node, grant(9, subject="u3"), grant(10), grant(11))  # 11 records, not an extension of the 9 witnessed
    platform = platform.restart("run-2")
    refused(platform.exchange(node), "forked consent ledger", "consistency proof does not verify")


def test_rekeyed_ledger_with_the_same_records_is_refused(node, witnessed, tmp_path):
    platform, _ = witnessed
    with ConsentLedger.open(node.consent_db) as ledger:
        records = ledger.records()
    node.consent_db.unlink()
    other = tmp_path / "other.key"
    with ConsentLedger.create(node.consent_db, controller=MERCHANT, key_path=other) as forged:
        forged.append_many(records)  # byte-identical history, even the same root: only the key differs
    refused(platform.restart("run-2").exchange(node), "re-keyed consent ledger")


def test_growth_without_a_proof_or_with_a_bad_one_is_refused(node, witnessed):
    platform, _ = witnessed
    append(node, grant(30))
    values = witness_values(node, {"consent": 9})
    assert values["consent-proof-from"] == 9 and values["consent-proof"]
    stripped = {**values, "consent-proof-from": -1, "consent-proof": []}
    refused(platform.witness.check(reply(stripped, 11)), "no consistency proof", "from the witnessed size 9")
    bad = {**values, "consent-proof": ["00" * 32] + values["consent-proof"][1:]}
    refused(platform.witness.check(reply(bad, 11)), "consistency proof does not verify")
    assert accepted(platform.witness.check(reply(values, 11)))


def test_forged_signature_and_missing_record_are_refused(node, witnessed):
    platform, _ = witnessed
    values = witness_values(node, {"consent": 9})
    forged = {**values, "consent-signature": signing.sign(signing.generate_key(), b"x").hex()}
    refused(platform.witness.check(reply(forged, 11)), "signature does not verify")
    md = reply(values, 11).metadata
    bare = Message(metadata=md, content=RecordDict({}))
    refused(platform.witness.check(bare), "no witness record")


def test_a_witnessed_ledger_kind_that_disappears_is_refused(node, tmp_path):
    """Generic kinds: a second ledger (here another consent-format file standing in for the budget
    ledger, same interface) is witnessed by the same code; dropping it later is refused."""
    budget_cfg = NodeConfig.for_silo(tmp_path / "b", consent_db=tmp_path / "b.db", node_key=node.node_key)
    with ConsentLedger.create(budget_cfg.consent_db, controller=MERCHANT, key_path=node.node_key) as b:
        b.append_many([grant(i, subject="budget-row") for i in range(3)])
    with ConsentLedger.open(node.consent_db) as c, ConsentLedger.open(budget_cfg.consent_db) as b:
        claims = {"consent": HeadClaim(SignedHead.of("consent", c.head()), c.public_key_pem, -1, ()),
                  "budget": HeadClaim(SignedHead.of("budget", b.head()), b.public_key_pem, -1, ())}
    platform = Platform(tmp_path / "platform", "run-1")
    platform.witness.merchant_of[11] = MERCHANT
    assert accepted(platform.witness.check(reply(encode(MERCHANT, claims), 11)))
    assert platform.witness.store.seen(MERCHANT) == {"consent": 8, "budget": 3}
    only_consent = encode(MERCHANT, {"consent": claims["consent"]})
    refused(platform.restart("run-2").witness.check(reply(only_consent, 11)), "carries no budget head")


def test_the_witness_record_is_public_only(node, witnessed):
    values = witness_values(node, {"consent": 8})
    text = json.dumps(values)
    assert not any(f'"u{i}"' in text or f"u{i}" in values.values() for i in range(8))
    report = decode(values)
    assert report.merchant_id == MERCHANT and set(report.claims) == {"consent"}
    assert set(values) <= {"merchant-id", "kinds"} | {f"consent-{k}" for k in (
        "format", "controller", "size", "root", "signature", "timestamp", "key-fingerprint", "public-key",
        "proof-from", "proof")}


# -- the officer ---------------------------------------------------------------------------
def _verify_cli(cfg: NodeConfig, against: Path) -> tuple[int, str]:
    from fedretain.consent.cli import consent

    res = CliRunner().invoke(consent, ["--db", str(cfg.consent_db), "--key", str(cfg.node_key), "verify",
                                       "--against", str(against)])
    return res.exit_code, res.output


def test_officer_checks_a_ledger_against_the_platform_records(node, witnessed, tmp_path):
    platform, before = witnessed
    run_json, store = platform.out / "run.json", platform.witness.store.path
    with ConsentLedger.open(node.consent_db) as ledger:
        assert check_file(ledger, run_json).ok and check_file(ledger, store).checked == 2
    code, out = _verify_cli(node, store)
    assert code == 0 and "witness OK" in out
    restore(node, before)  # rolled back: passes its own verify, not the platform's record
    code, out = _verify_cli(node, run_json)
    assert code == 1 and "ledger OK" in out and "witness FAILED" in out and "records were removed" in out
    append(node, grant(9, subject="u3"))  # forked instead
    code, out = _verify_cli(node, store)
    assert code == 1 and "forked or rewritten history" in out


def test_officer_check_with_no_witnessed_heads_fails_closed(node, tmp_path):
    empty = tmp_path / "run.json"
    empty.write_text(json.dumps({"format": "fedretain-run/1", "witness": {"heads": []}}))
    code, out = _verify_cli(node, empty)
    assert code == 1 and "holds no witnessed consent head" in out


# -- the whole path, through Flower ----------------------------------------------------------
class WithdrawAfterRound1:
    """Observer: right after round 1 the merchants record a withdrawal each (an honest change)."""

    def __init__(self, silos: list[Path]) -> None:
        self.silos = silos

    def on_start(self, *args) -> None: ...

    def on_end(self, *args) -> None: ...

    def on_round_trained(self, entry) -> None:
        if entry["round"] != 1:
            return
        for silo in self.silos:
            cfg = NodeConfig.for_silo(silo)
            with ConsentLedger.open(cfg.consent_db, key_path=cfg.node_key) as ledger:
                subject = ledger.records()[0].subject_id
                ledger.append(ConsentRecord.withdraw(subject, ledger.controller, PURPOSE, datetime.now(timezone.utc),
                                                     recorded_by="test"))


@pytest.mark.heavy
def test_simulation_refuses_truncated_and_rolled_back_ledgers_after_a_server_restart(tmp_path, synth_silos):
    """Run A (1 round and its final evaluation) witnesses every ledger, and a withdrawal at two merchants
    recorded after the round (the final evaluation's replies carry the grown heads with proofs). Then one
    operator restores the pre-run copy of its ledger, another truncates the withdrawal with its head.
    Run B — a new ServerApp over the same witness store — refuses both at its first exchange and in its
    round, names them in its run record's alerts, and trains on the honest merchant alone."""
    from fedretain.server import progress
    from fedretain.server.settings import RunSettings
    from fedretain.server.simulation import run_in_simulation

    data = tmp_path / "silos"
    shutil.copytree(synth_silos[0].parent, data)
    silos = sorted(p for p in data.iterdir() if p.is_dir())
    cfgs = [NodeConfig.for_silo(s) for s in silos]
    names = [json.loads((s / "merchant.json").read_text())["merchant_id"] for s in silos]
    sizes = [size_of(c) for c in cfgs]
    copy = snapshot(cfgs[0], tmp_path / "before-run.db")
    common = {"local_epochs": 1, "learning_rate": 0.02, "hidden": (8,), "node_wait_timeout": 60.0,
              "round_timeout": 120.0}
    observer = WithdrawAfterRound1(silos[:2])
    progress.add_observer(observer)
    try:
        run_a = run_in_simulation(RunSettings(rounds=1, min_nodes=3, out_dir=str(tmp_path / "runA"), run_id="runA",
                                              **common), data)
    finally:
        progress.remove_observer(observer)
    rec_a = json.loads((run_a / "run.json").read_text())
    assert rec_a["status"] == "completed" and rec_a.get("alerts", []) == []
    witnessed = {(h["merchant"], h["size"]) for h in rec_a["witness"]["heads"]}
    assert {(n, s) for n, s in zip(names, sizes)} | {(names[0], sizes[0] + 1), (names[1], sizes[1] + 1)} == witnessed
    with ConsentLedger.open(cfgs[1].consent_db) as ledger:  # the officer's check passes on honest ledgers
        assert check_file(ledger, run_a / "run.json").ok

    restore(cfgs[0], copy)  # (b) rollback to the copy taken before the run
    truncate_with_heads(cfgs[1], keep=sizes[1])  # (a) the withdrawal and its head deleted
    assert node_verifies(cfgs[0]) and node_verifies(cfgs[1])

    run_b = run_in_simulation(RunSettings(rounds=1, min_nodes=1, out_dir=str(tmp_path / "runB"), run_id="runB",
                                          **common), data)
    rec_b = json.loads((run_b / "run.json").read_text())
    assert rec_b["status"] == "completed"
    alerted = {(a["merchant"], a["round"]) for a in rec_b["alerts"]}
    assert alerted == {(names[0], 1), (names[1], 1)}  # refused at round 1 (no exchange before it since issue 10)
    assert all("shrank" in a["reason"] for a in rec_b["alerts"])
    [round1] = rec_b["rounds"]
    trained = {n["merchant_id"] for n in round1["nodes"] if n["phase"] == "train" and not n["error"]}
    assert trained == {names[2]}
    errors = " ".join(n["error"] or "" for n in round1["nodes"])
    assert f"witness refused merchant {names[0]}" in errors and f"witness refused merchant {names[1]}" in errors
    assert set(rec_b["merchants"]) == {names[2]}


def test_the_nodes_fast_consistency_proof_equals_the_full_one(tmp_path):
    """The node proves from the frontier stored with a signed head plus the appended leaves only;
    the proof must be byte-identical to RFC 9162's over all leaves, for every pair of head sizes."""
    from fedretain.clients.witnessing import _consent_proof

    db, key = tmp_path / "c.db", tmp_path / "k.pem"
    with ConsentLedger.create(db, controller=MERCHANT, key_path=key) as ledger:
        for batch in (1, 2, 1, 4, 3, 8, 1, 5, 7, 16, 2):  # heads at 1, 3, 4, 8, 11, 19, 20, 25, 32, 48, 50
            ledger.append_many([grant(ledger.size + j) for j in range(batch)])
        sizes = sorted({h.size for h in ledger.heads()})
        pairs = [(a, b) for a in sizes for b in sizes if 0 < a < b]
        assert len(pairs) > 50
        for a, b in pairs:
            assert _consent_proof(ledger, a, b) == tuple(ledger.consistency_proof(a, b)), (a, b)
        assert _consent_proof(ledger, 2, 50) is None  # no head at size 2: the full computation is used
