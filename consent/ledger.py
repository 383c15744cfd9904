"""The consent ledger: one append-only, hash-chained, Merkle-signed SQLite file per merchant node.

Why this shape:

* **append-only in the database itself** — ``BEFORE UPDATE``/``BEFORE DELETE`` triggers
  abort any edit, so a bug or a careless SQL session cannot rewrite consent history;
* **tamper-evident beyond the triggers** — each row stores ``entry_hash = SHA-256(prev_hash
  || leaf_hash)`` (a hash chain that pinpoints the first altered row), and after every
  batch the node signs an RFC 9162 Merkle root of all records with its Ed25519 key
  (signed heads), so even an attacker who drops the triggers and recomputes the chain
  cannot produce a history the node key never signed;
* **no mutable "current state"** — consent at time T is *computed* from the log by
  replay (:meth:`ConsentLedger.state_at`), so the answer for any past T stays reproducible.

Record timestamps are stored as integer microseconds since the Unix epoch (UTC).
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import signing
from .gate import ConsentError
from .identity import NodePin, check_pinned
from .importer import Batch, ConsentImportError, layout_of, prepare_records, prepare_table, read_arrow
from .merkle import EMPTY_ROOT, Frontier, consistency_proof, inclusion_proof
from .records import ConsentRecord, format_ts, gc_paused, step, to_us
from .usage import USAGE_SCHEMA, UsageRecord, record_usage, usages
from .vocab import SCOPES, VOCAB_VERSION, UnknownTermError, check_purpose

__all__ = ["ConsentLedger", "LedgerHead", "LedgerError", "UsageWriteError", "checkpoint_text", "FORMAT", "replay_state"]

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
    layout       INTEGER             -- where some keys sit in canonical: a hint for verify (importer.LAYOUT_KEYS)
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
BULK_ROWS = 20_000
_SLICE = 1 << 16  # rows hashed and inserted at a time
PROTECTED_TABLES: tuple[str, ...] = ("meta", "records", "heads", "usage", "usage_subjects")
TRIGGERS: tuple[str, ...] = tuple(f"{t}_no_{op}" for t in PROTECTED_TABLES for op in ("update", "delete"))


def _trigger_sql(table: str) -> str:
    return "".join(
        f"CREATE TRIGGER IF NOT EXISTS {table}_no_{op.lower()} BEFORE {op} ON {table} "
        f"BEGIN SELECT RAISE(ABORT, 'consent ledger is append-only: {op} on {table} refused'); END;\n"
        for op in ("UPDATE", "DELETE")
    )


class LedgerError(Exception):
    """The ledger cannot be opened, written or trusted; the message says why."""


class UsageWriteError(LedgerError, ConsentError):
    """A data use could not be recorded: a consent failure for the node (it must not reply)."""


def checkpoint_text(controller: str, size: int, root_hex: str, timestamp: str) -> bytes:
    """The exact bytes a signed head signs (one field per line, no trailing newline)."""
    return f"{FORMAT}\n{controller}\n{size}\n{root_hex}\n{timestamp}".encode()


@dataclass(frozen=True)
class LedgerHead:
    """A signed checkpoint: the ledger's size and RFC 9162 root at a moment, signed by the node."""

    size: int
    root_hex: str
    signature: str  # hex Ed25519 signature over checkpoint_text(...)
    timestamp: str
    controller: str
    key_fingerprint: str

    def checkpoint(self) -> bytes:
        return checkpoint_text(self.controller, self.size, self.root_hex, self.timestamp)

    def verify(self, public_key: Ed25519PublicKey) -> bool:
        """Is this head signed by ``public_key``? (For servers holding the node's public key.)"""
        try:
            sig = bytes.fromhex(self.signature)
        except ValueError:
            return False
        return signing.verify_signature(public_key, sig, self.checkpoint())

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "root_hex": self.root_hex, "signature": self.signature,
                "timestamp": self.timestamp, "controller": self.controller,
                "key_fingerprint": self.key_fingerprint}


