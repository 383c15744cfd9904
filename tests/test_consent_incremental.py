"""Incremental consent verification (issue 14): full verify at the first decision of a run, then only
the appended suffix; an edit of the already-verified prefix is caught at the next run's full verify."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timedelta, timezone

import pytest

from fedretain.consent.gate import decide
from fedretain.consent.incremental import (
    STATE_FILE,
    IncrementalLedger,
    verify_incremental,
)
from fedretain.consent.ledger import PROTECTED_TABLES, ConsentLedger, _trigger_sql
from fedretain.consent.records import ConsentRecord

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
P = "retention_modeling"


def grant(i: int) -> ConsentRecord:
    return ConsentRecord.grant(f"u{i}", "m1", P, ("purchase_history", "engagement"), T0 + timedelta(days=i),
                               record_id=f"g{i}")


@pytest.fixture
def node(tmp_path):
    db, key, state = tmp_path / "consent.db", tmp_path / "node_key.pem", tmp_path / "state"
    with ConsentLedger.create(db, controller="m1", key_path=key) as ledger:
        ledger.append_many([grant(i) for i in range(10)])
    return db, key, state


def opened(node):
    db, key, _ = node
    return ConsentLedger.open(db, key_path=key)


def state_of(node) -> dict:
    return json.loads((node[2] / STATE_FILE).read_text())


def edit(db, sql: str, *params) -> None:
    """A file-editing operator: drop the append-only triggers, edit, put the triggers back."""
    conn = sqlite3.connect(db, isolation_level=None)
    for t in PROTECTED_TABLES:
        conn.execute(f"DROP TRIGGER IF EXISTS {t}_no_update")
        conn.execute(f"DROP TRIGGER IF EXISTS {t}_no_delete")
    conn.execute(sql, params)
    conn.executescript("".join(_trigger_sql(t) for t in PROTECTED_TABLES))
    conn.close()


def test_later_decisions_of_a_run_verify_only_the_appended_records(node, monkeypatch):
    with opened(node) as ledger:
        assert verify_incremental(ledger, node[2], "run-1").ok  # the run's first decision: full
        assert state_of(node)["size"] == 10 and state_of(node)["full_verify_at_size"] == 10
        ledger.append_many([grant(10), grant(11)])
        full_calls = []
        monkeypatch.setattr(ConsentLedger, "verify", lambda self, pk=None: full_calls.append(1))
        res = verify_incremental(ledger, node[2], "run-1")
        assert res.ok and res.n_records == 12 and res.root_hex == ledger.root_hex()
        assert full_calls == []  # no full pass
        assert state_of(node)["size"] == 12 and state_of(node)["full_verify_at_size"] == 10


def test_an_edit_of_the_verified_prefix_is_caught_at_the_next_runs_full_verify(node):
    db = node[0]
    with opened(node) as ledger:
        assert verify_incremental(ledger, node[2], "run-1").ok
    edit(db, "UPDATE records SET scopes = 'device;engagement;purchase_history' WHERE seq = 4")
    with opened(node) as ledger:
        # within the run the verified prefix is not re-read (the documented trade-off) ...
        assert verify_incremental(ledger, node[2], "run-1").ok
        # ... the next run starts with a full verify, which names the edited record
        res = verify_incremental(ledger, node[2], "run-2")
        assert not res.ok and res.first_bad_seq == 4 and "scopes" in res.reason
    assert not (node[2] / STATE_FILE).exists()  # nothing verified is kept after a failure


@pytest.mark.parametrize("attack, words", [
    ("column", "indexed column 'action'"),
    ("truncate", "shrank from 12 to 10"),
    ("unsigned-row", "not covered by a signed head"),
])
def test_tampering_with_the_suffix_is_caught_within_the_run(node, attack, words):
    db = node[0]
    with opened(node) as ledger:
        assert verify_incremental(ledger, node[2], "run-1").ok  # full, at 10
        ledger.append_many([grant(10), ConsentRecord.withdraw("u3", "m1", P, T0 + timedelta(days=40),
                                                              record_id="w3")])
        if attack == "truncate":
            assert verify_incremental(ledger, node[2], "run-1").ok  # incremental, at 12
        if attack == "unsigned-row":
            ledger.append(grant(12))  # a 13th record, properly signed ...
    if attack == "column":
        edit(db, "UPDATE records SET action = 'grant' WHERE seq = 12")  # the withdrawal turned into a grant
    elif attack == "truncate":
        edit(db, "DELETE FROM records WHERE seq > 10")
        edit(db, "DELETE FROM heads WHERE size > 10")
    else:
        edit(db, "DELETE FROM heads WHERE size = 13")  # ... whose head the operator removed
    with opened(node) as ledger:
        res = verify_incremental(ledger, node[2], "run-1")
    assert not res.ok and words in res.reason, res.reason


def test_the_gate_decides_the_same_through_the_incremental_ledger(node):
    users = [f"u{i}" for i in range(12)]
    with opened(node) as ledger:
        first = decide(IncrementalLedger(ledger, node[2], "run-1"), P, T0 + timedelta(days=60), users)
        ledger.append(ConsentRecord.withdraw("u2", "m1", P, T0 + timedelta(days=50), record_id="w2"))
        later = decide(IncrementalLedger(ledger, node[2], "run-1"), P, T0 + timedelta(days=60), users)
        full = decide(ledger, P, T0 + timedelta(days=60), users)
    assert "u2" in first.user_ids and "u2" not in later.user_ids  # the withdrawal counts at once
    assert list(later.user_ids) == list(full.user_ids) and later.ledger_head == full.ledger_head
    assert later.ledger_size == 11


def test_a_rekeyed_ledger_fails_the_incremental_check(node, tmp_path):
    db, _, state = node
    with opened(node) as ledger:
        assert verify_incremental(ledger, state, "run-1").ok
        records = ledger.records()
    db.unlink()
    other = tmp_path / "other.pem"
    with ConsentLedger.create(db, controller="m1", key_path=other) as forged:
        forged.append_many(records + [grant(30)])
    with ConsentLedger.open(db) as forged:
        res = verify_incremental(forged, state, "run-1")
    assert not res.ok and "key changed" in res.reason
