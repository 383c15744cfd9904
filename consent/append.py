"""Appending to the consent ledger: hash, chain and insert a validated batch, then sign the new head.

The write path of :class:`~.ledger.ConsentLedger` (``append_many``, ``import_file``): one
transaction per batch, checked against the last signed head before extending it, with
the bulk-import tactics (slices, index rebuild, rollback journal) that keep a
million-record import fast without changing a byte of what is stored.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import signing
from .heads import checkpoint_text, write_head
from .importer import Batch, ConsentImportError
from .merkle import Frontier
from .records import format_ts, layout_of
from .store import _RETIRED_INDEXES, INDEXES, ZERO_HASH, LedgerError, _rollback, _set_journal_mode, missing_triggers
from .timing import step

__all__ = ["BULK_ROWS", "insert_batch", "bulk_journal", "tip", "duplicate_error"]

BULK_ROWS = 20_000
_SLICE = 1 << 16  # rows hashed and inserted at a time


def insert_batch(conn: sqlite3.Connection, key: Ed25519PrivateKey, controller: str, size: int, batch: Batch, *,
                 source: str) -> tuple[int, int]:
    """Hash, chain and insert a validated batch, then sign the new head; one transaction.

    Returns ``(new size, records inserted)``: the count is this transaction's own, so a
    writer appending between the caller's reads and this transaction does not inflate it.

    Work goes in slices of ``_SLICE`` rows (hash a slice, insert it) so that memory
    stays flat and each slice's bytes are still in cache when SQLite copies them. A bulk
    batch (at least ``BULK_ROWS`` and at least half the ledger) rebuilds the indexes once
    at the end and, when no other connection has the file open, runs under a rollback
    journal instead of the WAL (see :func:`bulk_journal`).
    """
    cols = _BatchColumns(batch)
    n = len(cols)
    with bulk_journal(conn, n >= BULK_ROWS and n >= (size + 1) // 2):
        conn.execute("BEGIN IMMEDIATE")
        try:
            missing = missing_triggers(conn)
            if missing:
                raise LedgerError(f"append-only triggers are missing ({', '.join(missing)}): the file was "
                                  "modified outside fedretain; run `fedretain consent verify`")
            frontier, prev = tip(conn, key, controller)
            seq0 = frontier.size + 1
            rebuild = n >= BULK_ROWS and n >= seq0 // 2
            if rebuild:
                for name in (*INDEXES, *_RETIRED_INDEXES):
                    conn.execute(f"DROP INDEX IF EXISTS {name}")
            sha = hashlib.sha256
            leaf0 = sha(b"\x00")  # RFC 9162 leaf prefix, hashed once and copied per record
            for lo in range(0, n, _SLICE):
                hi = min(lo + _SLICE, n)
                with step("columns"):
                    cols_lo, datas = cols.rows(lo, hi)
                with step("hash+chain+merkle"):
                    leaves = _leaf_hashes(leaf0, datas)
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
                write_head(conn, key, controller, frontier, format_ts(datetime.now(timezone.utc)))
                conn.execute("COMMIT")
        except sqlite3.IntegrityError:
            _rollback(conn)
            raise duplicate_error(conn, cols.record_ids(), batch.rows, source) from None  # diagnosed after rollback
        except BaseException:
            _rollback(conn)
            raise
    return frontier.size, n

@contextmanager
def bulk_journal(conn: sqlite3.Connection, bulk: bool) -> Iterator[None]:
    """Run a bulk import under a rollback journal when nobody else has the file open.

    In WAL mode every page of a big import is written twice (to the WAL, then copied
    into the database by the checkpoint) and the WAL file stays as big as the import.
    A rollback journal writes new pages once and journals only the few pages that
    existed before, with the same atomicity and durability (``synchronous=FULL``): a
    crash mid-import is rolled back from the journal on the next open. Leaving WAL needs
    the only connection to the file, so this is tried without waiting; when another
    connection is open the import simply runs in WAL mode. WAL is restored afterwards
    (and on the next ``ConsentLedger.open`` should that fail).
    """
    switched = bulk and _set_journal_mode(conn, "delete")
    try:
        yield
    finally:
        if switched:
            with step("commit"):
                _set_journal_mode(conn, "wal")

def tip(conn: sqlite3.Connection, key: Ed25519PrivateKey, controller: str) -> tuple[Frontier, bytes]:
    """The last signed head's frontier and the last entry hash, checked before extending them."""
    head = conn.execute(
        "SELECT size, root_hex, timestamp, signature_hex, frontier FROM heads ORDER BY head_id DESC LIMIT 1"
    ).fetchone()
    if head is None:
        raise LedgerError("the ledger has no signed head; run `fedretain consent verify`")
    size, root_hex, ts, sig_hex, blob = head
    try:
        frontier = Frontier.from_bytes(size, blob)
        ok = frontier.root().hex() == root_hex and signing.verify_signature(
            key.public_key(), bytes.fromhex(sig_hex), checkpoint_text(controller, size, root_hex, ts))
    except ValueError:
        ok = False
    if not ok:
        raise LedgerError("the latest signed head does not verify; refusing to append "
                          "(run `fedretain consent verify`)")
    last = conn.execute("SELECT seq, entry_hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
    n = 0 if last is None else last[0]
    if n != size:
        raise LedgerError(f"the ledger holds {n} records but its latest signed head covers {size}; refusing "
                          "to append (run `fedretain consent verify`)")
    return frontier, (ZERO_HASH if last is None else bytes(last[1]))

def duplicate_error(conn: sqlite3.Connection, ids: list[str], rows: np.ndarray, source: str) -> ConsentImportError:
    existing: set[str] = set()
    for i in range(0, len(ids), 500):
        chunk = ids[i : i + 500]
        q = f"SELECT record_id FROM records WHERE record_id IN ({','.join('?' * len(chunk))})"
        existing.update(r[0] for r in conn.execute(q, chunk))
    errs = [(int(rows[i]), "record_id", f"record_id {rid!r} is already in the ledger "
             "(this consent event was imported before)") for i, rid in enumerate(ids) if rid in existing]
    if not errs:
        errs = [(0, "record_id", "duplicate record ids")]
    return ConsentImportError(source, errs[:100], len(errs))


_INSERT_SQL = ("INSERT INTO records (seq, record_id, subject_id, purpose, action, scopes, effective_at, expires_at, "
               "canonical, prev_hash, entry_hash, layout) VALUES (?,?,?,?,?,?,?,NULLIF(?, -1),?,?,?,?)")
_NO_EXPIRY_PARAM = -1  # bound for "no expiry" (NULL in the table); valid times are >= 0


class _BatchColumns:
    """A batch's columns, converted slice by slice into the Python lists ``executemany`` binds.

    Repetitive text (purpose, action, scopes) is converted once per distinct value and the
    lists share those objects; canonical texts come from the importer's encoder a slice at
    a time (see ``records._Encoder``), so a million-record import never holds all of them.
    """

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self.n = len(batch.record_id)

    def __len__(self) -> int:
        return self.n

    def record_ids(self) -> list[str]:
        return _pylist(self.batch.record_id)

    def rows(self, lo: int, hi: int) -> tuple[list[Any], list[bytes]]:
        """Rows ``lo:hi``: the columns to bind (canonical text last but the hashes) and the canonical bytes."""
        b = self.batch
        canon = b.canonical
        if isinstance(canon, (list, tuple)):
            texts = list(canon[lo:hi])
            layout = _pylist(b.layout[lo:hi]) if b.layout is not None else [layout_of(t) for t in texts]
            datas = [t.encode("utf-8") for t in texts]
        else:
            arr, lay = canon.texts(lo, hi)
            texts = _pylist(arr)
            layout = lay.tolist()
            datas = _pylist(arr.cast(pa.large_binary()))  # the same UTF-8 bytes, copied once by Arrow
        exp = b.expires_us[lo:hi]
        if isinstance(exp, (pa.Array, pa.ChunkedArray)):
            exp_l = exp.fill_null(_NO_EXPIRY_PARAM).to_numpy().tolist()
        else:
            exp_l = [_NO_EXPIRY_PARAM if x is None else x for x in exp]
        cols = [_pylist(b.record_id[lo:hi]), _pylist(b.subject_id[lo:hi]),
                _pylist(b.purpose[lo:hi], distinct=True), _pylist(b.action[lo:hi], distinct=True),
                _pylist(b.scopes[lo:hi], distinct=True), _pylist(b.effective_us[lo:hi]), exp_l, texts, layout]
        return cols, datas


def _leaf_hashes(leaf0: Any, datas: list[bytes]) -> list[bytes]:
    """RFC 9162 leaf hashes ``SHA-256(0x00 || data)``: a copy of the prefix's state per record, no concatenation."""
    out: list[bytes] = []
    append = out.append
    for d in datas:
        h = leaf0.copy()
        h.update(d)
        append(h.digest())
    return out


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
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_large_binary(col.type):
        return col.to_numpy(zero_copy_only=False).tolist()  # str/bytes objects; faster than to_pylist
    return col.to_pylist()