class ConsentLedger:
    """One merchant node's consent ledger (see the module docstring).

    Open with :meth:`open` (or :meth:`create`). Writing needs the node's private key
    (``key_path``); reading and verifying do not.
    """

    def __init__(self, conn: sqlite3.Connection, path: Path, key: Ed25519PrivateKey | None,
                 pinned: NodePin | None = None) -> None:
        self._conn = conn
        self.path = path
        self._key = key
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("format") != FORMAT:
            raise LedgerError(f"{path} is not a {FORMAT} file (format {meta.get('format')!r})")
        self.controller: str = meta["controller"]
        self.key_fingerprint: str = meta["key_fingerprint"]
        self.public_key_pem: str = meta["public_key_pem"]
        self.created_at: str = meta.get("created_at", "")
        self._pinned: Ed25519PublicKey | None = None  # open(pinned=...): the only key verify trusts
        if pinned is not None:  # first: the pin names the file and both keys
            check_pinned(path, self.key_fingerprint, self.controller, pinned)
            self._pinned = pinned.public_key
        if key is not None and signing.fingerprint(key) != self.key_fingerprint:
            raise LedgerError(
                f"the key {signing.fingerprint(key)} does not match the key of ledger {path} ({self.key_fingerprint})"
            )

    # -- opening ------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        key_path: str | os.PathLike[str] | None = None,
        create: bool = False,
        controller: str | None = None,
        pinned: NodePin | None = None,
    ) -> ConsentLedger:
        """Open the ledger at ``path``; with ``create=True`` make it (needs ``controller``, ``key_path``).

        ``pinned`` (the node's pinned identity, :mod:`.identity`) makes the ledger trusted only
        under that key: a ledger declaring any other key or merchant is refused here
        (:class:`~.identity.PinError`), and :meth:`verify` checks every signature against the pin.
        """
        path = Path(path)
        if not path.exists():
            if not create:
                raise LedgerError(f"no consent ledger at {path}: a node's ledger is SILO/.node/consent.db "
                                  f"(pass --silo SILO "
                                  "or --db PATH); `fedretain consent init` is only for a node that has no ledger yet")
            if not controller:
                raise LedgerError("creating a ledger needs the controller (merchant id)")
            if key_path is None:
                raise LedgerError("creating a ledger needs a key path for the node's signing key")
            return cls.create(path, controller=controller, key_path=key_path)
        key = signing.load_private_key(key_path) if key_path is not None else None
        try:
            conn = _connect(path)
        except sqlite3.DatabaseError as exc:
            raise storage_error(exc, path, "open") from None
        try:
            names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if not {"meta", "records", "heads"} <= names:
                raise LedgerError(f"{path} is not a consent ledger (tables missing)")
            ledger = cls(conn, path, key, pinned)
            if controller is not None and controller.strip() != ledger.controller:
                raise LedgerError(f"{path} is the ledger of controller {ledger.controller!r}, not {controller!r}")
            if key is not None and conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                _set_journal_mode(conn, "wal")  # a bulk import could not switch back (see _bulk_journal)
            if key is not None and "layout" not in {r[1] for r in conn.execute("PRAGMA table_info(records)")}:
                conn.execute("ALTER TABLE records ADD COLUMN layout INTEGER")  # older files: older rows stay NULL
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise storage_error(exc, path, "open") from None
        except BaseException:
            conn.close()
            raise
        return ledger

    @classmethod
    def create(cls, path: str | os.PathLike[str], *, controller: str,
               key_path: str | os.PathLike[str]) -> ConsentLedger:
        """Create a new ledger file (the key is created too if ``key_path`` does not exist)."""
        path = Path(path)
        if path.exists():
            raise LedgerError(f"{path} already exists; refusing to overwrite a consent ledger")
        controller = controller.strip()
        if not controller or "\n" in controller:
            raise LedgerError("the controller (merchant id) must be non-empty single-line text")
        key, _ = signing.load_or_create_key(key_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".creating")
        for p in (tmp, Path(str(tmp) + "-wal"), Path(str(tmp) + "-shm")):
            p.unlink(missing_ok=True)
        conn = _connect(tmp)
        try:
            conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("BEGIN IMMEDIATE")
            for stmt in _statements(SCHEMA + USAGE_SCHEMA + "".join(_trigger_sql(t) for t in PROTECTED_TABLES)):
                conn.execute(stmt)
            for stmt in INDEXES.values():
                conn.execute(stmt)
            now = format_ts(datetime.now(timezone.utc))
            meta = {
                "format": FORMAT,
                "controller": controller,
                "created_at": now,
                "public_key_pem": signing.public_key_pem(key),
                "key_fingerprint": signing.fingerprint(key),
                "vocab_version": VOCAB_VERSION,
            }
            conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", meta.items())
            _write_head(conn, key, controller, Frontier(), now)
            conn.execute("COMMIT")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except BaseException:
            conn.close()
            for p in (tmp, Path(str(tmp) + "-wal"), Path(str(tmp) + "-shm")):
                p.unlink(missing_ok=True)
            raise
        conn.close()
        try:
            os.link(tmp, path)  # unlike a rename, never replaces a ledger created meanwhile
        except FileExistsError:
            raise LedgerError(f"{path} already exists; refusing to overwrite a consent ledger") from None
        except OSError:  # a filesystem without hard links
            os.replace(tmp, path)
        finally:
            for p in (tmp, Path(str(tmp) + "-wal"), Path(str(tmp) + "-shm")):
                p.unlink(missing_ok=True)
        return cls.open(path, key_path=key_path)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> ConsentLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connection(self) -> sqlite3.Connection:
        """The underlying connection (read access for audits and reports)."""
        return self._conn

    @property
    def public_key(self) -> Ed25519PublicKey:
        """The node key: from the private key or the pin if opened with one, else as recorded in the ledger."""
        if self._key is not None:
            return self._key.public_key()
        if self._pinned is not None:
            return self._pinned
        return signing.load_public_key(self.public_key_pem)

    @property
    def pinned_key(self) -> Ed25519PublicKey | None:
        """The node's pinned public key, if the ledger was opened with one."""
        return self._pinned

    @property
    def has_signing_key(self) -> bool:
        return self._key is not None

    # -- writing ------------------------------------------------------------------------
    def append(self, record: ConsentRecord) -> int:
        """Append one record and sign a new head; returns the new ledger size."""
        return self.append_many([record])

    def append_many(self, records: Sequence[ConsentRecord]) -> int:
        """Append records in one transaction with one signed head; returns the new size."""
        if not records:
            return self.size
        with gc_paused(), storage_errors(self.path, "append consent records to"):
            return self._insert(prepare_records(list(records), controller=self.controller), source="records")[0]

    def import_file(self, path: str | os.PathLike[str], *, recorded_by: str | None = None) -> int:
        """Import a CSV/JSONL consent file as one transaction; returns the number of records added.

        A file with any bad row changes nothing; :class:`ConsentImportError` names the
        file, the row and the field.
        """
        self._require_key()
        path = Path(path)
        with gc_paused(), storage_errors(self.path, f"import {path.name} into"):
            return self._import_file(path, recorded_by)

    def _import_file(self, path: Path, recorded_by: str | None) -> int:
        with step("read"):
            table = read_arrow(path)
        if table.num_rows == 0:
            return 0
        with step("validate+canonical"):
            batch = prepare_table(table, source=path.name, controller=self.controller,
                                  default_recorded_by=recorded_by if recorded_by is not None else f"import:{path.name}")
        return self._insert(batch, source=path.name)[1]  # what this transaction inserted, not a size difference

    def _require_key(self) -> Ed25519PrivateKey:
        if self._key is None:
            raise LedgerError("the ledger was opened without the node key; writing needs it to sign heads")
        return self._key

    def _insert(self, batch: Batch, *, source: str) -> tuple[int, int]:
        """Hash, chain and insert a validated batch, then sign the new head; one transaction.

        Returns ``(new size, records inserted)``: the count is this transaction's own, so a
        writer appending between the caller's reads and this transaction does not inflate it.

        Work goes in slices of ``_SLICE`` rows (hash a slice, insert it) so that memory
        stays flat and each slice's bytes are still in cache when SQLite copies them. A bulk
        batch (at least ``BULK_ROWS`` and at least half the ledger) rebuilds the indexes once
        at the end and, when no other connection has the file open, runs under a rollback
        journal instead of the WAL (see :meth:`_bulk_journal`).
        """
        key = self._require_key()
        conn = self._conn
        cols = _BatchColumns(batch)
        n = len(cols)
        with self._bulk_journal(n >= BULK_ROWS and n >= (self.size + 1) // 2):
            conn.execute("BEGIN IMMEDIATE")
            try:
                missing = self._missing_triggers()
                if missing:
                    raise LedgerError(f"append-only triggers are missing ({', '.join(missing)}): the file was "
                                      "modified outside fedretain; run `fedretain consent verify`")
                frontier, prev = self._tip(key)
                seq0 = frontier.size + 1
                rebuild = n >= BULK_ROWS and n >= seq0 // 2
                if rebuild:
                    for name in (*INDEXES, *_RETIRED_INDEXES):
                        conn.execute(f"DROP INDEX IF EXISTS {name}")
                sha = hashlib.sha256
                for lo in range(0, n, _SLICE):
                    hi = min(lo + _SLICE, n)
                    with step("columns"):
                        cols_lo, datas = cols.rows(lo, hi)
                    with step("hash+chain+merkle"):
                        leaves = [sha(b"\x00" + d).digest() for d in datas]
                        del datas
                        entries = [prev]
                        append = entries.append
                        for lh in leaves:  # the chain is inherently sequential: keep the loop tight
                            prev = sha(prev + lh).digest()
                            append(prev)
                        frontier.extend(leaves)
                        # bytearray, not bytes, and -1 for "no expiry": Python's sqlite3 binds int, str
                        # and bytearray directly but looks up an adapter for bytes and None (~1 µs each)
                        blobs = list(map(bytearray, entries))
                    rid, subj, purpose, action, scopes, eff, exp, texts, layout = cols_lo
                    with step("insert"):
                        conn.executemany(_INSERT_SQL, zip(
                            range(seq0 + lo, seq0 + hi), rid, subj, purpose, action, scopes, eff, exp, texts,
                            blobs[:-1], blobs[1:], layout))
                    del cols_lo, rid, subj, purpose, action, scopes, eff, exp, texts, layout, blobs
                if rebuild:
                    with step("indexes"):
                        for stmt in INDEXES.values():
                            conn.execute(stmt)
                with step("commit"):
                    _write_head(conn, key, self.controller, frontier, format_ts(datetime.now(timezone.utc)))
                    conn.execute("COMMIT")
            except sqlite3.IntegrityError:
                _rollback(conn)
                raise self._duplicate_error(cols.record_ids(), batch.rows, source) from None  # diagnosed after rollback
            except BaseException:
                _rollback(conn)
                raise
        return frontier.size, n

    @contextmanager
    def _bulk_journal(self, bulk: bool) -> Iterator[None]:
        """Run a bulk import under a rollback journal when nobody else has the file open.

        In WAL mode every page of a big import is written twice (to the WAL, then copied
        into the database by the checkpoint) and the WAL file stays as big as the import.
        A rollback journal writes new pages once and journals only the few pages that
        existed before, with the same atomicity and durability (``synchronous=FULL``): a
        crash mid-import is rolled back from the journal on the next open. Leaving WAL needs
        the only connection to the file, so this is tried without waiting; when another
        connection is open the import simply runs in WAL mode. WAL is restored afterwards
        (and on the next :meth:`open` should that fail).
        """
        switched = bulk and _set_journal_mode(self._conn, "delete")
        try:
            yield
        finally:
            if switched:
                with step("commit"):
                    _set_journal_mode(self._conn, "wal")

    def _tip(self, key: Ed25519PrivateKey) -> tuple[Frontier, bytes]:
        """The last signed head's frontier and the last entry hash, checked before extending them."""
        head = self._conn.execute(
            "SELECT size, root_hex, timestamp, signature_hex, frontier FROM heads ORDER BY head_id DESC LIMIT 1"
        ).fetchone()
        if head is None:
            raise LedgerError("the ledger has no signed head; run `fedretain consent verify`")
        size, root_hex, ts, sig_hex, blob = head
        try:
            frontier = Frontier.from_bytes(size, blob)
            ok = frontier.root().hex() == root_hex and signing.verify_signature(
                key.public_key(), bytes.fromhex(sig_hex), checkpoint_text(self.controller, size, root_hex, ts))
        except ValueError:
            ok = False
        if not ok:
            raise LedgerError("the latest signed head does not verify; refusing to append "
                              "(run `fedretain consent verify`)")
        last = self._conn.execute("SELECT seq, entry_hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
        n = 0 if last is None else last[0]
        if n != size:
            raise LedgerError(f"the ledger holds {n} records but its latest signed head covers {size}; refusing "
                              "to append (run `fedretain consent verify`)")
        return frontier, (ZERO_HASH if last is None else bytes(last[1]))

    def _duplicate_error(self, ids: list[str], rows: np.ndarray, source: str) -> ConsentImportError:
        existing: set[str] = set()
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            q = f"SELECT record_id FROM records WHERE record_id IN ({','.join('?' * len(chunk))})"
            existing.update(r[0] for r in self._conn.execute(q, chunk))
        errs = [(int(rows[i]), "record_id", f"record_id {rid!r} is already in the ledger "
                 "(this consent event was imported before)") for i, rid in enumerate(ids) if rid in existing]
        if not errs:
            errs = [(0, "record_id", "duplicate record ids")]
        return ConsentImportError(source, errs[:100], len(errs))

    def _missing_triggers(self) -> list[str]:
        have = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'")}
        return [t for t in TRIGGERS if t not in have]

    # -- usage log ----------------------------------------------------------------------
    def record_usage(self, run_id: str, round: int, purpose: str, feature_set: str | Iterable[str],
                     scope_counts: dict[str, int], n_users: int, ledger_size: int, ledger_root: str,
                     at: Any, subjects: Iterable[str]) -> int:
        """Log that ``subjects``' data was used by ``run_id``/``round`` (see :mod:`.usage`)."""
        try:
            with storage_errors(self.path, "record a data use in"):
                return record_usage(self._conn, run_id, round, purpose, feature_set, scope_counts, n_users,
                                    ledger_size, ledger_root, at, subjects)
        except LedgerError as exc:
            raise UsageWriteError(f"{exc}; the use was not recorded, so the node must not send anything "
                                  "from it (fail closed)") from None

    def usages(self, subject: str | None = None) -> list[UsageRecord]:
        """Usage entries, all or those that used ``subject``'s data."""
        return usages(self._conn, subject)

    # -- reading ------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Number of records (the largest seq)."""
        r = self._conn.execute("SELECT MAX(seq) FROM records").fetchone()[0]
        return int(r or 0)

    def head(self) -> LedgerHead:
        """The latest signed head."""
        heads = self.heads(last=True)
        if not heads:
            raise LedgerError("the ledger has no signed head")
        return heads[0]

    def heads(self, last: bool = False) -> list[LedgerHead]:
        """All signed heads, oldest first (or just the latest)."""
        q = "SELECT size, root_hex, signature_hex, timestamp, key_fingerprint FROM heads ORDER BY head_id"
        if last:
            q += " DESC LIMIT 1"
        return [LedgerHead(r[0], r[1], r[2], r[3], self.controller, r[4]) for r in self._conn.execute(q)]

    def records(self, subject: str | None = None) -> list[ConsentRecord]:
        """Records in ledger order (all, or one subject's)."""
        return list(self.iter_records(subject))

    def iter_records(self, subject: str | None = None) -> Iterator[ConsentRecord]:
        if subject is None:
            cur = self._conn.execute("SELECT canonical FROM records ORDER BY seq")
        else:
            cur = self._conn.execute("SELECT canonical FROM records WHERE subject_id = ? ORDER BY seq", (subject,))
        for (text,) in cur:
            yield ConsentRecord.from_json(text)

    def history(self, subject: str) -> pd.DataFrame:
        """One subject's consent history, ordered as replay sees it (effective time, then seq)."""
        rows = self._conn.execute(
            "SELECT seq, canonical FROM records WHERE subject_id = ? ORDER BY effective_at, seq", (subject,)
        ).fetchall()
        out = []
        for seq, text in rows:
            d = ConsentRecord.from_json(text).to_dict()
            d["scopes"] = ";".join(d["scopes"])
            out.append({"seq": seq, **d})
        cols = ["seq", "record_id", "purpose", "action", "scopes", "effective_at", "expires_at",
                "collection_method", "notice_version", "jurisdiction", "recorded_by", "recorded_at",
                "vocab_version", "subject_id", "controller"]
        return pd.DataFrame(out, columns=cols)

    def log_frame(self, purpose: str | None = None, until: Any = None, *, size: int | None = None,
                  subjects: Sequence[str] | None = None) -> pd.DataFrame:
        """The log's replay columns in replay order (effective_at, seq); ``expires_at`` max = none.

        ``size`` limits the log to its first ``size`` records (a verified prefix);
        ``subjects`` to a few subjects (looked up through the subject index). The order is
        made in numpy (a stable sort), not by SQLite.
        """
        where: list[str] = []
        params: list[Any] = []
        if subjects is not None:
            where.append(f"subject_id IN ({','.join('?' * len(subjects))})")
            params.extend(subjects)
        if size is not None:
            where.append("seq <= ?")
            params.append(int(size))
        if purpose is not None:
            where.append("purpose = ?")
            params.append(purpose)
        if until is not None:
            where.append("effective_at <= ?")
            params.append(to_us(until, "at"))
        q = ("SELECT seq, subject_id, action, scopes, effective_at, "
             f"COALESCE(expires_at, {NO_EXPIRY})" + (", purpose" if purpose is None else "") + " FROM records")
        if where:
            q += " WHERE " + " AND ".join(where)
        rows = self._conn.execute(q, params).fetchall()
        cols = ["seq", "subject_id", "purpose", "action", "scopes", "effective_at", "expires_at"]
        if not rows:
            return pd.DataFrame({c: pd.Series([], dtype=("int64" if c in ("seq", "effective_at", "expires_at")
                                                          else object)) for c in cols})
        n = len(rows)
        data = list(zip(*rows))
        del rows
        seq = np.fromiter(data[0], np.int64, n)
        eff = np.fromiter(data[4], np.int64, n)
        order: np.ndarray | None = np.lexsort((seq, eff))
        if order is not None and not (order[1:] > order[:-1]).all():  # usually already in order: skip the gathers
            seq, eff = seq[order], eff[order]
        else:
            order = None

        def obj(i: int) -> np.ndarray:
            a = np.array(data[i], dtype=object)
            return a if order is None else a[order]

        exp = np.fromiter(data[5], np.int64, n)
        return pd.DataFrame({
            "seq": seq,
            "subject_id": obj(1),
            "purpose": np.full(n, purpose, dtype=object) if purpose is not None else obj(6),
            "action": obj(2),
            "scopes": obj(3),
            "effective_at": eff,
            "expires_at": exp if order is None else exp[order],
        })

    def state_at(self, purpose: str, at: Any, subjects: Iterable[str] | None = None, *,
                 size: int | None = None) -> pd.DataFrame:
        """Consent state for ``purpose`` at time ``at``, replayed from the log.

        Index ``subject_id``; one bool column per vocabulary scope. Without ``subjects``:
        every subject with a record for the purpose effective by ``at``; with it: exactly
        those subjects (unknown ones all False). ``size`` replays only the first ``size``
        records. The stored columns are trusted here — call :meth:`verify` first (the gate does).
        """
        try:
            check_purpose(purpose)
        except UnknownTermError as err:
            raise UnknownTermError(f"field 'purpose': {err}") from None
        few = None
        if subjects is not None and not isinstance(subjects, (pd.Index, pd.Series, np.ndarray)):
            subjects = list(subjects)
            few = subjects if len(subjects) <= 500 else None  # a handful: use the subject index
        log = self.log_frame(purpose, at, size=size, subjects=few)
        return replay_state(log, to_us(at, "at"), subjects)

    # -- proofs & verification ------------------------------------------------------------
    def leaf_hashes(self, size: int | None = None) -> list[bytes]:
        """RFC 9162 leaf hashes of the first ``size`` records (all by default)."""
        q = "SELECT canonical FROM records ORDER BY seq"
        if size is not None:
            q += f" LIMIT {int(size)}"
        sha = hashlib.sha256
        return [sha(b"\x00" + (t if isinstance(t, bytes) else t.encode("utf-8"))).digest()
                for (t,) in self._conn.execute(q)]

    def inclusion_proof(self, record_id: str, tree_size: int | None = None) -> tuple[int, int, list[str]]:
        """``(leaf_index, tree_size, audit path hex)`` proving ``record_id`` is in the tree."""
        row = self._conn.execute("SELECT seq FROM records WHERE record_id = ?", (record_id,)).fetchone()
        if row is None:
            raise LedgerError(f"no record {record_id!r} in the ledger")
        n = self.size if tree_size is None else int(tree_size)
        hashes = self.leaf_hashes(n)
        proof = inclusion_proof(hashes, row[0] - 1, n)
        return row[0] - 1, n, [p.hex() for p in proof]

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[str]:
        """Hex RFC 9162 consistency proof between two tree sizes of this ledger."""
        n = self.size if new_size is None else int(new_size)
        return [p.hex() for p in consistency_proof(self.leaf_hashes(n), old_size, n)]

    def root_hex(self, size: int | None = None) -> str:
        """Recomputed RFC 9162 root of the first ``size`` records."""
        fr = Frontier()
        fr.extend(self.leaf_hashes(size))
        return fr.root().hex() if fr.size else EMPTY_ROOT.hex()

    def verify(self, public_key: Ed25519PublicKey | None = None) -> Any:
        """Full audit (hash chain, indexed columns, Merkle roots, signatures): a ``VerifyResult``."""
        from .audit import verify_ledger

        return verify_ledger(self, public_key)


def replay_state(log: pd.DataFrame, at_us: int, subjects: Iterable[str] | None = None) -> pd.DataFrame:
    """Vectorised replay of a purpose's log (rows in (effective_at, seq) order, all <= ``at_us``).

    For each (subject, scope) the last record touching the scope wins: a grant makes it
    granted unless its expiry is <= ``at_us``; a withdraw/expire makes it not granted.
    """
    scopes = list(SCOPES)
    if len(log):
        codes, uniq = pd.factorize(log["subject_id"].to_numpy(dtype=object))
        scode, suniq = pd.factorize(log["scopes"].to_numpy(dtype=object))
        all_bits = (1 << len(scopes)) - 1
        bit = {s: 1 << j for j, s in enumerate(scopes)}
        masks = np.array([sum(bit[s] for s in u.split(";")) if u else all_bits for u in suniq], dtype=np.int64)
        rec_mask = masks[scode]
        alive = (log["action"].to_numpy(dtype=object) == "grant") & (log["expires_at"].to_numpy() > at_us)
        state = np.zeros((len(uniq), len(scopes)), dtype=bool)
        for j in range(len(scopes)):
            idx = np.flatnonzero(rec_mask & (1 << j))
            if not len(idx):
                continue
            rev = codes[idx][::-1]
            u, first = np.unique(rev, return_index=True)
            state[u, j] = alive[idx[::-1][first]]
        out = pd.DataFrame(state, index=pd.Index(uniq, name="subject_id", dtype=object), columns=scopes)
    else:
        out = pd.DataFrame(np.zeros((0, len(scopes)), dtype=bool), columns=scopes,
                           index=pd.Index([], name="subject_id", dtype=object))
    if subjects is not None:
        listed = subjects if isinstance(subjects, (pd.Index, pd.Series, np.ndarray)) else list(subjects)
        wanted = pd.Index(pd.unique(np.asarray(listed, dtype=object)), name="subject_id", dtype=object)
        out = out.reindex(wanted, fill_value=False)
    return out


_INSERT_SQL = ("INSERT INTO records (seq, record_id, subject_id, purpose, action, scopes, effective_at, expires_at, "
               "canonical, prev_hash, entry_hash, layout) VALUES (?,?,?,?,?,?,?,NULLIF(?, -1),?,?,?,?)")
_NO_EXPIRY_PARAM = -1  # bound for "no expiry" (NULL in the table); valid times are >= 0


class _BatchColumns:
    """A batch's columns, converted slice by slice into the Python lists ``executemany`` binds.

    Repetitive text (purpose, action, scopes) is converted once per distinct value and the
    lists share those objects; canonical texts come from the importer's encoder a slice at
    a time (see ``importer._Encoder``), so a million-record import never holds all of them.
    """

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self.n = len(batch.record_id)

    def __len__(self) -> int:
        return self.n

    def record_ids(self) -> list[str]:
        return _pylist(self.batch.record_id)

    def rows(self, lo: int, hi: int) -> tuple[list[Any], Iterable[Any]]:
        """Rows ``lo:hi``: the columns to bind (canonical text last but the hashes) and the canonical bytes."""
        b = self.batch
        canon = b.canonical
        if isinstance(canon, (list, tuple)):
            texts = list(canon[lo:hi])
            datas: Iterable[Any] = [t.encode("utf-8") for t in texts]
            layout = _pylist(b.layout[lo:hi]) if b.layout is not None else [layout_of(t) for t in texts]
        else:
            arr, lay = canon.texts(lo, hi)
            texts, datas = _texts_and_views(arr)
            layout = lay.tolist()
        exp = b.expires_us[lo:hi]
        if isinstance(exp, (pa.Array, pa.ChunkedArray)):
            exp_l = exp.fill_null(_NO_EXPIRY_PARAM).to_numpy().tolist()
        else:
            exp_l = [_NO_EXPIRY_PARAM if x is None else x for x in exp]
        cols = [_pylist(b.record_id[lo:hi]), _pylist(b.subject_id[lo:hi]),
                _pylist(b.purpose[lo:hi], distinct=True), _pylist(b.action[lo:hi], distinct=True),
                _pylist(b.scopes[lo:hi], distinct=True), _pylist(b.effective_us[lo:hi]), exp_l, texts, layout]
        return cols, datas


def _texts_and_views(arr: pa.Array) -> tuple[list[str], list[memoryview]]:
    """Python str of each text (bound as TEXT) and a memoryview of its UTF-8 bytes (hashed, no copy)."""
    _, offsets, data = arr.buffers()[:3]
    width = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    off = np.frombuffer(offsets, dtype=width)[arr.offset : arr.offset + len(arr) + 1].tolist()
    view = memoryview(data) if data is not None else memoryview(b"")
    return arr.to_pylist(), [view[a:b] for a, b in zip(off, off[1:])]


def _pylist(col: Any, *, distinct: bool = False) -> list[Any]:
    if isinstance(col, list):
        return col
    if isinstance(col, np.ndarray):
        return col.tolist()
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if distinct and len(col):
        enc = pc.dictionary_encode(col)
        return np.array(enc.dictionary.to_pylist(), dtype=object)[enc.indices.to_numpy(zero_copy_only=False)].tolist()
    return col.to_pylist()


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


def _write_head(conn: sqlite3.Connection, key: Ed25519PrivateKey, controller: str, frontier: Frontier,
                timestamp: str) -> LedgerHead:
    root_hex = frontier.root().hex()
    sig = signing.sign(key, checkpoint_text(controller, frontier.size, root_hex, timestamp)).hex()
    fp = signing.fingerprint(key)
    conn.execute("INSERT INTO heads (size, root_hex, timestamp, signature_hex, key_fingerprint, frontier) "
                 "VALUES (?,?,?,?,?,?)", (frontier.size, root_hex, timestamp, sig, fp, frontier.to_bytes()))
    return LedgerHead(frontier.size, root_hex, sig, timestamp, controller, fp)

