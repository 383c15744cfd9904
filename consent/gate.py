"""The consent gate: the only door between a merchant's raw silo and anything that learns from it.

:func:`decide` verifies the ledger and computes, for one purpose at one point in time,
which candidate users have valid consent and which scopes each granted. :func:`apply_gate`
then removes everything else from the data: events of users without consent, events
whose scope (``fedretain.schema.EVENT_SCOPE``) the user did not grant, and user attributes
whose scope (``ATTRIBUTE_SCOPE``) was not granted (set to missing). It fails closed: any
doubt — a tampered ledger, an unknown purpose, an event type or attribute with no scope —
raises :class:`ConsentError` instead of letting data through.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from fedretain.schema import ATTRIBUTE_SCOPE, EVENT_SCOPE

from .records import format_ts, parse_ts
from .vocab import SCOPES, UnknownTermError, check_purpose

__all__ = ["ConsentError", "GateDecision", "GatedData", "decide", "apply_gate", "record_use"]


class ConsentError(Exception):
    """The gate refused (fail closed); the message says why."""


@dataclass(frozen=True, eq=False)
class GateDecision:
    """Who may be used for ``purpose`` at ``at``, and with which scopes, under which ledger head."""

    purpose: str
    at: datetime
    ledger_head: str  # hex RFC 9162 root of the verified ledger
    ledger_size: int
    grants: pd.DataFrame  # index user_id of users WITH valid consent; bool column per scope
    n_candidates: int
    n_excluded: int

    @property
    def user_ids(self) -> pd.Index:
        """Admitted users."""
        return self.grants.index

    def scope_counts(self) -> dict[str, int]:
        """Admitted users granting each scope (what a node may report upstream)."""
        return {s: int(self.grants[s].sum()) for s in SCOPES}

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary (no user ids)."""
        return {
            "purpose": self.purpose,
            "at": format_ts(self.at),
            "ledger_head": self.ledger_head,
            "ledger_size": self.ledger_size,
            "n_candidates": self.n_candidates,
            "n_admitted": len(self.grants),
            "n_excluded": self.n_excluded,
            "scope_counts": self.scope_counts(),
        }


@dataclass
class GatedData:
    """Silo data after the gate: only what the decision admits."""

    events: pd.DataFrame
    users: pd.DataFrame
    grants: pd.DataFrame
    decision: GateDecision
    dropped: dict[str, int] = field(default_factory=dict)  # counts of what the gate removed, by reason


