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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import signing
from .append import BULK_ROWS, insert_batch
from .gate import ConsentError
from .heads import LedgerHead, checkpoint_text, write_head
from .identity import NodePin, check_pinned
from .importer import Batch, prepare_records, prepare_table, read_arrow
from .merkle import EMPTY_ROOT, Frontier, consistency_proof, inclusion_proof
from .records import ConsentRecord, format_ts, to_us
from .replay import log_frame, replay_state
from .replay_cache import cached_state
from .store import (
    FORMAT,
    INDEXES,
    NO_EXPIRY,
    PAGE_SIZE,
    PROTECTED_TABLES,
    SCHEMA,
    SCHEMA_VERSION,
    TRIGGERS,
    ZERO_HASH,
    LedgerError,
    _connect,
    _set_journal_mode,
    _statements,
    _trigger_sql,
    migrate,
    storage_error,
    storage_errors,
)
from .timing import gc_paused, step
from .usage import USAGE_SCHEMA, UsageRecord, record_usage, usages
from .vocab import VOCAB_VERSION, UnknownTermError, check_purpose

# names other modules and tests import from here (the ledger's public face); the plumbing lives in
# .store (file, schema, errors), .heads (signed heads), .append (the write path), .replay (state at T)
__all__ = ["ConsentLedger", "LedgerHead", "LedgerError", "UsageWriteError", "checkpoint_text", "FORMAT", "replay_state",
           "BULK_ROWS", "PROTECTED_TABLES", "TRIGGERS", "ZERO_HASH", "NO_EXPIRY", "storage_error", "storage_errors",
           "_trigger_sql"]

class UsageWriteError(LedgerError, ConsentError):
    """A data use could not be recorded: a consent failure for the node (it must not reply)."""


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
            if key is not None:  # a writer upgrades an older file (a reader leaves it as it is)
                migrate(conn, path)
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
            write_head(conn, key, controller, Frontier(), now)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
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

    def _insert(self, batch: Batch, *, source: str) -> tuple[int, int]:
        """Hash, chain and insert a validated batch and sign the new head (see :func:`.append.insert_batch`)."""
        return insert_batch(self._conn, self._require_key(), self.controller, self.size, batch, source=source)

    def _require_key(self) -> Ed25519PrivateKey:
        if self._key is None:
            raise LedgerError("the ledger was opened without the node key; writing needs it to sign heads")
        return self._key

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
        """The log's replay columns in replay order (see :func:`.replay.log_frame`)."""
        return log_frame(self._conn, purpose, until, size=size, subjects=subjects)

    def state_at(self, purpose: str, at: Any, subjects: Iterable[str] | None = None, *,
                 size: int | None = None) -> pd.DataFrame:
        """Consent state for ``purpose`` at time ``at``, replayed from the log.

        Index ``subject_id``; one bool column per vocabulary scope. Without ``subjects``:
        every subject with a record for the purpose effective by ``at``; with it: exactly
        those subjects (unknown ones all False). ``size`` replays only the first ``size``
        records. The stored columns are trusted here — call :meth:`verify` first (the gate does).
        Without a few ``subjects`` the replay columns of the records read before are kept in
        memory and only the appended ones are read (:mod:`.replay_cache`).
        """
        try:
            check_purpose(purpose)
        except UnknownTermError as err:
            raise UnknownTermError(f"field 'purpose': {err}") from None
        few = None
        if subjects is not None and not isinstance(subjects, (pd.Index, pd.Series, np.ndarray)):
            subjects = list(subjects)
            few = subjects if len(subjects) <= 500 else None  # a handful: use the subject index
        if few is None:  # all subjects, or many: the replay columns kept across rounds (.replay_cache)
            return cached_state(self._conn, self.path, purpose, to_us(at, "at"), size, subjects)
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


