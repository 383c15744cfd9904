"""The privacy ledger's tamper-evident store: schema, migrations, hash chain, signed Merkle heads.

Why this shape (the same as the consent ledger, :mod:`fedretain.consent.ledger`):

* every row of ``budgets``/``runs``/``spends`` has an entry in ``log`` holding the row's
  canonical bytes (:func:`fedretain.consent.records.canonical_bytes`), chained by
  ``entry_hash = SHA-256(prev_hash || leaf_hash)``;
* after every write the node signs an RFC 9162 Merkle root of the log with its Ed25519
  key (``SILO/.node/node_key.pem``, the key of the consent ledger): a :class:`BudgetHead`;
* on open and before every reservation :func:`verify` recomputes all of it against the
  node's key and refuses (fail closed) missing triggers, a row without its log entry (or
  the reverse), a broken chain, a log shorter than the last signed head, or a head signed
  by another key. Rolling the whole file back to an older copy is only visible against a
  later head kept elsewhere (:meth:`Store.check_against`; the platform's witness keeps them).

File versions live in ``PRAGMA user_version``; :func:`migrate` upgrades older files once.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedretain.consent import signing
from fedretain.consent.ledger import LedgerHead
from fedretain.consent.merkle import (
    EMPTY_ROOT,
    Frontier,
    consistency_proof,
    leaf_hash,
    verify_consistency,
)
from fedretain.consent.records import canonical_bytes
from fedretain.privacy.accountant import PrivacyError

FORMAT = "fedretain-privacy-ledger/2"
OLD_FORMAT = "fedretain-privacy-ledger/1"
VERSION = 2  # PRAGMA user_version of the current layout (0 = a /1 file, written before versions)
ZERO_HASH = bytes(32)
NODE = "*"  # the budgets row purpose that means "the node-wide cap"

TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "budgets": ("seq", "purpose", "epsilon", "delta", "set_at", "note", "previous_epsilon", "previous_delta",
                "key_fingerprint", "signature_hex"),
    "runs": ("run_id", "purpose", "mode", "accountant", "epsilon", "delta", "noise_multiplier", "sample_rate",
             "planned_steps", "n_records", "reserved_at"),
    "spends": ("seq", "run_id", "purpose", "round", "steps", "total_steps", "epsilon", "accountant_state", "at"),
}
_V1_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS budgets (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, purpose TEXT NOT NULL,
    epsilon REAL NOT NULL CHECK (epsilon >= 0), delta REAL CHECK (delta IS NULL OR (delta > 0 AND delta < 1)),
    set_at TEXT NOT NULL, note TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT NOT NULL, purpose TEXT NOT NULL, mode TEXT NOT NULL, accountant TEXT NOT NULL,
    epsilon REAL NOT NULL CHECK (epsilon > 0), delta REAL NOT NULL CHECK (delta > 0 AND delta < 1),
    noise_multiplier REAL NOT NULL, sample_rate REAL NOT NULL, planned_steps INTEGER NOT NULL,
    n_records INTEGER NOT NULL, reserved_at TEXT NOT NULL, PRIMARY KEY (run_id, purpose));
CREATE TABLE IF NOT EXISTS spends (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, purpose TEXT NOT NULL,
    round INTEGER NOT NULL, steps INTEGER NOT NULL, total_steps INTEGER NOT NULL,
    epsilon REAL NOT NULL, accountant_state TEXT NOT NULL, at TEXT NOT NULL,
    FOREIGN KEY (run_id, purpose) REFERENCES runs (run_id, purpose));
"""
_V2_CHANGES = """
ALTER TABLE budgets ADD COLUMN previous_epsilon REAL;
ALTER TABLE budgets ADD COLUMN previous_delta REAL;
ALTER TABLE budgets ADD COLUMN key_fingerprint TEXT NOT NULL DEFAULT '';
ALTER TABLE budgets ADD COLUMN signature_hex TEXT NOT NULL DEFAULT '';
ALTER TABLE budgets ADD COLUMN log_seq INTEGER;
ALTER TABLE runs ADD COLUMN log_seq INTEGER;
ALTER TABLE spends ADD COLUMN log_seq INTEGER;
CREATE TABLE log (seq INTEGER PRIMARY KEY, kind TEXT NOT NULL, canonical TEXT NOT NULL,
                  prev_hash BLOB NOT NULL, entry_hash BLOB NOT NULL);
CREATE TABLE heads (head_id INTEGER PRIMARY KEY, size INTEGER NOT NULL, root_hex TEXT NOT NULL,
                    timestamp TEXT NOT NULL, signature_hex TEXT NOT NULL, key_fingerprint TEXT NOT NULL);
"""
PROTECTED = ("meta", "budgets", "runs", "spends", "log", "heads")
TRIGGERS = tuple(f"{t}_no_{op}" for t in PROTECTED for op in ("update", "delete"))


