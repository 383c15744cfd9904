"""Attacks on the node's privacy-budget ledger by an operator who edits the file (issue 10 point 5).

Each test writes the attacker's steps with plain sqlite3 / file copies and asserts that the
ledger refuses to open or to reserve (fail closed), with a message naming what was found.
"""

from __future__ import annotations

import shutil
import sqlite3

import pytest

from fedretain.consent import signing
from fedretain.consent.merkle import verify_consistency
from fedretain.privacy.accountant import Accountant, DpEvent, PrivacyError
from fedretain.privacy.budget import BudgetLedger, RunPlan, ledger_path
from fedretain.privacy.budget_store import TRIGGERS

PURPOSE = "retention_modeling"


def _plan(run_id, eps=2.0):
    return RunPlan(run_id, PURPOSE, "local", "rdp", eps, 1e-5, 2.0, 0.1, 10, 100)


@pytest.fixture
def spent(tmp_path):
    """A node whose cap ε=4 is spent by run-1 (ε=2) and run-2 (ε=2), each with one round recorded."""
    path = ledger_path(tmp_path)
    with BudgetLedger.open(path, create=True) as ledger:
        ledger.set_node_cap(4.0, reason="node policy")
        for run_id in ("run-1", "run-2"):
            ledger.reserve(_plan(run_id))
            ledger.record_spend(run_id, PURPOSE, 1, 1, Accountant("rdp", [DpEvent(2.0, 0.1, 1)]))
        with pytest.raises(PrivacyError, match="only ε=0 of the lifetime budget"):
            ledger.reserve(_plan("run-3"))
    return path


def _attack(path, *sql):
    """What an operator with sqlite3 does: drop the triggers, run ``sql``, put the triggers back."""
    conn = sqlite3.connect(path)
    saved = [r[0] for r in conn.execute("SELECT sql FROM sqlite_master WHERE type='trigger'")]
    for name in TRIGGERS:
        conn.execute(f"DROP TRIGGER IF EXISTS {name}")
    for stmt in sql:
        conn.execute(stmt)
    for stmt in saved:
        conn.execute(stmt)
    conn.commit()
    conn.close()


def _refused_everywhere(path, match):
    with pytest.raises(PrivacyError, match=match):
        BudgetLedger.open(path)


def test_dropped_triggers_are_not_silently_recreated(spent):
    conn = sqlite3.connect(spent)
    conn.execute(f"DROP TRIGGER {TRIGGERS[2]}")
    conn.commit()
    conn.close()
    _refused_everywhere(spent, "append-only triggers missing")


def test_deleted_reservation_and_spend_rows_are_detected_and_the_next_reserve_refused(spent):
    _attack(spent, "DELETE FROM spends WHERE run_id = 'run-2'", "DELETE FROM runs WHERE run_id = 'run-2'")
    with sqlite3.connect(spent) as conn:  # the attack itself worked: the budget looks free again
        assert conn.execute("SELECT SUM(epsilon) FROM runs").fetchone()[0] == 2.0
    _refused_everywhere(spent, r"signed record\(s\) are missing from the tables")


def test_deleting_rows_with_their_log_entries_is_detected(spent):
    _attack(spent, "DELETE FROM spends WHERE run_id = 'run-1'", "DELETE FROM runs WHERE run_id = 'run-1'",
            "DELETE FROM log WHERE kind IN ('runs', 'spends') AND canonical LIKE '%run-1%'")
    _refused_everywhere(spent, "hash chain broken")


def test_truncating_log_tail_and_rows_is_a_shrunk_log_against_the_last_signed_head(spent):
    # run-2's reservation and spend were the last two log entries: remove them everywhere but the heads
    _attack(spent, "DELETE FROM spends WHERE run_id = 'run-2'", "DELETE FROM runs WHERE run_id = 'run-2'",
            "DELETE FROM log WHERE seq > (SELECT MAX(seq) - 2 FROM log)")
    _refused_everywhere(spent, "does not match its signed head")


def test_editing_a_reservation_is_detected(spent):
    _attack(spent, "UPDATE runs SET epsilon = 0.01 WHERE run_id = 'run-1'")
    _refused_everywhere(spent, "run_id='run-1'.* does not match its signed log entry")


def test_a_cap_raised_in_sql_without_a_signed_event_is_refused(spent):
    conn = sqlite3.connect(spent)  # triggers allow INSERT: the attacker appends a bigger cap
    conn.execute("INSERT INTO budgets (purpose, epsilon, set_at, note) VALUES ('*', 100.0, '2030-01-01', 'more')")
    conn.commit()
    conn.close()
    _refused_everywhere(spent, "does not match its signed log entry")


def test_a_cap_raised_through_the_api_without_a_reason_is_refused(spent):
    with BudgetLedger.open(spent) as ledger:
        with pytest.raises(PrivacyError, match="needs a reason"):
            ledger.set_node_cap(10.0)
        with pytest.raises(PrivacyError, match="only ε=0"):
            ledger.reserve(_plan("run-3"))


