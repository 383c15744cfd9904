"""The platform as witness of every merchant's ledgers (certificate-transparency style).

Each reply a node sends carries its ledgers' signed tree heads and RFC 9162 consistency
proofs (``fedretain.consent.witness_record``). The platform keeps, per merchant and ledger
kind, the key it pinned at first sight (trust on first use, or registered beforehand) and
the last head it accepted, in a SQLite file that outlives runs and server restarts
(``witness-db`` in the run config; default ``witness.db`` beside the run folder). A reply is
accepted only if every head is signed by the pinned key and is an append-only extension of
the head witnessed before (the consistency proof verifies with ``consent.merkle``). A ledger
that shrank (truncation, rollback to an older copy), forked (same or larger size, other
history) or changed key is refused: the reply becomes an error reply, so it is left out of
aggregation like a failed node, and an alert naming the merchant and the reason goes into
the run record and the store. The run goes on while ``min-nodes`` still answer.

:class:`WitnessStore` is the persistent part, :func:`judge` the pure decision; the grid
wrapper that applies them to every exchange is ``fedretain.server.witness_grid``.
"""

from __future__ import annotations

import functools
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedretain.consent import signing
from fedretain.consent.merkle import verify_consistency
from fedretain.consent.witness_record import HeadClaim, SignedHead

__all__ = ["DB_FILE", "Pin", "WitnessStore", "judge", "witness_db_path"]