def _triggers_sql() -> str:
    return "".join(
        f"CREATE TRIGGER IF NOT EXISTS {t}_no_{op.lower()} BEFORE {op} ON {t} "
        f"BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only: {op} on {t} refused'); END;\n"
        for t in PROTECTED for op in ("UPDATE", "DELETE")
    )


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def checkpoint_text(controller: str, size: int, root_hex: str, timestamp: str) -> bytes:
    """What a budget head signs: like the consent checkpoint, but its own format line, so a
    signed budget head can never pass for a consent head of the same node (domain separation)."""
    return f"{FORMAT}\n{controller}\n{size}\n{root_hex}\n{timestamp}".encode()


@dataclass(frozen=True)
class BudgetHead(LedgerHead):
    """A signed checkpoint of the privacy ledger; the consent ledger's witnessing interface."""

    def checkpoint(self) -> bytes:
        return checkpoint_text(self.controller, self.size, self.root_hex, self.timestamp)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "format": FORMAT}


_REAL = {"epsilon", "delta", "previous_epsilon", "previous_delta", "noise_multiplier", "sample_rate"}
_INT = {"seq", "planned_steps", "n_records", "round", "steps", "total_steps"}


def _typed(col: str, value: Any) -> Any:
    """The value as SQLite gives it back (REAL/INTEGER), so hashing before and after storing agree."""
    if value is None:
        return None
    return float(value) if col in _REAL else int(value) if col in _INT else str(value)


def row_bytes(kind: str, row: dict[str, Any]) -> bytes:
    """Canonical bytes of one ledger row (the Merkle leaf); ``kind`` is its table."""
    return canonical_bytes({"kind": kind, **{c: _typed(c, row[c]) for c in TABLE_COLUMNS[kind]}})


def cap_event_bytes(row: dict[str, Any]) -> bytes:
    """What a budget (cap) event's own signature covers: every field but the signature."""
    return canonical_bytes({"kind": "cap-event", **{c: _typed(c, row[c]) for c in TABLE_COLUMNS["budgets"]
                                                      if c not in ("seq", "signature_hex")}})


