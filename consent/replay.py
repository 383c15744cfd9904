"""Point-in-time consent state: reading the log in replay order and replaying it to who grants what at T."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .records import to_us
from .store import NO_EXPIRY
from .vocab import SCOPES

__all__ = ["log_frame", "replay_state", "scope_bits"]


def scope_bits(scopes: np.ndarray) -> np.ndarray:
    """Each record's scopes text (``a;b``) as a bit mask over :data:`SCOPES` (empty text = every scope)."""
    scode, suniq = pd.factorize(scopes)
    all_bits = (1 << len(SCOPES)) - 1
    bit = {s: 1 << j for j, s in enumerate(SCOPES)}
    masks = np.array([sum(bit[s] for s in u.split(";")) if u else all_bits for u in suniq], dtype=np.int64)
    return masks[scode] if len(scode) else np.zeros(0, dtype=np.int64)


def replay_state(log: pd.DataFrame, at_us: int, subjects: Iterable[str] | None = None) -> pd.DataFrame:
    """Vectorised replay of a purpose's log (rows in (effective_at, seq) order, all <= ``at_us``).

    For each (subject, scope) the last record touching the scope wins: a grant makes it
    granted unless its expiry is <= ``at_us``; a withdraw/expire makes it not granted.
    """
    scopes = list(SCOPES)
    if len(log):
        codes, uniq = pd.factorize(log["subject_id"].to_numpy(dtype=object))
        rec_mask = scope_bits(log["scopes"].to_numpy(dtype=object))
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


def log_frame(conn: sqlite3.Connection, purpose: str | None = None, until: Any = None, *, size: int | None = None,
              subjects: Sequence[str] | None = None, after: int | None = None) -> pd.DataFrame:
    """The log's replay columns in replay order (effective_at, seq); ``expires_at`` max = none.

    ``size`` limits the log to its first ``size`` records (a verified prefix);
    ``subjects`` to a few subjects (looked up through the subject index); ``after`` to the
    records with ``seq > after`` (what was appended since a cached prefix). The order is
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
    if after is not None:
        where.append("seq > ?")
        params.append(int(after))
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
    rows = conn.execute(q, params).fetchall()
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
