"""Storage faults (issue 13): a full disk, a held write lock, an unopenable file, a concurrent
writer and a fast clock each give one clear message; nothing is half-written and the
ledger still verifies afterwards. The node still fails closed."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner

import fedretain.consent.append as append_mod
import fedretain.consent.store as store_mod
from fedretain.consent.cli import consent
from fedretain.consent.gate import ConsentError
from fedretain.consent.importer import ConsentImportError
from fedretain.consent.ledger import ConsentLedger, LedgerError
from fedretain.consent.records import ConsentRecord

HEADER = "subject_id,controller,purpose,scopes,action,effective_at,expires_at\n"


@pytest.fixture
def ledger(tmp_path):
    led = ConsentLedger.create(tmp_path / "l.db", controller="shop", key_path=tmp_path / "k.pem")
    led.append_many([ConsentRecord.grant(f"u{i}", "shop", "analytics", "social", "2024-01-01") for i in range(50)])
    yield led
    led.close()


def _one_clear_line(exc: BaseException, *words: str) -> str:
    msg = str(exc)
    assert "\n" not in msg and "Traceback" not in msg and "cannot rollback" not in msg
    for w in words:
        assert w in msg, msg
    return msg


def _still_verifies(path: Path, size: int) -> None:
    with ConsentLedger.open(path, key_path=path.with_name("k.pem")) as again:
        assert again.size == size
        assert again.verify().ok


def _fill_disk(led: ConsentLedger) -> None:
    """A full disk, filesystem-independent: the file may not grow beyond its current pages."""
    pages = led.connection.execute("PRAGMA page_count").fetchone()[0]
    led.connection.execute(f"PRAGMA max_page_count={pages}")


def test_full_disk_on_append_is_one_clear_message(ledger):
    _fill_disk(ledger)
    with pytest.raises(LedgerError) as err:
        ledger.append_many([ConsentRecord.grant(f"v{i}", "shop", "analytics", "social", "2024-01-01")
                            for i in range(500)])
    _one_clear_line(err.value, str(ledger.path), "full", "nothing was written", "Free disk space")
    assert not ledger.connection.in_transaction
    _still_verifies(ledger.path, 50)


def test_full_disk_on_the_nodes_usage_write_fails_closed(ledger):
    _fill_disk(ledger)
    subjects = [f"user-with-a-long-pseudonymous-id-{i:06d}" for i in range(3000)]
    with pytest.raises(LedgerError) as err:
        ledger.record_usage("run1", 1, "analytics", "train:recency_days", {"social": 0}, len(subjects), 50,
                            ledger.head().root_hex, "2024-02-01", subjects)
    _one_clear_line(err.value, "record a data use", "full")
    assert isinstance(err.value, ConsentError)  # the node treats it as a consent failure: no reply
    assert ledger.usages() == []  # nothing half-recorded
    _still_verifies(ledger.path, 50)


def test_a_write_lock_held_past_the_timeout(ledger, tmp_path, monkeypatch):
    other = sqlite3.connect(ledger.path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        ledger.connection.execute("PRAGMA busy_timeout=100")
        with pytest.raises(LedgerError) as err:
            ledger.append(ConsentRecord.withdraw("u1", "shop", "analytics", "2024-03-01"))
        _one_clear_line(err.value, "locked by another writer", "nothing was written", "retry")
        # the officer's CLI: one line, exit 1, no traceback
        monkeypatch.setattr(store_mod, "_BUSY_MS", 100)
        res = CliRunner().invoke(consent, ["withdraw", "u1", "--purpose", "analytics", "--db", str(ledger.path),
                                           "--key", str(tmp_path / "k.pem")])
        assert res.exit_code == 1 and "locked by another writer" in res.output and "Traceback" not in res.output
        assert res.exception is None or isinstance(res.exception, SystemExit)
    finally:
        other.execute("ROLLBACK")
        other.close()
    _still_verifies(ledger.path, 50)
    assert ledger.append(ConsentRecord.withdraw("u1", "shop", "analytics", "2024-03-01")) == 51


def test_an_unopenable_ledger(tmp_path):
    bad = tmp_path / "consent.db"
    bad.write_bytes(b"this is not sqlite" * 1000)
    with pytest.raises(LedgerError) as err:
        ConsentLedger.open(bad)
    _one_clear_line(err.value, str(bad), "Restore it from a backup")
    res = CliRunner().invoke(consent, ["verify", "--db", str(bad), "--trust-embedded-key"])
    assert res.exit_code == 1 and "Traceback" not in res.output and str(bad) in res.output


def test_a_node_with_an_unopenable_ledger_fails_closed(tmp_path):
    from fedretain.clients.node import MerchantNode, NodeConfig
    from fedretain.consent import signing
    from fedretain.consent.gate import ConsentError
    from fedretain.consent.identity import write_pin

    cfg = NodeConfig.for_silo(tmp_path / "silo")
    cfg.state_dir.mkdir(parents=True)
    write_pin(cfg.state_dir, "shop", signing.generate_key())
    cfg.consent_db.write_bytes(b"garbage" * 4096)
    with pytest.raises(ConsentError, match="Restore it from a backup"):
        MerchantNode(cfg).ledger()


def test_import_counts_its_own_records_with_a_concurrent_writer(ledger, tmp_path, monkeypatch):
    rows = [f"w{i},shop,analytics,social,grant,2024-01-0{1 + i % 9}T00:00:00Z," for i in range(300)]
    src = tmp_path / "batch.csv"
    src.write_text(HEADER + "\n".join(rows) + "\n")
    real_columns = append_mod._BatchColumns

    class AnotherWriterAppendsFirst(real_columns):  # runs after validation, before the import's transaction
        fired = False

        def __init__(self, batch):
            super().__init__(batch)
            if AnotherWriterAppendsFirst.fired:
                return
            AnotherWriterAppendsFirst.fired = True
            with ConsentLedger.open(ledger.path, key_path=tmp_path / "k.pem") as writer:
                writer.append_many([ConsentRecord.grant(f"x{i}", "shop", "analytics", "social", "2024-01-01")
                                    for i in range(16)])

    monkeypatch.setattr(append_mod, "_BatchColumns", AnotherWriterAppendsFirst)
    assert ledger.import_file(src) == 300
    assert ledger.size == 50 + 16 + 300
    assert ledger.verify().ok


def test_future_effective_times_are_refused_beyond_the_clock_skew(ledger, tmp_path):
    now = datetime.now(timezone.utc)
    with pytest.raises(ConsentImportError, match="ahead of this node's clock"):
        ledger.append(ConsentRecord.withdraw("u1", "shop", "analytics", now + timedelta(days=1)))
    assert ledger.append(ConsentRecord.withdraw("u1", "shop", "analytics", now + timedelta(minutes=1))) == 51
    src = tmp_path / "future.csv"
    src.write_text(HEADER + "u2,shop,analytics,social,grant,2024-01-01T00:00:00Z,\n"
                   "u3,shop,analytics,social,withdraw,9999-12-31T00:00:00Z,\n")
    with pytest.raises(ConsentImportError) as err:
        ledger.import_file(src)
    assert "future.csv, row 2, field 'effective_at'" in str(err.value)
    assert "ahead of this node's clock" in str(err.value)
    assert ledger.size == 51
    res = CliRunner().invoke(consent, ["grant", "u1", "--purpose", "analytics", "--scopes", "social", "--at",
                                       "9999-12-31", "--db", str(ledger.path), "--key", str(tmp_path / "k.pem")])
    assert res.exit_code == 1 and "ahead of this node's clock" in res.output and "Traceback" not in res.output
