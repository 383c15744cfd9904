"""The ledger file's schema version (``PRAGMA user_version``): older files are upgraded, newer refused."""

from __future__ import annotations

import sqlite3

import pytest

from fedretain.consent.ledger import ConsentLedger, LedgerError
from fedretain.consent.records import ConsentRecord
from fedretain.consent.store import SCHEMA_VERSION


def _columns(path) -> set[str]:
    with sqlite3.connect(path) as c:
        return {r[1] for r in c.execute("PRAGMA table_info(records)")}


def _version(path) -> int:
    with sqlite3.connect(path) as c:
        return int(c.execute("PRAGMA user_version").fetchone()[0])


def test_a_file_from_before_the_layout_column_is_upgraded_by_a_writer(tmp_path):
    db, key = tmp_path / "c.db", tmp_path / "k.pem"
    with ConsentLedger.create(db, controller="shop", key_path=key) as led:
        led.append(ConsentRecord.grant("u1", "shop", "analytics", "social", "2024-01-01"))
    assert _version(db) == SCHEMA_VERSION
    c = sqlite3.connect(db, isolation_level=None)  # make it look like a version-0 file
    c.execute("ALTER TABLE records DROP COLUMN layout")
    c.execute("PRAGMA user_version = 0")
    c.close()
    with ConsentLedger.open(db) as reader:  # a reader leaves the file as it is
        assert reader.verify().ok
    assert "layout" not in _columns(db) and _version(db) == 0
    with ConsentLedger.open(db, key_path=key) as led:
        assert "layout" in _columns(db) and _version(db) == SCHEMA_VERSION
        led.append(ConsentRecord.withdraw("u1", "shop", "analytics", "2024-02-01"))
        assert led.size == 2 and led.verify().ok


def test_a_file_newer_than_this_code_is_refused(tmp_path):
    db, key = tmp_path / "c.db", tmp_path / "k.pem"
    ConsentLedger.create(db, controller="shop", key_path=key).close()
    c = sqlite3.connect(db, isolation_level=None)
    c.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    c.close()
    with pytest.raises(LedgerError, match="newer than this fedretain understands"):
        ConsentLedger.open(db, key_path=key)
