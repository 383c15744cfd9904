"""Tampering with the ledger file behind fedretain's back is detected and the first bad record named.

Each attack first drops the append-only triggers (as a real attacker with file access
would) and then edits the SQLite file with the raw ``sqlite3`` module.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from datetime import datetime, timedelta, timezone

import pytest

from fedretain.consent import signing
from fedretain.consent.gate import ConsentError, decide
from fedretain.consent.ledger import ConsentLedger, LedgerError, checkpoint_text
from fedretain.consent.records import ConsentRecord

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
N = 12


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "node.key"
    signing.save_private_key(signing.generate_key(), path)
    return path


@pytest.fixture
def ledger(tmp_path, key_file):
    """12 records written in three batches (heads at sizes 0, 5, 10, 12)."""
    led = ConsentLedger.open(tmp_path / "ledger.sqlite", key_path=key_file, create=True, controller="m1")
    recs = [ConsentRecord.grant(f"u{i}", "m1", "retention_modeling", ("purchase_history", "engagement"),
                                T0 + timedelta(days=i), record_id=f"rec-{i:02d}") for i in range(1, N + 1)]
    led.append_many(recs[:5])
    led.append_many(recs[5:10])
    led.append_many(recs[10:])
    assert led.verify().ok
    yield led
    led.close()


def raw(ledger):
    conn = sqlite3.connect(ledger.path, isolation_level=None)
    for t in ("records", "heads", "meta", "usage", "usage_subjects"):
        conn.execute(f"DROP TRIGGER IF EXISTS {t}_no_update")
        conn.execute(f"DROP TRIGGER IF EXISTS {t}_no_delete")
    return conn


def reopen(ledger, key_file):
    ledger.close()
    return ConsentLedger.open(ledger.path, key_path=key_file)


def row(conn, seq):
    return conn.execute("SELECT * FROM records WHERE seq = ?", (seq,)).fetchone()


def check_bad(led, seq, record_id, *words):
    res = led.verify()
    assert not res.ok
    assert res.first_bad_seq == seq, res.reason
    assert res.first_bad_record_id == record_id, res.reason
    for w in words:
        assert w in res.reason, res.reason
    assert f"seq {seq}" in res.describe()
    return res


# -- 1. editing a record's scope ---------------------------------------------------------
def test_edit_scope_column(ledger, key_file):
    conn = raw(ledger)
    conn.execute("UPDATE records SET scopes = 'device;engagement;purchase_history' WHERE seq = 7")
    check_bad(reopen(ledger, key_file), 7, "rec-07", "indexed column 'scopes'")


def test_edit_scope_in_canonical_json(ledger, key_file):
    conn = raw(ledger)
    conn.execute("UPDATE records SET canonical = replace(canonical, '\"engagement\"', '\"device\"'), "
                 "scopes = 'device;purchase_history' WHERE seq = 4")
    check_bad(reopen(ledger, key_file), 4, "rec-04", "edited")


def test_edit_with_recomputed_hash_chain_is_caught_by_the_signed_root(ledger, key_file):
    """An attacker who knows the chain rule re-hashes every row after the edit; only the
    node key could re-sign the heads, so the Merkle root of head size 10 no longer matches."""
    conn = raw(ledger)
    rows = conn.execute("SELECT seq, canonical FROM records ORDER BY seq").fetchall()
    prev = bytes(32)
    for seq, canon in rows:
        if seq == 8:
            canon = canon.replace('"engagement"', '"device"')
        eh = hashlib.sha256(prev + hashlib.sha256(b"\x00" + canon.encode()).digest()).digest()
        scopes = ";".join(json.loads(canon)["scopes"])
        conn.execute("UPDATE records SET canonical = ?, scopes = ?, prev_hash = ?, entry_hash = ? WHERE seq = ?",
                     (canon, scopes, prev, eh, seq))
        prev = eh
    res = check_bad(reopen(ledger, key_file), 6, "rec-06", "signed head", "6..10")
    assert res.first_bad_seq <= 8 <= 10


# -- 2. deleting a row -------------------------------------------------------------------
def test_delete_a_row(ledger, key_file):
    raw(ledger).execute("DELETE FROM records WHERE seq = 5")
    check_bad(reopen(ledger, key_file), 5, None, "missing", "rec-06")


def test_delete_a_row_and_renumber(ledger, key_file):
    conn = raw(ledger)
    conn.execute("DELETE FROM records WHERE seq = 5")
    for seq in range(6, N + 1):
        conn.execute("UPDATE records SET seq = ? WHERE seq = ?", (seq - 1, seq))
    check_bad(reopen(ledger, key_file), 5, "rec-06", "missing")


def test_delete_the_last_row(ledger, key_file):
    raw(ledger).execute(f"DELETE FROM records WHERE seq = {N}")
    res = reopen(ledger, key_file).verify()
    assert not res.ok and res.first_bad_seq == N and "deleted" in res.reason


def test_rollback_of_records_and_heads_is_caught_by_the_usage_log(ledger, key_file):
    head = ledger.head()
    ledger.record_usage("run-1", 0, "retention_modeling", "f", {"purchase_history": 1}, 1, head.size,
                        head.root_hex, T0, ["u1"])
    conn = raw(ledger)
    conn.execute("DELETE FROM records WHERE seq > 10")
    conn.execute("DELETE FROM heads WHERE size > 10")
    res = reopen(ledger, key_file).verify()
    assert not res.ok and res.first_bad_seq == 11 and "run-1" in res.reason


# -- 3. inserting a forged row -----------------------------------------------------------
def _forged(conn, seq, prev, rid="forged-1"):
    rec = ConsentRecord.grant("victim", "m1", "retention_modeling", ("purchase_history", "location"),
                              T0 + timedelta(days=3), record_id=rid)
    canon = rec.canonical_json()
    eh = hashlib.sha256(prev + hashlib.sha256(b"\x00" + canon.encode()).digest()).digest()
    conn.execute("INSERT INTO records (seq, record_id, subject_id, purpose, action, scopes, effective_at, expires_at,"
                 " canonical, prev_hash, entry_hash) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                 (seq, rid, "victim", "retention_modeling", "grant", "location;purchase_history",
                  int((T0 + timedelta(days=3)).timestamp() * 1e6), None, canon, prev, eh))


def test_insert_forged_row_at_the_end_with_a_valid_chain(ledger, key_file):
    conn = raw(ledger)
    _forged(conn, N + 1, bytes(row(conn, N)[10]))
    check_bad(reopen(ledger, key_file), N + 1, "forged-1", "not covered by any signed head")


def test_insert_forged_row_in_the_middle(ledger, key_file):
    conn = raw(ledger)
    for seq in range(N, 5, -1):  # make room at seq 6
        conn.execute("UPDATE records SET seq = ? WHERE seq = ?", (seq + 1, seq))
    conn.execute("DELETE FROM heads WHERE size > 10")  # keep all records under a head
    _forged(conn, 6, bytes(row(conn, 5)[10]))
    check_bad(reopen(ledger, key_file), 6, "forged-1", "inserted")


def test_forged_row_gains_nothing_from_the_gate(ledger, key_file):
    conn = raw(ledger)
    _forged(conn, N + 1, bytes(row(conn, N)[10]))
    led = reopen(ledger, key_file)
    with pytest.raises(ConsentError, match="forged-1"):
        decide(led, "retention_modeling", T0 + timedelta(days=30), ["victim", "u1"])


# -- 4. swapping two rows ----------------------------------------------------------------
def test_swap_two_whole_rows(ledger, key_file):
    conn = raw(ledger)
    conn.execute("UPDATE records SET seq = -3 WHERE seq = 3")
    conn.execute("UPDATE records SET seq = 3 WHERE seq = 9")
    conn.execute("UPDATE records SET seq = 9 WHERE seq = -3")
    check_bad(reopen(ledger, key_file), 3, "rec-09", "reordered")


def test_swap_adjacent_rows_content_only(ledger, key_file):
    conn = raw(ledger)
    a, b = row(conn, 2), row(conn, 3)
    cols = "record_id = ?, subject_id = ?, purpose = ?, action = ?, scopes = ?, effective_at = ?, expires_at = ?, " \
           "canonical = ?"
    conn.execute("UPDATE records SET record_id = 'tmp' WHERE seq = 3")
    conn.execute(f"UPDATE records SET {cols} WHERE seq = 2", (*b[1:9],))
    conn.execute(f"UPDATE records SET {cols} WHERE seq = 3", (*a[1:9],))
    check_bad(reopen(ledger, key_file), 2, "rec-03", "edited")


# -- the gate fails closed on a tampered ledger ------------------------------------------
def test_gate_refuses_tampered_ledger(ledger, key_file):
    at = T0 + timedelta(days=30)
    assert len(decide(ledger, "retention_modeling", at, ["u1", "u2"]).grants) == 2
    raw(ledger).execute("UPDATE records SET scopes = 'device' WHERE seq = 2")
    with pytest.raises(ConsentError, match="seq 2.*rec-02"):
        decide(reopen(ledger, key_file), "retention_modeling", at, ["u1", "u2"])


# -- keys, heads and schema ----------------------------------------------------------------
def test_resigned_ledger_fails_against_the_node_key(ledger, key_file, tmp_path):
    """Replace the key in the file and re-sign every head: only the real node key says no."""
    evil = signing.generate_key()
    conn = raw(ledger)
    conn.execute("UPDATE meta SET value = ? WHERE key = 'public_key_pem'", (signing.public_key_pem(evil),))
    conn.execute("UPDATE meta SET value = ? WHERE key = 'key_fingerprint'", (signing.fingerprint(evil),))
    for hid, size, root, ts in conn.execute("SELECT head_id, size, root_hex, timestamp FROM heads").fetchall():
        sig = signing.sign(evil, checkpoint_text("m1", size, root, ts)).hex()
        conn.execute("UPDATE heads SET signature_hex = ?, key_fingerprint = ? WHERE head_id = ?",
                     (sig, signing.fingerprint(evil), hid))
    ledger.close()
    with pytest.raises(LedgerError, match="does not match"):
        ConsentLedger.open(ledger.path, key_path=key_file)
    led = ConsentLedger.open(ledger.path)
    real_pub = signing.load_private_key(key_file).public_key()
    res = led.verify(real_pub)
    assert not res.ok and "created with key" in res.reason
    led.close()


def test_forged_head_signature(ledger, key_file):
    conn = raw(ledger)
    conn.execute("UPDATE heads SET signature_hex = ? WHERE size = 5", ("00" * 64,))
    res = reopen(ledger, key_file).verify()
    assert not res.ok and "signature does not verify" in res.reason


def test_dropped_triggers_alone_fail_verification_and_block_appends(ledger, key_file):
    raw(ledger)
    led = reopen(ledger, key_file)
    res = led.verify()
    assert not res.ok and res.first_bad_seq is None and "triggers" in res.reason
    with pytest.raises(LedgerError, match="triggers are missing"):
        led.append(ConsentRecord.grant("u1", "m1", "analytics", "social", T0))
