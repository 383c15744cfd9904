"""The consent ledger's SQLite file: schema, versioned migrations, connection settings, storage errors.

One place for the file's plumbing so :mod:`.ledger` reads as the ledger's rules. The
schema version lives in ``PRAGMA user_version`` (as the privacy ledger's store does):
opening a writable ledger upgrades an older file in one transaction, and a file newer
than this code is refused. Storage failures (full disk, held lock, I/O) become one
:class:`LedgerError` sentence that says nothing was written and what to do.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

__all__ = ["FORMAT", "SCHEMA", "SCHEMA_VERSION", "INDEXES", "PROTECTED_TABLES", "TRIGGERS", "ZERO_HASH", "NO_EXPIRY",
           "PAGE_SIZE", "LedgerError", "storage_error", "storage_errors", "migrate", "missing_triggers"]

FORMAT = "fedretain-consent-ledger/v1"
ZERO_HASH = bytes(32)
NO_EXPIRY = np.iinfo(np.int64).max

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE records (
    seq          INTEGER PRIMARY KEY,
    record_id    TEXT NOT NULL,       -- unique: see INDEXES
    subject_id   TEXT NOT NULL,
    purpose      TEXT NOT NULL,
    action       TEXT NOT NULL,
    scopes       TEXT NOT NULL,      -- ';'-joined sorted scopes; '' = all (withdraw/expire)
    effective_at INTEGER NOT NULL,   -- µs since epoch, UTC
    expires_at   INTEGER,            -- µs since epoch, UTC; NULL = no expiry
    canonical    TEXT NOT NULL,      -- canonical JSON of the record: the Merkle leaf
    prev_hash    BLOB NOT NULL,
    entry_hash   BLOB NOT NULL,      -- SHA-256(prev_hash || SHA-256(0x00 || canonical))
    layout       INTEGER             -- where some keys sit in canonical: a hint for verify (records.LAYOUT_KEYS)
);
CREATE TABLE heads (
    head_id         INTEGER PRIMARY KEY,
    size            INTEGER NOT NULL,
    root_hex        TEXT NOT NULL,
    timestamp       TEXT NOT NULL,
    signature_hex   TEXT NOT NULL,
    key_fingerprint TEXT NOT NULL,
    frontier        BLOB NOT NULL    -- perfect-subtree roots, to append without re-reading leaves
);
"""
# Secondary indexes: record ids are unique (a consent event is never imported twice) and looked
# up for proofs; a subject's history is looked up by subject. Point-in-time replay reads a
# large share of the log, for which a table scan is faster than an index walk plus a row
# look-up per record, so there is no (purpose, time) index. A bulk import drops and rebuilds
# the indexes inside its transaction: one sort instead of a million random B-tree inserts.
INDEXES: dict[str, str] = {
    "records_record_id": "CREATE UNIQUE INDEX records_record_id ON records(record_id)",
    "records_subject": "CREATE INDEX records_subject ON records(subject_id)",
}
_BUSY_MS = 30_000
# 16 KiB pages: a record (~0.6 KiB) and its index entries spread over a quarter of the pages that
# 4 KiB would need, which makes bulk inserts and full scans (verify, replay) cheaper.
PAGE_SIZE = 16_384
_RETIRED_INDEXES = ("records_purpose_time",)  # dropped from ledgers that still have them
PROTECTED_TABLES: tuple[str, ...] = ("meta", "records", "heads", "usage", "usage_subjects")
TRIGGERS: tuple[str, ...] = tuple(f"{t}_no_{op}" for t in PROTECTED_TABLES for op in ("update", "delete"))


def _trigger_sql(table: str) -> str:
    return "".join(
        f"CREATE TRIGGER IF NOT EXISTS {table}_no_{op.lower()} BEFORE {op} ON {table} "
        f"BEGIN SELECT RAISE(ABORT, 'consent ledger is append-only: {op} on {table} refused'); END;\n"
        for op in ("UPDATE", "DELETE")
    )



# Version 1: ``records.layout`` (a verify hint) added; files made before it have user_version 0
# and no such column. Each step runs inside the caller's write transaction.
SCHEMA_VERSION = 1