def _positions(index: pd.Index, values: Any, what: str) -> np.ndarray:
    """Row of each value in ``index`` (-1 if absent or missing), by an Arrow hash look-up.

    Arrow compares the strings in C without materialising a Python object per row, which
    makes gating a million users take a fraction of a second.
    """
    try:
        arr = pa.array(values, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ConsentError(f"consent gate: {what} user_id values are not text ({exc})") from None
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_null(arr.type) or len(index) == 0:
        return np.full(len(arr), -1, dtype=np.int64)
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        raise ConsentError(f"consent gate: {what} user_id must be text (pseudonymous ids), got {arr.type}")
    value_set = pa.array(index.to_numpy(dtype=object), type=arr.type)
    return pc.index_in(arr, value_set=value_set).fill_null(-1).to_numpy().astype(np.int64)


def _user_index(user_ids: Iterable[Any]) -> pd.Index:
    if isinstance(user_ids, (pd.Series, pd.Index)):
        values = user_ids.to_numpy(dtype=object, na_value=None)
    else:
        values = np.asarray(list(user_ids), dtype=object)
    idx = pd.Index(pd.unique(values), dtype=object, name="user_id")
    if idx.isna().any():
        raise ConsentError("consent gate: candidate user ids contain missing values")
    kind = pd.api.types.infer_dtype(idx, skipna=False)
    if kind not in ("string", "empty"):
        raise ConsentError(f"consent gate: user ids must be text (pseudonymous ids), got {kind} values")
    return idx


def decide(ledger: Any, purpose: str, at: Any, user_ids: Iterable[Any]) -> GateDecision:
    """Verify ``ledger``, then decide consent for ``user_ids`` for ``purpose`` at ``at``.

    Raises :class:`ConsentError` (never returns a partial answer) if the purpose is
    unknown, the ledger fails verification, or anything else goes wrong.
    """
    try:
        check_purpose(purpose)
    except UnknownTermError as err:
        raise ConsentError(f"consent gate: {err}") from None
    try:
        at_dt = parse_ts(at, "at")
        candidates = _user_index(user_ids)
        result = ledger.verify()
        if not result.ok:
            raise ConsentError(f"consent gate refused: the consent ledger failed verification — {result.describe()}")
        state = ledger.state_at(purpose, at_dt, subjects=candidates, size=result.n_records)
    except ConsentError:
        raise
    except Exception as exc:  # fail closed on anything unexpected, with the cause attached
        raise ConsentError(f"consent gate failed closed: {type(exc).__name__}: {exc}") from exc
    grants = state.loc[state.to_numpy().any(axis=1)]
    grants.index = pd.Index(grants.index, dtype=object, name="user_id")
    return GateDecision(
        purpose=purpose,
        at=at_dt,
        ledger_head=result.root_hex,
        ledger_size=result.n_records,
        grants=grants,
        n_candidates=len(candidates),
        n_excluded=len(candidates) - len(grants),
    )


def apply_gate(decision: GateDecision, events: pd.DataFrame, users: pd.DataFrame) -> GatedData:
    """Keep only consented data (see the module docstring); vectorised over all rows."""
    grants = decision.grants
    missing_cols = [s for s in SCOPES if s not in grants.columns]
    if missing_cols:
        raise ConsentError(f"consent gate: decision lacks scope columns {missing_cols}")
    g = grants[list(SCOPES)].to_numpy(dtype=bool)
    scope_pos = {s: j for j, s in enumerate(SCOPES)}
    for frame, name in ((events, "events"), (users, "users")):
        if "user_id" not in frame.columns:
            raise ConsentError(f"consent gate: {name} frame has no user_id column")
    if "event" not in events.columns:
        raise ConsentError("consent gate: events frame has no event column")

    # -- events ------------------------------------------------------------------------
    ev = events["event"]
    if isinstance(ev.dtype, pd.CategoricalDtype):
        ev_codes, ev_uniq = ev.cat.codes.to_numpy(), list(ev.cat.categories)
    else:
        ev_codes, ev_uniq = pd.factorize(ev.to_numpy(dtype=object, na_value=None), use_na_sentinel=True)
    if (ev_codes < 0).any():
        raise ConsentError("consent gate: events with a missing event type cannot be assigned a consent scope")
    cat_scope = np.array([scope_pos.get(EVENT_SCOPE.get(e, ""), -1) for e in ev_uniq] + [-1], dtype=np.int64)
    ev_scope = cat_scope[ev_codes] if len(ev_codes) else np.zeros(0, dtype=np.int64)
    if (ev_scope < 0).any():
        unknown = sorted({str(ev_uniq[c]) for c in np.unique(ev_codes[ev_scope < 0])})
        raise ConsentError(f"consent gate: event type(s) {unknown} have no consent scope in fedretain.schema."
                           "EVENT_SCOPE; refusing to pass them")
    pos = _positions(grants.index, events["user_id"], "events")
    has_user = pos >= 0
    keep = has_user & g[np.where(has_user, pos, 0), ev_scope] if len(g) else np.zeros(len(ev), dtype=bool)
    out_events = events.loc[keep].reset_index(drop=True)

    # -- users -------------------------------------------------------------------------
    attrs = [c for c in users.columns if c != "user_id"]
    unknown_attrs = [c for c in attrs if ATTRIBUTE_SCOPE.get(c) not in scope_pos]
    if unknown_attrs:
        raise ConsentError(f"consent gate: user attribute(s) {unknown_attrs} have no consent scope in "
                           "fedretain.schema.ATTRIBUTE_SCOPE; refusing to pass them")
    upos = _positions(grants.index, users["user_id"], "users")
    ukeep = upos >= 0
    out_users = users.loc[ukeep].reset_index(drop=True)
    kept_pos = upos[ukeep]
    masked: dict[str, int] = {}
    for c in attrs:
        granted = g[kept_pos, scope_pos[ATTRIBUTE_SCOPE[c]]] if len(g) else np.zeros(0, dtype=bool)
        masked[c] = int((~granted & out_users[c].notna().to_numpy()).sum())
        out_users[c] = out_users[c].where(granted)

    dropped = {
        "events_in": int(len(events)),
        "events_user_not_consented": int((~has_user).sum()),
        "events_scope_not_granted": int((has_user & ~keep).sum()),
        "events_out": int(keep.sum()),
        "users_in": int(len(users)),
        "users_not_consented": int((~ukeep).sum()),
        **{f"attribute_masked:{c}": n for c, n in masked.items()},
    }
    return GatedData(events=out_events, users=out_users, grants=grants, decision=decision, dropped=dropped)


def record_use(ledger: Any, decision: GateDecision, run_id: str, round: int, feature_set: str | Iterable[str],
               user_ids: Iterable[Any] | None = None) -> int:
    """Log in the ledger's usage log that ``user_ids`` (default: every admitted user) were used.

    The entry pins the decision's purpose, time and ledger head, and the per-scope counts
    of the users actually used; a user outside the decision is an error (never logged as used
    without consent).
    """
    grants = decision.grants
    used = grants.index if user_ids is None else _user_index(user_ids)
    outside = used.difference(grants.index)
    if len(outside):
        raise ConsentError(f"record_use: {len(outside)} user(s) were not admitted by the decision "
                           f"(e.g. {outside[0]!r})")
    sub = grants.loc[used]
    counts = {s: int(sub[s].sum()) for s in SCOPES}
    return ledger.record_usage(run_id, round, decision.purpose, feature_set, counts, len(used),
                               decision.ledger_size, decision.ledger_head, decision.at, list(used))