class Store:
    """The verified tip of one open ledger file: its frontier, last entry hash and signing key."""

    def __init__(self, path: Path, conn: sqlite3.Connection, key: Ed25519PrivateKey) -> None:
        self.path = path
        self.conn = conn
        self.key = key
        self.fingerprint = signing.fingerprint(key)
        self.controller = ""
        self.frontier = Frontier()
        self.last_hash = ZERO_HASH

    # -- opening and migrating ---------------------------------------------------------
    def init_or_migrate(self, controller: str | None) -> None:
        """Create a new file's schema or upgrade an older one, in one transaction each."""
        c = self.conn
        version = c.execute("PRAGMA user_version").fetchone()[0]
        if version > VERSION:
            raise PrivacyError(f"{self.path}: privacy ledger version {version} is newer than this fedretain "
                               f"understands ({VERSION}); refusing to use it")
        if version == VERSION:
            return
        tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        c.execute("BEGIN IMMEDIATE")
        try:
            fresh = "meta" not in tables
            if not fresh:
                fmt = c.execute("SELECT value FROM meta WHERE key='format'").fetchone()
                if fmt is not None and fmt[0] == FORMAT:
                    raise PrivacyError(f"{self.path}: a {FORMAT} ledger whose version marker (user_version) was "
                                       f"reset to {version}: edited outside fedretain; refusing to use it")
                if fmt is None or fmt[0] != OLD_FORMAT:
                    raise PrivacyError(f"{self.path}: not a privacy ledger (format {fmt[0] if fmt else None!r})")
            for t in PROTECTED:  # ours, from version 1: they would refuse the migration's own updates
                for op in ("update", "delete"):
                    c.execute(f"DROP TRIGGER IF EXISTS {t}_no_{op}")
            for stmt in (_V1_SCHEMA + _V2_CHANGES).split(";"):
                if stmt.strip():
                    c.execute(stmt)
            self.controller = (controller or f"node {self.fingerprint}").strip()
            meta = {"format": FORMAT, "controller": self.controller, "key_fingerprint": self.fingerprint,
                    "public_key_pem": signing.public_key_pem(self.key), "created_at": now()}
            if fresh:
                c.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", meta.items())
            else:
                c.execute("DELETE FROM meta WHERE key = 'format'")
                c.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", meta.items())
                self._chain_existing_rows()
            self._write_head()
            for stmt in _triggers_sql().splitlines():
                c.execute(stmt)
            c.execute(f"PRAGMA user_version = {VERSION}")
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise

    def _chain_existing_rows(self) -> None:
        """Version 1 → 2: log every existing row (in the order it was written) under the node key.

        The rows' past is taken as found (version 1 had no tamper evidence); from here on it is
        signed. The platform's witness sees the migration as a new ledger for this merchant.
        """
        c = self.conn
        for kind, order in (("budgets", "seq"), ("runs", "reserved_at, run_id, purpose"), ("spends", "seq")):
            cols = ", ".join(TABLE_COLUMNS[kind])
            for row in c.execute(f"SELECT rowid, {cols} FROM {kind} ORDER BY {order}").fetchall():
                values = dict(zip(TABLE_COLUMNS[kind], row[1:]))
                seq = self._append_log(kind, row_bytes(kind, values))
                c.execute(f"UPDATE {kind} SET log_seq = ? WHERE rowid = ?", (seq, row[0]))
        latest = c.execute("SELECT b.purpose, b.epsilon, b.delta FROM budgets b WHERE b.seq = "
                           "(SELECT MAX(seq) FROM budgets WHERE purpose = b.purpose)").fetchall()
        if latest:  # version 1 had one budget per purpose: the node cap that changes nothing is their sum
            deltas = [r[2] for r in latest]
            self.insert("budgets", self.sign_cap_event({
                "seq": self.next_seq("budgets"), "purpose": NODE, "epsilon": float(sum(r[1] for r in latest)),
                "delta": None if None in deltas else float(sum(deltas)), "set_at": now(),
                "note": "migrated from per-purpose budgets (version 1): node cap = their sum "
                        f"({', '.join(f'{r[0]} ε={r[1]:g}' for r in latest)})",
                "previous_epsilon": None, "previous_delta": None}))

    # -- verifying -----------------------------------------------------------------------
    def verify(self) -> None:
        """Recheck triggers, rows against log, the chain, every head's root and signature; fail closed."""
        c = self.conn
        where = f"privacy ledger {self.path}"
        have = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='trigger'")}
        missing = [t for t in TRIGGERS if t not in have]
        if missing:
            raise PrivacyError(f"{where} was edited outside fedretain: append-only triggers missing "
                               f"({', '.join(missing)}); refusing to use it (restore it from a backup)")
        meta = dict(c.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("format") != FORMAT:
            raise PrivacyError(f"{where}: not a {FORMAT} file (format {meta.get('format')!r})")
        if meta.get("key_fingerprint") != self.fingerprint:
            raise PrivacyError(f"{where} belongs to node key {meta.get('key_fingerprint')}, not this node's key "
                               f"{self.fingerprint}; refusing to use it")
        self.controller = meta.get("controller", "")
        log = c.execute("SELECT seq, kind, canonical, prev_hash, entry_hash FROM log ORDER BY seq").fetchall()
        by_seq: dict[int, tuple[str, bytes]] = {}
        prev, frontier = ZERO_HASH, Frontier()
        roots: dict[int, str] = {0: EMPTY_ROOT.hex()}
        for i, (seq, kind, canonical, prev_hash, entry_hash) in enumerate(log, start=1):
            data = canonical.encode("utf-8")
            lh = leaf_hash(data)
            if seq != i or bytes(prev_hash) != prev or bytes(entry_hash) != hashlib.sha256(prev + lh).digest():
                raise PrivacyError(f"{where}: hash chain broken at log entry {i} (an entry was removed, "
                                   f"inserted or edited); refusing to use it")
            prev = bytes(entry_hash)
            frontier.append(lh)
            roots[i] = frontier.root().hex()
            by_seq[seq] = (kind, data)
        seen: set[int] = set()
        for kind, cols in TABLE_COLUMNS.items():
            for row in c.execute(f"SELECT log_seq, {', '.join(cols)} FROM {kind}").fetchall():
                values = dict(zip(cols, row[1:]))
                entry = by_seq.get(row[0])
                if entry is None or entry != (kind, row_bytes(kind, values)) or row[0] in seen:
                    raise PrivacyError(f"{where}: table {kind} row {_name(kind, values)} does not match its signed "
                                       f"log entry (inserted or edited outside fedretain); refusing to use it")
                seen.add(row[0])
        if len(seen) != len(log):
            gone = sorted(set(by_seq) - seen)[:5]
            raise PrivacyError(f"{where}: {len(log) - len(seen)} signed record(s) are missing from the tables "
                               f"(log entries {gone}: rows deleted); refusing to use it")
        heads = c.execute("SELECT size, root_hex, signature_hex, timestamp, key_fingerprint FROM heads "
                          "ORDER BY head_id").fetchall()
        if not heads:
            raise PrivacyError(f"{where} has no signed head; refusing to use it")
        last = 0
        for size, root_hex, _sig, _ts, _fp in heads:  # every head is a prefix of this one log...
            if size < last or size > len(log) or roots.get(size) != root_hex:
                raise PrivacyError(f"{where}: the log ({len(log)} entries) does not match its signed head of size "
                                   f"{size} (rows removed or rewritten); refusing to use it")
            last = size
        size, root_hex, sig, ts, fp = heads[-1]  # ...and the latest, covering all of it, is signed by the node
        if fp != self.fingerprint or not BudgetHead(size, root_hex, sig, ts, self.controller, fp).verify(
                self.key.public_key()):
            raise PrivacyError(f"{where}: the latest head (size {size}) is not signed by this node's key "
                               f"{self.fingerprint}; refusing to use it")
        if last != len(log):
            raise PrivacyError(f"{where}: {len(log) - last} log entries are not covered by a signed head; "
                               f"refusing to use it")
        for row in c.execute("SELECT * FROM budgets WHERE signature_hex != ''").fetchall():
            values = dict(row)
            ok = values["key_fingerprint"] == self.fingerprint and signing.verify_signature(
                self.key.public_key(), bytes.fromhex(values["signature_hex"]), cap_event_bytes(values))
            if not ok:
                raise PrivacyError(f"{where}: budget event {values['seq']} is not signed by this node's key")
        self.frontier, self.last_hash = frontier, prev

    def quick_check(self) -> None:
        """Inside a write transaction: unchanged tip, triggers and row count since the last full check
        (every open verifies in full), else the full :meth:`verify`."""
        row = self.conn.execute("SELECT seq, entry_hash FROM log ORDER BY seq DESC LIMIT 1").fetchone()
        tip = (0, ZERO_HASH) if row is None else (row[0], bytes(row[1]))
        n_triggers = self.conn.execute(
            f"SELECT COUNT(*) FROM sqlite_master WHERE type='trigger' AND name IN ({','.join('?' * len(TRIGGERS))})",
            TRIGGERS).fetchone()[0]
        rows = self.conn.execute("SELECT (SELECT COUNT(*) FROM budgets) + (SELECT COUNT(*) FROM runs) + "
                                 "(SELECT COUNT(*) FROM spends)").fetchone()[0]
        if tip != (self.frontier.size, self.last_hash) or n_triggers != len(TRIGGERS) or rows != tip[0]:
            self.verify()

    # -- writing -------------------------------------------------------------------------
    @contextmanager
    def write(self, *, full_check: bool = False) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: verify, let the caller append rows, sign a new head, commit."""
        saved = (self.frontier.copy(), self.last_hash)
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.verify() if full_check else self.quick_check()
            size = self.frontier.size
            yield self.conn
            if self.frontier.size != size:
                self._write_head()
        except BaseException:
            self.conn.execute("ROLLBACK")
            self.frontier, self.last_hash = saved
            raise
        self.conn.execute("COMMIT")

    def insert(self, kind: str, values: dict[str, Any]) -> int:
        """Append a row of table ``kind`` and its log entry; returns the row's rowid."""
        seq = self._append_log(kind, row_bytes(kind, values))
        cols = TABLE_COLUMNS[kind]
        cur = self.conn.execute(
            f"INSERT INTO {kind} ({', '.join(cols)}, log_seq) VALUES ({', '.join('?' * len(cols))}, ?)",
            [_typed(c, values[c]) for c in cols] + [seq])
        if cur.lastrowid is None:  # sqlite3 sets it after every INSERT; None would mean no row was written
            raise sqlite3.DatabaseError(f"INSERT into {kind} returned no rowid")
        return cur.lastrowid

    def next_seq(self, table: str) -> int:
        """The AUTOINCREMENT value the next row of ``table`` gets (known before hashing the row)."""
        row = self.conn.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()
        return (row[0] if row else 0) + 1

    def sign_cap_event(self, values: dict[str, Any]) -> dict[str, Any]:
        signed = {**values, "key_fingerprint": self.fingerprint, "signature_hex": ""}
        signed["signature_hex"] = signing.sign(self.key, cap_event_bytes(signed)).hex()
        return signed

    def _append_log(self, kind: str, data: bytes) -> int:
        lh = leaf_hash(data)
        entry = hashlib.sha256(self.last_hash + lh).digest()
        seq = self.frontier.size + 1
        self.conn.execute("INSERT INTO log (seq, kind, canonical, prev_hash, entry_hash) VALUES (?, ?, ?, ?, ?)",
                          (seq, kind, data.decode("utf-8"), self.last_hash, entry))
        self.frontier.append(lh)
        self.last_hash = entry
        return seq

    def _write_head(self) -> BudgetHead:
        root_hex = self.frontier.root().hex() if self.frontier.size else EMPTY_ROOT.hex()
        ts = now()
        sig = signing.sign(self.key, checkpoint_text(self.controller, self.frontier.size, root_hex, ts)).hex()
        self.conn.execute("INSERT INTO heads (size, root_hex, timestamp, signature_hex, key_fingerprint) "
                          "VALUES (?, ?, ?, ?, ?)", (self.frontier.size, root_hex, ts, sig, self.fingerprint))
        return BudgetHead(self.frontier.size, root_hex, sig, ts, self.controller, self.fingerprint)

    # -- witnessing ----------------------------------------------------------------------
    def head(self) -> BudgetHead:
        r = self.conn.execute("SELECT size, root_hex, signature_hex, timestamp, key_fingerprint FROM heads "
                              "ORDER BY head_id DESC LIMIT 1").fetchone()
        return BudgetHead(r[0], r[1], r[2], r[3], self.controller, r[4])

    def leaf_hashes(self, size: int | None = None) -> list[bytes]:
        q = "SELECT canonical FROM log ORDER BY seq" + ("" if size is None else f" LIMIT {int(size)}")
        return [leaf_hash(t.encode("utf-8")) for (t,) in self.conn.execute(q)]

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[str]:
        n = self.frontier.size if new_size is None else int(new_size)
        try:
            return [p.hex() for p in consistency_proof(self.leaf_hashes(n), int(old_size), n)]
        except ValueError as exc:
            raise PrivacyError(f"privacy ledger {self.path}: {exc} (the ledger has {self.frontier.size} entries)") \
                from None

    def check_against(self, kept: LedgerHead) -> None:
        """Refuse unless this ledger extends ``kept`` (a head signed earlier by this node and kept elsewhere)."""
        where = f"privacy ledger {self.path}"
        if kept.key_fingerprint != self.fingerprint or not BudgetHead(**_fields(kept)).verify(self.key.public_key()):
            raise PrivacyError(f"{where}: the kept head (size {kept.size}) is not signed by this node's key")
        size = self.frontier.size
        if kept.size > size:
            raise PrivacyError(f"{where} has {size} entries but a head signed at {kept.timestamp} covered "
                               f"{kept.size}: the file was rolled back or truncated; refusing to use it")
        proof = [bytes.fromhex(p) for p in self.consistency_proof(kept.size, size)]
        new_root = bytes.fromhex(self.head().root_hex)
        ok = (kept.root_hex == new_root.hex()) if kept.size == size else (
            kept.size == 0 or verify_consistency(kept.size, size, proof, bytes.fromhex(kept.root_hex), new_root))
        if not ok:
            raise PrivacyError(f"{where} does not extend the head of size {kept.size} signed at {kept.timestamp} "
                               f"(a forked or rewritten history); refusing to use it")


def _fields(head: LedgerHead) -> dict[str, Any]:
    return {k: getattr(head, k) for k in ("size", "root_hex", "signature", "timestamp", "controller",
                                         "key_fingerprint")}


def _name(kind: str, values: dict[str, Any]) -> str:
    if kind == "runs":
        return f"run_id={values['run_id']!r} purpose={values['purpose']!r}"
    return f"seq={values['seq']}"