class LedgerError(Exception):
    """The ledger cannot be opened, written or trusted; the message says why."""


def _rollback(conn: sqlite3.Connection) -> None:
    """Roll back if a transaction is still open (SQLite already rolled back after a full disk or I/O error;
    a second ROLLBACK would replace the real error with "cannot rollback - no transaction is active")."""
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass


def storage_error(exc: BaseException, path: Path, action: str) -> LedgerError:
    """One clear sentence (what failed, that nothing was written, what to do) for an SQLite storage error."""
    msg = str(exc)
    low = msg.lower()
    if "full" in low:
        what = (f"the disk holding {path.parent} is full (SQLite: {msg}); nothing was written. Free disk space, "
                "then retry")
    elif "locked" in low or "busy" in low:
        what = (f"the ledger is locked by another writer for longer than {_BUSY_MS // 1000} s (SQLite: {msg}); "
                "nothing was written. Wait for the other `fedretain consent` command or node round to finish, "
                "then retry")
    elif "readonly" in low or "read-only" in low:
        what = (f"the ledger file or its folder is read-only for this user (SQLite: {msg}); nothing was written. "
                "Fix the permissions of the file, its -wal/-shm files and its folder, then retry")
    elif "not a database" in low or "malformed" in low:
        what = (f"the file is not a readable consent ledger (SQLite: {msg}). Restore it from a backup; "
                "`fedretain consent verify` shows what is wrong")
    else:
        what = (f"SQLite reported: {msg}. Check that the disk is mounted and healthy and that the file, its "
                "-wal/-shm files and its folder are readable and writable by this user, then retry")
    verb = "cannot open" if action == "open" else f"could not {action}"
    return LedgerError(f"{verb} consent ledger {path}: {what}")


@contextmanager
def storage_errors(path: Path, action: str) -> Iterator[None]:
    """Turn SQLite storage errors (full disk, held lock, I/O) into one clear :class:`LedgerError`."""
    try:
        yield
    except sqlite3.IntegrityError:
        raise
    except sqlite3.DatabaseError as exc:  # OperationalError included
        raise storage_error(exc, path, action) from None


def _set_journal_mode(conn: sqlite3.Connection, mode: str) -> bool:
    """Switch the journal mode without waiting for other connections; True if it is now ``mode``."""
    conn.execute("PRAGMA busy_timeout=0")
    try:
        now = conn.execute(f"PRAGMA journal_mode={mode}").fetchone()[0]
    except sqlite3.OperationalError:  # locked by another connection, or read-only
        return False
    finally:
        conn.execute(f"PRAGMA busy_timeout={_BUSY_MS}")
    return str(now).lower() == mode


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None, timeout=30.0)
    conn.execute("PRAGMA synchronous=FULL")  # a consent change, once acknowledged, survives power loss
    conn.execute(f"PRAGMA busy_timeout={_BUSY_MS}")
    conn.execute("PRAGMA cache_size=-262144")  # up to 256 MiB: big imports stay off the disk until commit
    conn.execute("PRAGMA temp_store=MEMORY")
    return conn


def _statements(script: str) -> list[str]:
    """Split a schema script into statements (triggers contain ';' inside BEGIN...END)."""
    out, buf = [], []
    for line in script.splitlines(keepends=True):
        buf.append(line)
        text = "".join(buf).strip()
        if text and sqlite3.complete_statement(text):
            out.append(text)
            buf = []
    return out




def missing_triggers(conn: sqlite3.Connection) -> list[str]:
    """The append-only triggers that are not (any longer) in the file."""
    have = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'")}
    return [t for t in TRIGGERS if t not in have]


def migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Bring an older ledger file to :data:`SCHEMA_VERSION` (one transaction); refuse a newer one.

    Only structure changes here: records, heads and signatures are never rewritten.
    """
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise LedgerError(f"{path}: consent ledger schema version {version} is newer than this fedretain "
                          f"understands ({SCHEMA_VERSION}); upgrade fedretain to use it")
    if version == SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        if version < 1 and "layout" not in {r[1] for r in conn.execute("PRAGMA table_info(records)")}:
            conn.execute("ALTER TABLE records ADD COLUMN layout INTEGER")  # older rows stay NULL: verify copes
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise
