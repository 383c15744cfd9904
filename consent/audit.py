"""Ledger verification: recompute everything the ledger claims and name the first bad record.

Checks, in one streaming pass over the records (so memory stays flat for millions):

1. the verifying key matches the key the ledger was created with;
2. every signed head's Ed25519 signature, its frontier and non-decreasing sizes;
3. ``seq`` is contiguous from 1 (a gap is a deleted row);
4. every record is covered by a signed head (a row past the last head was inserted by hand);
5. the hash chain: ``prev_hash`` links to the previous row and ``entry_hash = SHA-256(prev ||
   leaf)`` (an edited row breaks its own entry hash; a moved/inserted/deleted row breaks the
   link, and a look-up of the stored link tells which);
6. the indexed columns re-derived from the canonical JSON (an edit of ``scopes`` alone);
7. the RFC 9162 root at every signed size (catches an edit whose chain was recomputed);
8. ledger heads pinned by the usage log (catches a rollback of heads and records together);
9. the append-only triggers are present.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from . import signing
from .audit_fast import fast_records as _fast_records
from .heads import checkpoint_text
from .merkle import EMPTY_ROOT, Frontier
from .store import TRIGGERS, ZERO_HASH
from .timing import gc_paused, step

if TYPE_CHECKING:
    from .ledger import ConsentLedger

__all__ = ["VerifyResult", "verify_ledger"]

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify_ledger`; when not ``ok``, names the first bad record if there is one."""

    ok: bool
    n_records: int
    first_bad_seq: int | None
    first_bad_record_id: str | None
    reason: str
    n_heads: int = 0
    key_fingerprint: str = ""
    key_source: str = ""  # "pinned node key" | "node key" | "given public key" | "ledger (self-declared)"
    root_hex: str = ""

    def describe(self) -> str:
        """One human sentence."""
        if self.ok:
            return (f"ledger OK: {self.n_records} records, {self.n_heads} signed heads, root {self.root_hex[:16]}…, "
                    f"key {self.key_fingerprint} ({self.key_source})")
        where = ""
        if self.first_bad_seq is not None:
            where = f" — first bad record: seq {self.first_bad_seq}"
            if self.first_bad_record_id:
                where += f" (record_id {self.first_bad_record_id})"
        return f"ledger TAMPERED: {self.reason}{where}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _us(text: Any) -> int | None:
    if text is None:
        return None
    d = datetime.fromisoformat(text) - _EPOCH
    return (d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds


@dataclass
class _Progress:
    """How far verification got: records checked, signed heads checked, the root recomputed."""

    n: int = 0
    heads: int = 0
    root: str = ""


class _Bad(Exception):
    def __init__(self, seq: int | None, record_id: str | None, reason: str) -> None:
        super().__init__(reason)
        self.seq, self.record_id, self.reason = seq, record_id, reason


def verify_ledger(ledger: ConsentLedger, public_key: Ed25519PublicKey | None = None) -> VerifyResult:
    """Verify ``ledger`` against ``public_key`` (default: its pinned key, else the node key it was opened with).

    Without either, the public key recorded in the ledger itself is used and
    ``key_source`` says so: that detects edits but not a wholesale re-signing.
    """
    if public_key is not None:
        pub, source = public_key, "given public key"
    elif ledger.pinned_key is not None:
        pub, source = ledger.pinned_key, "pinned node key"
    elif ledger.has_signing_key:
        pub, source = ledger.public_key, "node key"
    else:
        pub, source = ledger.public_key, "ledger (self-declared)"
    fp = signing.fingerprint(pub)
    state = _Progress()

    def result(bad: _Bad | None) -> VerifyResult:
        if bad is None:
            return VerifyResult(True, state.n, None, None, "", state.heads, fp, source, state.root)
        return VerifyResult(False, state.n, bad.seq, bad.record_id, bad.reason, state.heads, fp, source,
                            state.root)

    conn = ledger.connection
    own_txn = not conn.in_transaction
    if own_txn:
        conn.execute("BEGIN")  # one snapshot for every query below (WAL readers never block writers)
    try:
        with gc_paused():
            _check(ledger, pub, fp, state)
    except _Bad as bad:
        return result(bad)
    finally:
        if own_txn:
            conn.execute("COMMIT")
    return result(None)


def _check(ledger: ConsentLedger, pub: Ed25519PublicKey, fp: str, state: _Progress) -> None:

    conn = ledger.connection
    controller = ledger.controller
    if fp != ledger.key_fingerprint:
        raise _Bad(None, None, f"the ledger was created with key {ledger.key_fingerprint}, not {fp}")
    try:
        meta_fp = signing.fingerprint(signing.load_public_key(ledger.public_key_pem))
    except signing.KeyFileError:
        meta_fp = ""
    if meta_fp != ledger.key_fingerprint:
        raise _Bad(None, None, "the public key recorded in the ledger does not match its recorded fingerprint")

    # -- signed heads ------------------------------------------------------------------------
    heads = conn.execute(
        "SELECT head_id, size, root_hex, timestamp, signature_hex, key_fingerprint, frontier FROM heads "
        "ORDER BY head_id").fetchall()
    state.heads = len(heads)
    if not heads:
        raise _Bad(None, None, "the ledger has no signed head")
    checkpoints: dict[int, list[tuple[str, str]]] = {}  # size -> [(root_hex, label)]
    last_size = -1
    for head_id, size, root_hex, ts, sig_hex, head_fp, blob in heads:
        label = f"signed head #{head_id} (size {size}, {ts})"
        try:
            sig = bytes.fromhex(sig_hex)
        except (ValueError, TypeError):
            sig = b""
        if head_fp != fp or not signing.verify_signature(pub, sig, checkpoint_text(controller, size, root_hex, ts)):
            raise _Bad(None, None, f"{label}: the Ed25519 signature does not verify under {fp}")
        if size < last_size:
            raise _Bad(size + 1, None, f"{label} is smaller than an earlier head ({last_size}): history was cut")
        last_size = size
        try:
            folded = Frontier.from_bytes(size, bytes(blob)).root().hex()
        except (ValueError, TypeError):
            folded = ""
        if folded != root_hex:
            raise _Bad(None, None, f"{label}: its stored frontier does not fold to its signed root")
        checkpoints.setdefault(size, []).append((root_hex, label))
    if 0 in checkpoints and any(r != EMPTY_ROOT.hex() for r, _ in checkpoints[0]):
        raise _Bad(None, None, "a size-0 signed head has a non-empty root")
    max_head = last_size
    for u_id, run_id, size, root in conn.execute(
            "SELECT usage_id, run_id, ledger_size, ledger_root FROM usage ORDER BY usage_id"):
        checkpoints.setdefault(size, []).append((root, f"usage #{u_id} of run {run_id!r} (ledger size {size})"))

    with step("verify: records (fast pass)"):
        fast = _fast_records(conn, controller, checkpoints, max_head)
    if fast is not None:
        state.n, state.root = fast
    else:
        with step("verify: records (exact pass)"):
            _exact_records(conn, controller, checkpoints, max_head, state)
    have = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'")}
    missing = [t for t in TRIGGERS if t not in have]
    if missing:
        raise _Bad(None, None, f"append-only triggers were removed ({', '.join(missing)}); the records still "
                               "verify, but the file was modified outside fedretain")


def _exact_records(conn: Any, controller: str, checkpoints: dict[int, list[tuple[str, str]]], max_head: int,
                   state: _Progress) -> None:
    """Check every record one by one, in order, and raise :class:`_Bad` naming the first bad one.

    The reference implementation: slow (a JSON parse per record) but simple enough to
    trust, and the one that explains a failure. :func:`_fast_records` must never accept a
    ledger this rejects.
    """

    sha = hashlib.sha256
    decode = json.JSONDecoder().decode
    frontier = Frontier()
    pending: list[bytes] = []  # leaf hashes not yet folded into the frontier
    prev = ZERO_HASH
    expected = 1
    good_size = 0  # largest checkpoint size whose root matched
    head_mismatch: _Bad | None = None
    mismatch_end = 0
    record_bad: _Bad | None = None
    cur = conn.execute("SELECT seq, record_id, subject_id, purpose, action, scopes, effective_at, expires_at, "
                       "canonical, prev_hash, entry_hash FROM records ORDER BY seq")
    while record_bad is None:
        chunk = cur.fetchmany(20_000)
        if not chunk:
            break
        for seq, rid, subj, purpose, action, scopes, eff, exp, canon, sprev, sentry in chunk:
            try:
                if seq != expected:
                    if isinstance(seq, int) and seq > expected:
                        raise _Bad(expected, None, f"record seq {expected} is missing (deleted); the next record "
                                                    f"present is seq {seq} (record_id {rid})")
                    raise _Bad(seq, rid, f"unexpected seq {seq!r} (expected {expected})")
                if seq > max_head:
                    raise _Bad(seq, rid, f"record seq {seq} is not covered by any signed head (the latest covers "
                                         f"{max_head}): it was inserted outside fedretain")
                if isinstance(canon, str):
                    text, data = canon, canon.encode("utf-8")
                else:  # a non-text value was written into the column by hand
                    data = bytes(canon) if isinstance(canon, (bytes, memoryview)) else str(canon).encode()
                    text = data.decode("utf-8", "replace")
                lh = sha(b"\x00" + data).digest()
                if sprev != prev:
                    raise _chain_break(conn, seq, rid, sprev if isinstance(sprev, bytes) else b"", ZERO_HASH)
                if sentry != sha(prev + lh).digest():
                    raise _Bad(seq, rid, f"record seq {seq}: its content no longer matches its entry hash "
                                         "(the record was edited after it was written)")
                _check_columns(decode, seq, rid, subj, purpose, action, scopes, eff, exp, text, controller)
            except _Bad as bad:
                record_bad = bad
                break
            pending.append(lh)
            prev = sentry
            expected += 1
            if seq in checkpoints:
                frontier.extend(pending)
                pending = []
                root_now = frontier.root().hex()
                for root_hex, label in checkpoints[seq]:
                    if head_mismatch is None and root_now != root_hex:
                        mismatch_end = seq
                        head_mismatch = _Bad(good_size + 1, None,
                                             f"{label}: the records no longer hash to its root — records seq "
                                             f"{good_size + 1}..{seq} were altered and the hash chain recomputed")
                if head_mismatch is None:
                    good_size = seq
    frontier.extend(pending)
    n = expected - 1
    state.n = n
    state.root = frontier.root().hex()
    if head_mismatch is not None and head_mismatch.seq is not None:
        # a precise record-level finding inside the mismatching range beats the range itself
        if record_bad is None or record_bad.seq is None or record_bad.seq > mismatch_end:
            rid = conn.execute("SELECT record_id FROM records WHERE seq = ?", (head_mismatch.seq,)).fetchone()
            raise _Bad(head_mismatch.seq, rid[0] if rid else None, head_mismatch.reason)
    if record_bad is not None:
        raise record_bad
    beyond = sorted(s for s in checkpoints if s > n)
    if beyond:
        _, label = checkpoints[beyond[-1]][0]
        raise _Bad(n + 1, None, f"{label} covers {beyond[-1]} records but only {n} are present: records seq "
                                f"{n + 1}..{beyond[-1]} were deleted")


def _check_columns(decode: Any, seq: int, rid: Any, subj: Any, purpose: Any, action: Any, scopes: Any, eff: Any,
                   exp: Any, text: str, controller: str) -> None:
    """Re-derive the indexed columns from the canonical JSON and compare."""
    try:
        d = decode(text)
        d_eff = _us(d["effective_at"])
        d_exp = _us(d["expires_at"])
        d_scopes = ";".join(d["scopes"])
        ok = (rid == d["record_id"] and subj == d["subject_id"] and purpose == d["purpose"]
              and action == d["action"] and scopes == d_scopes and eff == d_eff and exp == d_exp
              and d["controller"] == controller)
    except (ValueError, KeyError, TypeError) as exc:
        raise _Bad(seq, rid if isinstance(rid, str) else None,
                   f"record seq {seq}: canonical JSON is unreadable ({exc})") from None
    if ok:
        return
    derived = {"record_id": d["record_id"], "subject_id": d["subject_id"], "purpose": d["purpose"],
               "action": d["action"], "scopes": d_scopes, "effective_at": d_eff, "expires_at": d_exp}
    stored = {"record_id": rid, "subject_id": subj, "purpose": purpose, "action": action, "scopes": scopes,
              "effective_at": eff, "expires_at": exp}
    for name, value in derived.items():
        if stored[name] != value:
            raise _Bad(seq, derived["record_id"], f"record seq {seq}: indexed column {name!r} is {stored[name]!r} "
                                                  f"but the signed record says {value!r}")
    raise _Bad(seq, derived["record_id"], f"record seq {seq}: controller {d['controller']!r} is not the ledger's "
                                          f"{controller!r}")


def _chain_break(conn: Any, seq: int, rid: Any, stored_prev: bytes, zero: bytes) -> _Bad:
    """Explain a broken ``prev_hash`` link at ``seq`` by finding which row it points to."""
    rid = rid if isinstance(rid, str) else None
    if stored_prev == zero:
        j: int | None = 0
    else:
        row = conn.execute("SELECT seq FROM records WHERE entry_hash = ?", (stored_prev,)).fetchone()
        j = None if row is None else int(row[0])
    if j is None:
        return _Bad(seq, rid, f"record seq {seq}: the record it was chained to is missing (a record before it "
                              "was deleted and the rest renumbered)")
    if j < seq - 1:
        first = conn.execute("SELECT record_id FROM records WHERE seq = ?", (j + 1,)).fetchone()
        span = f"seq {j + 1}" if j + 1 == seq - 1 else f"seqs {j + 1}..{seq - 1}"
        return _Bad(j + 1, first[0] if first else None,
                    f"{span} {'is' if j + 1 == seq - 1 else 'are'} not part of the hash chain (record seq {seq} "
                    f"was chained to seq {j}): forged record(s) inserted")
    return _Bad(seq, rid, f"record seq {seq} was chained after seq {j}, not seq {seq - 1}: records were "
                          "reordered (swapped)")