def test_a_ledger_signed_by_another_key_is_refused(spent, tmp_path):
    """The attacker rebuilds the whole file through the API under a key of their own."""
    forged_dir = tmp_path / "forged"
    with BudgetLedger.open(ledger_path(forged_dir), create=True) as ledger:
        ledger.set_node_cap(100.0, reason="mine")
    shutil.copy(ledger_path(forged_dir), spent)
    _refused_everywhere(spent, "belongs to node key .* not this node's key")


def test_rolled_back_copy_is_detected_against_a_later_head_the_caller_kept(tmp_path):
    path = ledger_path(tmp_path)
    backup = tmp_path / "privacy.db.bak"
    with BudgetLedger.open(path, create=True) as ledger:
        ledger.set_node_cap(4.0, reason="node policy")
        ledger.reserve(_plan("run-1"))
        old_head = ledger.head()
    shutil.copy(path, backup)  # the operator keeps a copy before the next run
    with BudgetLedger.open(path) as ledger:
        ledger.reserve(_plan("run-2"))
        kept = ledger.head()  # what the platform's witness stored
        proof = ledger.consistency_proof(old_head.size)
    key = signing.load_private_key(tmp_path / "node_key.pem").public_key()
    assert kept.verify(key) and old_head.verify(key)
    assert verify_consistency(old_head.size, kept.size, [bytes.fromhex(p) for p in proof],
                              bytes.fromhex(old_head.root_hex), bytes.fromhex(kept.root_hex))
    shutil.copy(backup, path)  # restore the older copy: run-2's ε is "free" again
    with BudgetLedger.open(path) as ledger:  # on its own the old copy is a valid, signed ledger...
        assert ledger.committed() == (2.0, 1e-5)
        with pytest.raises(PrivacyError, match="rolled back or truncated"):  # ...but not against the kept head
            ledger.check_against(kept)
        ledger.check_against(old_head)  # an older head it does extend is fine


def test_a_forked_history_is_detected_against_a_kept_head(tmp_path):
    path = ledger_path(tmp_path)
    with BudgetLedger.open(path, create=True) as ledger:
        ledger.set_node_cap(4.0, reason="node policy")
    shutil.copy(path, tmp_path / "fork.db")
    with BudgetLedger.open(path) as ledger:
        ledger.reserve(_plan("run-1"))
        kept = ledger.head()
    shutil.copy(tmp_path / "fork.db", path)  # go back, then write a different history of the same length
    with BudgetLedger.open(path) as ledger:
        ledger.reserve(_plan("run-other", eps=0.5))
        assert ledger.size == kept.size
        with pytest.raises(PrivacyError, match="forked or rewritten"):
            ledger.check_against(kept)


def test_a_budget_head_is_not_a_consent_head(spent):
    """Domain separation: a signed budget checkpoint does not verify as a consent checkpoint."""
    from fedretain.consent.ledger import LedgerHead

    with BudgetLedger.open(spent) as ledger:
        head = ledger.head()
    key = signing.load_private_key(spent.parent / "node_key.pem").public_key()
    assert head.verify(key)
    fields = {k: v for k, v in head.to_dict().items() if k != "format"}
    assert not LedgerHead(**fields).verify(key)


def test_rows_deleted_while_the_ledger_is_open_refuse_the_next_reserve(tmp_path):
    path = ledger_path(tmp_path)
    with BudgetLedger.open(path, create=True) as ledger:
        ledger.set_node_cap(4.0, reason="node policy")
        ledger.reserve(_plan("run-1"))
        ledger.reserve(_plan("run-2"))
        _attack(path, "DELETE FROM runs WHERE run_id = 'run-1'")  # another process, mid-session
        with pytest.raises(PrivacyError, match="signed record\\(s\\) are missing"):
            ledger.reserve(_plan("run-3"))
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM runs WHERE run_id = 'run-3'").fetchone()[0] == 0


def test_a_reset_version_marker_does_not_trigger_a_fresh_migration(spent):
    conn = sqlite3.connect(spent)
    conn.execute("PRAGMA user_version = 0")  # hoping the file is re-chained from its (edited) rows
    conn.commit()
    conn.close()
    _refused_everywhere(spent, "version marker \\(user_version\\) was reset")


def test_a_fresh_key_and_ledger_pair_is_refused_on_a_pinned_node(spent, tmp_path):
    """The operator replaces both node_key.pem and privacy.db with a new pair (a free budget): the pin refuses it."""
    from fedretain.consent.identity import KEY_FILE, write_pin

    key = signing.load_private_key(tmp_path / KEY_FILE)
    write_pin(tmp_path, "shop", key)
    with BudgetLedger.open(spent) as ledger:  # the node's own pair opens
        assert ledger.node_cap() is not None
    (tmp_path / KEY_FILE).unlink()
    spent.unlink()
    with pytest.raises(PrivacyError, match="pinned key"):  # a new key generated beside the pin is refused at once
        BudgetLedger.open(spent, create=True)
    other = signing.generate_key()  # or a key the operator brings: the forged ledger never opens on this node
    signing.save_private_key(other, tmp_path / "forged.pem")
    (tmp_path / KEY_FILE).unlink(missing_ok=True)
    shutil.copy(tmp_path / "forged.pem", tmp_path / KEY_FILE)
    spent.unlink(missing_ok=True)
    with pytest.raises(PrivacyError, match="pinned key"):
        BudgetLedger.open(spent, create=True)
