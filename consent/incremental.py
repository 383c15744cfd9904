"""Incremental consent verification: a full verify once per run, then only what was appended.

A node verifies its whole ledger (``ConsentLedger.verify``: every record, head and link) at
the first consent decision of each run and keeps that verified state — tree size, RFC 9162
root, the Merkle frontier and the hash-chain tip — in its state folder
(``verified_head.json``). Later decisions of the same run check only the records appended
since: the latest signed head verifies under the node key, the chain continues from the
kept tip, each new record's indexed columns match its signed canonical JSON, and the kept
frontier extended by the new leaves gives exactly the signed root (so the new head is an
append-only extension of the verified one). Anything else — a shrunk ledger, a changed key,
missing triggers, a broken link — fails closed.

What this trades: a record of the already-verified prefix edited in place *during* a run is
not re-read until the next run's full verify, which detects it (tested). Across runs nothing
is trusted from the state file: a new run id always means a full verify.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedretain.atomic import write_atomic

from . import signing
from .audit import VerifyResult, _Bad, _check_columns
from .merkle import Frontier

__all__ = ["STATE_FILE", "IncrementalLedger", "VerifiedHead", "verify_incremental"]

STATE_FILE = "verified_head.json"
_ZERO = bytes(32)


@dataclass(frozen=True)
class VerifiedHead:
    """The state a full verify established, extended by each incremental one."""

    run_id: str
    ledger: str
    key_fingerprint: str
    size: int
    root: str
    frontier: list[str]
    tip: str  # entry_hash of record ``size`` (hex; zeros for an empty ledger)
    full_verify_at_size: int


def _load(path: Path) -> VerifiedHead | None:
    try:
        return VerifiedHead(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None  # missing or unreadable: the next decision verifies in full


def _save(path: Path, state: VerifiedHead) -> None:
    write_atomic(path, json.dumps(asdict(state)).encode("utf-8"))


def _pub(ledger: Any, public_key: Ed25519PublicKey | None) -> Ed25519PublicKey:
    return public_key if public_key is not None else ledger.public_key


def _after_full(ledger: Any, res: VerifyResult, run_id: str) -> VerifiedHead | None:
    """The state to keep after a successful full verify (None if the latest head is not at its size)."""
    conn = ledger.connection
    row = conn.execute("SELECT size, root_hex, frontier FROM heads ORDER BY head_id DESC LIMIT 1").fetchone()
    if row is None or int(row[0]) != res.n_records or row[1] != res.root_hex:
        return None
    frontier = Frontier.from_bytes(int(row[0]), bytes(row[2]))
    if frontier.root().hex() != res.root_hex:
        return None
    tip = conn.execute("SELECT entry_hash FROM records WHERE seq = ?", (res.n_records,)).fetchone()
    return VerifiedHead(run_id, str(Path(ledger.path).resolve()), res.key_fingerprint, res.n_records, res.root_hex,
                        [n.hex() for n in frontier.nodes], bytes(tip[0]).hex() if tip else _ZERO.hex(),
                        res.n_records)


def _suffix(ledger: Any, state: VerifiedHead, pub: Ed25519PublicKey) -> tuple[VerifyResult, VerifiedHead | None]:
    """Verify the records appended since ``state``; returns the result and the extended state."""
    from .store import TRIGGERS

    fp = signing.fingerprint(pub)
    conn = ledger.connection

    def bad(reason: str, seq: int | None = None, rid: str | None = None) -> tuple[VerifyResult, None]:
        return VerifyResult(False, state.size, seq, rid, reason + " (incremental check)", 0, fp, "node key",
                            state.root), None

    if fp != state.key_fingerprint or ledger.key_fingerprint != state.key_fingerprint:
        return bad(f"the ledger key changed since the verify of this run ({state.key_fingerprint} -> "
                   f"{ledger.key_fingerprint})")
    have = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'")}
    if missing := [t for t in TRIGGERS if t not in have]:
        return bad(f"append-only triggers are missing ({', '.join(missing)})")
    own_txn = not conn.in_transaction
    if own_txn:
        conn.execute("BEGIN")  # one snapshot for the head and the records
    try:
        head = ledger.head()
        if head.size < state.size:
            return bad(f"the ledger shrank from {state.size} to {head.size} records since it was verified")
        if not head.verify(pub):
            return bad(f"the signed head of size {head.size} does not verify under the node key")
        if head.size == state.size:
            if head.root_hex != state.root:
                return bad(f"the signed head of size {head.size} has another root than the verified one")
            last = conn.execute("SELECT MAX(seq) FROM records").fetchone()[0] or 0
            if last != state.size:
                return bad(f"the ledger holds {last} records but its signed head covers {state.size}", last)
            return VerifyResult(True, state.size, None, None, "", 0, fp, "node key", state.root), state
        rows = conn.execute("SELECT seq, record_id, subject_id, purpose, action, scopes, effective_at, expires_at, "
                            "canonical, prev_hash, entry_hash FROM records WHERE seq > ? ORDER BY seq",
                            (state.size,)).fetchall()
    finally:
        if own_txn:
            conn.execute("COMMIT")
    frontier = Frontier(state.size, [bytes.fromhex(n) for n in state.frontier])
    prev, sha, leaves = bytes.fromhex(state.tip), hashlib.sha256, []
    for expect, (seq, rid, subj, purpose, action, scopes, eff, exp, text, prev_hash, entry_hash) in enumerate(
            rows, start=state.size + 1):
        if seq != expect:
            return bad(f"record seq {expect} is missing (a deleted row)", expect)
        if seq > head.size:
            return bad(f"record seq {seq} is not covered by a signed head", seq, rid)
        data = text if isinstance(text, bytes) else text.encode("utf-8")
        leaf = sha(b"\x00" + data).digest()
        if bytes(prev_hash) != prev or bytes(entry_hash) != sha(prev + leaf).digest():
            return bad(f"record seq {seq}: the hash chain is broken", seq, rid)
        try:
            _check_columns(json.loads, seq, rid, subj, purpose, action, scopes, eff, exp, data.decode("utf-8"),
                           ledger.controller)
        except _Bad as exc:
            return bad(exc.reason, exc.seq, exc.record_id)
        prev = bytes(entry_hash)
        leaves.append(leaf)
    if state.size + len(leaves) != head.size:
        return bad(f"the signed head covers {head.size} records but the ledger holds {state.size + len(leaves)}")
    frontier.extend(leaves)
    if frontier.root().hex() != head.root_hex:
        return bad(f"the records appended since size {state.size} do not give the signed root of size {head.size}")
    new = VerifiedHead(state.run_id, state.ledger, fp, head.size, head.root_hex, [n.hex() for n in frontier.nodes],
                       prev.hex(), state.full_verify_at_size)
    return VerifyResult(True, head.size, None, None, "", 0, fp, "node key", head.root_hex), new


def verify_incremental(ledger: Any, state_dir: str | os.PathLike[str], run_id: str,
                       public_key: Ed25519PublicKey | None = None) -> VerifyResult:
    """Full verify at the first call of ``run_id`` (or without usable state), else the appended suffix only."""
    path = Path(state_dir) / STATE_FILE
    state = _load(path) if run_id else None
    pub = _pub(ledger, public_key)
    if state is not None and state.run_id == run_id and state.ledger == str(Path(ledger.path).resolve()):
        res, new = _suffix(ledger, state, pub)
    else:
        res = ledger.verify(public_key)
        new = _after_full(ledger, res, run_id) if res.ok and run_id else None
    if not res.ok:
        path.unlink(missing_ok=True)  # nothing verified is kept: the next decision verifies in full
    elif new is not None and new != state:
        _save(path, new)
    return res


class IncrementalLedger:
    """A ``ConsentLedger`` whose ``verify()`` is :func:`verify_incremental` (what the gate calls)."""

    def __init__(self, ledger: Any, state_dir: str | os.PathLike[str], run_id: str) -> None:
        self._ledger, self._state_dir, self._run_id = ledger, state_dir, run_id

    def verify(self, public_key: Ed25519PublicKey | None = None) -> VerifyResult:
        return verify_incremental(self._ledger, self._state_dir, self._run_id, public_key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ledger, name)