DB_FILE = "witness.db"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS pins (
    merchant        TEXT NOT NULL,
    kind            TEXT NOT NULL,
    key_fingerprint TEXT NOT NULL,
    public_key_pem  TEXT NOT NULL,
    format          TEXT NOT NULL,
    how             TEXT NOT NULL,     -- 'first-sight' or 'registered'
    pinned_at       TEXT NOT NULL,
    PRIMARY KEY (merchant, kind)
);
CREATE TABLE IF NOT EXISTS heads (      -- every head accepted, in order; the last per (merchant, kind) is current
    head_id         INTEGER PRIMARY KEY,
    merchant        TEXT NOT NULL,
    kind            TEXT NOT NULL,
    size            INTEGER NOT NULL,
    root            TEXT NOT NULL,
    signature       TEXT NOT NULL,
    timestamp       TEXT NOT NULL,
    controller      TEXT NOT NULL,
    format          TEXT NOT NULL,
    key_fingerprint TEXT NOT NULL,
    witnessed_at    TEXT NOT NULL,
    run_id          TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS heads_merchant ON heads(merchant, kind, head_id);
CREATE TABLE IF NOT EXISTS alerts (
    alert_id  INTEGER PRIMARY KEY,
    at        TEXT NOT NULL,
    merchant  TEXT NOT NULL,
    kind      TEXT NOT NULL,
    reason    TEXT NOT NULL,
    run_id    TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS heads_no_update BEFORE UPDATE ON heads
BEGIN SELECT RAISE(ABORT, 'witness heads are append-only'); END;
CREATE TRIGGER IF NOT EXISTS heads_no_delete BEFORE DELETE ON heads
BEGIN SELECT RAISE(ABORT, 'witness heads are append-only'); END;
CREATE TRIGGER IF NOT EXISTS alerts_no_update BEFORE UPDATE ON alerts
BEGIN SELECT RAISE(ABORT, 'witness alerts are append-only'); END;
CREATE TRIGGER IF NOT EXISTS alerts_no_delete BEFORE DELETE ON alerts
BEGIN SELECT RAISE(ABORT, 'witness alerts are append-only'); END;
CREATE TRIGGER IF NOT EXISTS pins_no_update BEFORE UPDATE ON pins
BEGIN SELECT RAISE(ABORT, 'a pinned key is never changed in place'); END;
"""
_HEAD_COLS = "size, root, signature, timestamp, controller, format, key_fingerprint"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def witness_db_path(out_dir: str | os.PathLike[str], configured: str = "") -> Path:
    """The witness store: ``configured`` (run config ``witness-db``) or ``witness.db`` beside the run folder,
    so consecutive runs of one platform (``runs/a``, ``runs/b``) share it."""
    return Path(configured) if configured else Path(out_dir).resolve().parent / DB_FILE


@dataclass(frozen=True)
class Pin:
    """The key the platform trusts for one merchant's ledger of one kind."""

    key_fingerprint: str
    public_key_pem: str
    format: str
    how: str
    pinned_at: str


def _is_hex(text: str, nbytes: int | None = None) -> bool:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        return False
    return nbytes is None or len(raw) == nbytes


@functools.lru_cache(maxsize=8192)
def _parsed_pem(pem: str) -> tuple[Ed25519PublicKey, str]:
    key = signing.load_public_key(pem)
    return key, signing.fingerprint(key)


def _public_key(pem: str) -> tuple[Ed25519PublicKey, str]:
    """The key a node sent and its fingerprint. PEM text is parsed once per server process (every reply of
    a merchant carries the same one); the signature itself is verified on every reply."""
    if isinstance(pem, str) and "-----BEGIN" in pem:
        return _parsed_pem(pem)
    key = signing.load_public_key(pem)
    return key, signing.fingerprint(key)


def judge(merchant: str, kind: str, claim: HeadClaim, pin: Pin | None, last: SignedHead | None) -> str | None:
    """Why the claim must be refused, or None if it extends what was witnessed (pure; no I/O)."""
    head = claim.head
    if head is None:
        return f"the node sent no signed {kind} head ({claim.error or 'no reason given'})"
    if head.controller != merchant:
        return f"the {kind} ledger belongs to controller {head.controller!r}, not to merchant {merchant!r}"
    if head.size < 0 or not _is_hex(head.root, 32):
        return f"the {kind} head is malformed (size {head.size}, root {head.root[:16]!r})"
    try:
        key, fingerprint = _public_key(claim.public_key_pem)
    except signing.KeyFileError as exc:
        return f"the node sent no usable public key for its {kind} ledger ({exc})"
    if fingerprint != head.key_fingerprint:
        return f"the {kind} head names key {head.key_fingerprint} but came with key {fingerprint}"
    if pin is not None and fingerprint != pin.key_fingerprint:
        return (f"re-keyed {kind} ledger: its head is signed by key {fingerprint}, but the platform pinned key "
                f"{pin.key_fingerprint} for this merchant ({pin.how}, {pin.pinned_at})")
    if pin is not None and head.format != pin.format:
        return f"the {kind} ledger changed format from {pin.format!r} to {head.format!r}"
    if not head.verify(key):
        return f"the {kind} head's signature does not verify under the merchant's key"
    if last is None:
        return None  # first sight: nothing to be consistent with
    if head.size < last.size:
        return (f"the {kind} ledger shrank from {last.size} to {head.size} records since the platform witnessed it "
                f"(head of {last.timestamp}): truncation or rollback to an older copy")
    if head.size == last.size:
        if head.root != last.root:
            return (f"forked {kind} ledger: same size {head.size} as witnessed but another Merkle root "
                    f"({head.root[:16]}… instead of {last.root[:16]}…)")
        return None
    if claim.proof_from != last.size:
        got = "none" if claim.proof_from < 0 else f"one from size {claim.proof_from}"
        return (f"no consistency proof for the {kind} ledger from the witnessed size {last.size} to {head.size} "
                f"(got {got})")
    if not all(_is_hex(p, 32) for p in claim.proof):
        return f"the {kind} consistency proof holds malformed hashes"
    ok = verify_consistency(last.size, head.size, [bytes.fromhex(p) for p in claim.proof],
                            bytes.fromhex(last.root), bytes.fromhex(head.root))
    if not ok:
        return (f"forked {kind} ledger: size {head.size} is not an append-only extension of the {last.size} "
                f"records witnessed at {last.timestamp} (the consistency proof does not verify)")
    return None


class WitnessStore:
    """Pinned keys, accepted heads and alerts, per merchant and ledger kind (one SQLite file)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=30.0)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")  # an accepted head, once stored, survives a crash
        with self._tx() as c:
            for stmt in _statements(_SCHEMA):
                c.execute(stmt)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> WitnessStore:  # typing.Self is 3.11+; the floor is 3.10
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        try:
            yield c
        except BaseException:
            c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")

    # -- reading -------------------------------------------------------------------------
    def pin(self, merchant: str, kind: str) -> Pin | None:
        row = self._conn.execute("SELECT key_fingerprint, public_key_pem, format, how, pinned_at FROM pins "
                                 "WHERE merchant = ? AND kind = ?", (merchant, kind)).fetchone()
        return Pin(*row) if row else None

    def last(self, merchant: str, kind: str) -> SignedHead | None:
        row = self._conn.execute(f"SELECT {_HEAD_COLS} FROM heads WHERE merchant = ? AND kind = ? "
                                 "ORDER BY head_id DESC LIMIT 1", (merchant, kind)).fetchone()
        return _head(kind, row) if row else None

    def seen(self, merchant: str) -> dict[str, int]:
        """Tree size last witnessed per kind (what a node must prove consistency from)."""
        rows = self._conn.execute("SELECT kind, size FROM heads WHERE head_id IN (SELECT MAX(head_id) FROM heads "
                                  "WHERE merchant = ? GROUP BY kind)", (merchant,)).fetchall()
        return {k: int(n) for k, n in rows}

    def heads(self, merchant: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        """Every accepted head, oldest first, as public dicts (``merchant`` added)."""
        q, params = f"SELECT merchant, kind, {_HEAD_COLS}, witnessed_at, run_id FROM heads", []
        where = []
        if merchant is not None:
            where.append("merchant = ?")
            params.append(merchant)
        if kind is not None:
            where.append("kind = ?")
            params.append(kind)
        q += (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY head_id"
        return [{"merchant": r[0], **_head(r[1], r[2:9]).to_dict(), "witnessed_at": r[9], "run_id": r[10]}
                for r in self._conn.execute(q, params)]

    def alerts(self, merchant: str | None = None) -> list[dict[str, Any]]:
        q = "SELECT at, merchant, kind, reason, run_id FROM alerts"
        rows = self._conn.execute(q + (" WHERE merchant = ?" if merchant else "") + " ORDER BY alert_id",
                                  (merchant,) if merchant else ()).fetchall()
        return [dict(zip(("at", "merchant", "kind", "reason", "run_id"), r)) for r in rows]

    # -- writing -------------------------------------------------------------------------
    def register(self, merchant: str, kind: str, public_key_pem: str, format: str) -> Pin:
        """Pin a merchant's key before its first reply (refused if a different key is pinned already)."""
        fingerprint = signing.fingerprint(signing.load_public_key(public_key_pem))
        with self._tx() as c:
            pin = self.pin(merchant, kind)
            if pin is not None:
                if pin.key_fingerprint != fingerprint:
                    raise ValueError(f"merchant {merchant!r} already has {kind} key {pin.key_fingerprint} pinned")
                return pin
            c.execute("INSERT INTO pins VALUES (?,?,?,?,?,?,?)",
                      (merchant, kind, fingerprint, public_key_pem, format, "registered", _now()))
        return self.pin(merchant, kind)  # type: ignore[return-value]

    def witness(self, merchant: str, claims: dict[str, HeadClaim],
                run_id: str) -> tuple[dict[str, str], list[SignedHead]]:
        """Judge every claim of one reply in one transaction: store them all, or none.

        Returns (kind -> reason for each refused kind, the heads accepted). A kind the platform
        witnessed before but the reply leaves out is refused too (a deleted ledger).
        """
        refused: dict[str, str] = {}
        accepted: list[SignedHead] = []
        with self._tx() as c:
            for kind, size in self.seen(merchant).items():
                if kind not in claims:
                    refused[kind] = (f"the reply carries no {kind} head, but the platform witnessed this merchant's "
                                     f"{kind} ledger at size {size}")
            decided = {k: (self.pin(merchant, k), self.last(merchant, k)) for k in claims}
            for kind, claim in claims.items():
                reason = judge(merchant, kind, claim, *decided[kind])
                if reason:
                    refused[kind] = reason
            if refused:
                for kind, reason in refused.items():
                    c.execute("INSERT INTO alerts (at, merchant, kind, reason, run_id) VALUES (?,?,?,?,?)",
                              (_now(), merchant, kind, reason, run_id))
                return refused, accepted
            for kind, claim in claims.items():
                head = claim.head
                assert head is not None  # judged above
                accepted.append(head)
                pin, last = decided[kind]
                if pin is None:
                    c.execute("INSERT INTO pins VALUES (?,?,?,?,?,?,?)", (merchant, kind, head.key_fingerprint,
                              claim.public_key_pem, head.format, "first-sight", _now()))
                if last is None or (last.size, last.root) != (head.size, head.root):
                    c.execute(f"INSERT INTO heads (merchant, kind, {_HEAD_COLS}, witnessed_at, run_id) "
                              "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                              (merchant, kind, head.size, head.root, head.signature, head.timestamp,
                               head.controller, head.format, head.key_fingerprint, _now(), run_id))
        return refused, accepted


def _head(kind: str, row: Any) -> SignedHead:
    size, root, signature, timestamp, controller, fmt, fingerprint = row
    return SignedHead(kind, fmt, controller, int(size), root, signature, timestamp, fingerprint)


def _statements(script: str) -> list[str]:
    out, buf = [], ""
    for line in script.splitlines(keepends=True):
        buf += line
        if buf.strip() and sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    return out
