"""Point-in-time consent state: replaying a purpose's log to who grants which scope at time T."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from .vocab import SCOPES

__all__ = ["replay_state"]


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
