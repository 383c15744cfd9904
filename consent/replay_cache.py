"""Incremental replay: the replay columns of a verified prefix kept in memory across rounds.

Why: a node decides every round, and the ledger only grows between rounds (append-only), so
re-reading and re-factorizing every record each round (seconds at 1M events) is wasted work.
This module keeps, per ledger file and purpose, the replay columns of records ``seq <= N`` in
replay order ``(effective_at, seq)``, subject ids already as int codes. The next call reads
only ``seq > N`` (the appended suffix), merges it into the order (a back-dated record lands
anywhere: a searchsorted insert, ties after the cached rows since their seq is larger), cuts
``effective_at <= at`` as a prefix of that order, and replays on int arrays.

The cache lives in the process (the node opens its ledger anew every round), keyed by the
file's resolved path and purpose. It is used only if the file is still the same one and still
extends the cached prefix: same device/inode, and the stored ``entry_hash`` of record N (the
hash-chain tip, which commits to every record up to N) equals the one seen when caching. A
replaced, rolled-back or shrunk file — or a request for fewer records than cached — drops the
entry and replays from the file. Like :meth:`ConsentLedger.state_at` itself, it trusts the
stored columns of what the verifier has checked (the gate verifies first).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .replay import log_frame, scope_bits
from .vocab import SCOPES

__all__ = ["MAX_ENTRIES", "cached_state", "clear"]

MAX_ENTRIES = 8  # (file, purpose) pairs kept; least recently used dropped first

_LOCK = threading.Lock()
_CACHE: OrderedDict[tuple[str, str], _Entry] = OrderedDict()


@dataclass
class _Entry:
    """Replay columns of records ``seq <= size`` of one purpose, in (effective_at, seq) order."""

    dev: int
    ino: int
    size: int
    tip: bytes  # entry_hash of record ``size`` (empty for size 0)
    eff: np.ndarray  # int64 µs
    exp: np.ndarray  # int64 µs (NO_EXPIRY = none)
    code: np.ndarray  # int64 subject code
    bits: np.ndarray  # int64 scope bit mask
    grant: np.ndarray  # bool
    uniq: np.ndarray  # object: code -> subject id
    lookup: dict[str, int]  # subject id -> code
    asked: np.ndarray | None = None  # the last ``subjects`` asked for (a node asks for the same every round)
    asked_codes: np.ndarray | None = None  # their codes (-1: no record then)


def clear() -> None:
    """Forget every cached prefix (tests; a node never needs it)."""
    with _LOCK:
        _CACHE.clear()


def _tip(conn: sqlite3.Connection, size: int) -> bytes | None:
    if size == 0:
        return b""
    row = conn.execute("SELECT entry_hash FROM records WHERE seq = ?", (size,)).fetchone()
    return None if row is None else bytes(row[0])


def _empty(dev: int, ino: int) -> _Entry:
    z = np.zeros(0, dtype=np.int64)
    return _Entry(dev, ino, 0, b"", z, z, z, z, np.zeros(0, dtype=bool), np.zeros(0, dtype=object), {})


def _extend(conn: sqlite3.Connection, e: _Entry, purpose: str, size: int) -> None:
    """Append records ``e.size < seq <= size`` of ``purpose`` to ``e`` in replay order."""
    log = log_frame(conn, purpose, size=size, after=e.size)
    if len(log):
        ids = log["subject_id"].to_numpy(dtype=object)
        lookup = e.lookup
        new: list[str] = []
        code = np.empty(len(ids), dtype=np.int64)
        for i, s in enumerate(ids):
            c = lookup.get(s)
            if c is None:
                c = lookup[s] = len(e.uniq) + len(new)
                new.append(s)
            code[i] = c
        if new:
            e.uniq = np.concatenate([e.uniq, np.array(new, dtype=object)])
        eff = log["effective_at"].to_numpy(dtype=np.int64)
        pos = np.searchsorted(e.eff, eff, side="right")  # equal times: after the cached (smaller seq) rows
        e.eff = np.insert(e.eff, pos, eff)
        e.exp = np.insert(e.exp, pos, log["expires_at"].to_numpy(dtype=np.int64))
        e.code = np.insert(e.code, pos, code)
        e.bits = np.insert(e.bits, pos, scope_bits(log["scopes"].to_numpy(dtype=object)))
        e.grant = np.insert(e.grant, pos, log["action"].to_numpy(dtype=object) == "grant")
    e.size = size


def _replay(e: _Entry, at_us: int, subjects: Iterable[str] | None) -> pd.DataFrame:
    """:func:`.replay.replay_state` on the cached int columns (same rows, same index order)."""
    cut = int(np.searchsorted(e.eff, at_us, side="right"))  # effective_at <= at: a prefix of the order
    code, bits = e.code[:cut], e.bits[:cut]
    alive = e.grant[:cut] & (e.exp[:cut] > at_us)
    n_subj = len(e.uniq)
    state = np.zeros((n_subj + 1, len(SCOPES)), dtype=bool)  # last row: subjects without a record
    for j in range(len(SCOPES)):
        idx = np.flatnonzero(bits & (1 << j))
        if not len(idx):
            continue
        last = np.full(n_subj, -1, dtype=np.int64)
        np.maximum.at(last, code[idx], idx)  # the last record touching scope j wins
        has = np.flatnonzero(last >= 0)
        state[has, j] = alive[last[has]]
    if subjects is None:  # every subject with a record by ``at``, in order of first appearance
        first = np.full(n_subj, cut, dtype=np.int64)
        np.minimum.at(first, code, np.arange(cut, dtype=np.int64))
        present = np.flatnonzero(first < cut)
        rows = present[np.argsort(first[present], kind="stable")]
        index = pd.Index(e.uniq[rows], name="subject_id", dtype=object)
    else:
        listed = subjects if isinstance(subjects, (pd.Index, pd.Series, np.ndarray)) else list(subjects)
        wanted = pd.unique(np.asarray(listed, dtype=object))
        get = e.lookup.get
        if e.asked is not None and e.asked_codes is not None and np.array_equal(e.asked, wanted):
            codes = e.asked_codes.copy()  # the same subjects again: look up only those without a code
            miss = np.flatnonzero(codes < 0)
            codes[miss] = np.fromiter((get(s, -1) for s in wanted[miss]), dtype=np.int64, count=len(miss))
        else:
            codes = np.fromiter((get(s, -1) for s in wanted), dtype=np.int64, count=len(wanted))
        e.asked, e.asked_codes = wanted, codes
        rows = np.where(codes < 0, n_subj, codes)
        index = pd.Index(wanted, name="subject_id", dtype=object)
    return pd.DataFrame(state[rows], index=index, columns=list(SCOPES))


def cached_state(conn: sqlite3.Connection, path: str | os.PathLike[str], purpose: str, at_us: int,
                 size: int | None, subjects: Iterable[str] | None = None) -> pd.DataFrame:
    """Consent state of ``purpose`` at ``at_us`` over records ``seq <= size`` (all if None), cached."""
    own_txn = not conn.in_transaction
    if own_txn:
        conn.execute("BEGIN")  # one snapshot for the tip check and the suffix
    try:
        if size is None:
            size = int(conn.execute("SELECT MAX(seq) FROM records").fetchone()[0] or 0)
        key = (str(Path(path).resolve()), purpose)
        st = os.stat(key[0])
        with _LOCK:
            e = _CACHE.pop(key, None)
            if e is not None and (e.dev != st.st_dev or e.ino != st.st_ino or e.size > size
                                  or _tip(conn, e.size) != e.tip):
                e = None  # another file, a rollback or an older request: replay from the file
            if e is None:
                e = _empty(st.st_dev, st.st_ino)
            tip = _tip(conn, size)
            if tip is None:  # the ledger holds fewer records than asked for: read what is there, keep nothing
                _extend(conn, e, purpose, size)
                return _replay(e, at_us, subjects)
            _extend(conn, e, purpose, size)
            e.tip = tip
            out = _replay(e, at_us, subjects)
            _CACHE[key] = e  # only a fully built entry is kept (an error above leaves none)
            while len(_CACHE) > MAX_ENTRIES:
                _CACHE.popitem(last=False)
            return out
    finally:
        if own_txn:
            conn.execute("COMMIT")
