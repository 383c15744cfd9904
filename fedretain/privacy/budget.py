"""The node's privacy-budget ledger: one lifetime (ε, δ) cap per node, drawn by every purpose.

Every DP run (training of any purpose) and every analytics query a merchant node answers
*reserves* its whole (ε, δ) before the first step, then appends one spend record per round
(ε spent so far and the accountant's history, so the accountant survives a node restart).

Composition is **basic composition across purposes**: the node's committed budget is the sum
of the ε (and of the δ) reserved by every run and query of every purpose, and it must stay
within the **node-wide cap**. A purpose may also have a **sub-limit** (Σ of its own runs). A run
can never spend more than it reserved (``record_spend`` refuses), so the sums are sound upper
bounds however each run was accounted (RDP or PRV, local or aggregate mode). A run that
stopped early still counts with its full reservation.

A new run is refused, with nothing written, when the reservation would pass the node cap or
its purpose's sub-limit, or when no cap is set (fail closed). Setting or changing a cap is an
event row signed by the node key; raising one needs a reason. Tamper evidence (hash chain,
signed Merkle heads, verification on open and on every reservation) is :mod:`.budget_store`.
"""

from __future__ import annotations

import math
import sqlite3
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fedretain.consent import signing
from fedretain.consent.ledger import LedgerHead
from fedretain.consent.vocab import check_purpose
from fedretain.privacy.accountant import Accountant, PrivacyError
from fedretain.privacy.budget_records import (
    Budget,
    BudgetExceeded,
    RunPlan,
    Spend,
    _raises,
)
from fedretain.privacy.budget_store import FORMAT, NODE, BudgetHead, Store, now

LEDGER_FILE = "privacy.db"
KEY_FILE = "node_key.pem"  # the node's signing key, beside the ledger (as NodeConfig.for_silo places it)
EPS_SLACK = 1e-9  # float noise allowed when comparing ε sums
__all__ = [
    "EPS_SLACK",
    "FORMAT",
    "LEDGER_FILE",
    "NODE",
    "Budget",
    "BudgetExceeded",
    "BudgetHead",
    "BudgetLedger",
    "RunPlan",
    "Spend",
    "ledger_path",
]


def ledger_path(state_dir: str | Path) -> Path:
    """Where a node keeps its privacy ledger: ``<state_dir>/privacy.db`` (next to consent.db)."""
    return Path(state_dir) / LEDGER_FILE


_now = now


_BUDGET_COLS = ("purpose, epsilon, delta, set_at, note, previous_epsilon, previous_delta, key_fingerprint, "
                "signature_hex")
_RUN_COLS = ("run_id, purpose, mode, accountant, epsilon, delta, noise_multiplier, sample_rate, planned_steps, "
             "n_records, reserved_at")
_SPEND_COLS = "seq, run_id, purpose, round, steps, total_steps, epsilon, accountant_state, at"


class BudgetLedger:
    """One SQLite file per merchant node; see the module docstring for the rules."""

    def __init__(self, path: Path, store: Store) -> None:
        self.path = path
        self._store = store
        self._conn = store.conn

    # -- opening -----------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, *, create: bool = False, key_path: str | Path | None = None,
             controller: str | None = None) -> BudgetLedger:
        """Open (``create``: or make) the ledger, verified against the node key; refuse anything that fails.

        ``key_path`` defaults to ``node_key.pem`` beside the ledger (``SILO/.node``); with ``create``
        a missing key is generated there, as the consent ledger does. ``controller`` (the merchant
        id) names the ledger in its signed heads; it is fixed when the file is created.
        """
        path = Path(path)
        key_file = Path(key_path) if key_path is not None else path.parent / KEY_FILE
        if not path.is_file():
            if not create:
                raise PrivacyError(
                    f"privacy ledger not found at {path}: refusing DP training without a budget "
                    f"(create one with `fedretain privacy set-budget`)"
                )
            path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None, timeout=30.0)
        conn.row_factory = sqlite3.Row
        try:
            conn.execute("PRAGMA user_version").fetchone()  # a file that is not SQLite fails here
            try:
                key = signing.load_or_create_key(key_file)[0] if create else signing.load_private_key(key_file)
            except signing.KeyFileError as exc:
                raise PrivacyError(f"privacy ledger {path}: the node key is needed to verify and sign it: "
                                   f"{exc}") from None
            pin = _check_pinned_key(key_file, key)
            if controller is None and pin is not None:
                controller = pin.merchant_id  # named after the node's merchant, like its consent ledger
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA synchronous = FULL")  # a reservation, once acknowledged, survives power loss
            store = Store(path, conn, key)
            store.init_or_migrate(controller)
            store.verify()
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise PrivacyError(f"{path}: unreadable privacy ledger ({exc})") from exc
        except BaseException:
            conn.close()
            raise
        return cls(path, store)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> BudgetLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def controller(self) -> str:
        return self._store.controller

    @property
    def public_key_pem(self) -> str:
        """PEM of the node key that signs this ledger's heads (what the platform's witness pins)."""
        return signing.public_key_pem(self._store.key)

    # -- tamper evidence and witnessing (the consent ledger's interface) ------------------
    def verify(self) -> None:
        """Recheck the whole ledger against the node key; raise :class:`PrivacyError` if anything is off."""
        self._store.verify()

    @property
    def size(self) -> int:
        """Number of log entries (budget events, reservations, spends)."""
        return self._store.frontier.size

    def head(self) -> LedgerHead:
        """The latest signed head (a :class:`BudgetHead`, whose ``verify`` checks the budget checkpoint)."""
        return self._store.head()

    def heads(self) -> list[LedgerHead]:
        q = "SELECT size, root_hex, signature_hex, timestamp, key_fingerprint FROM heads ORDER BY head_id"
        return [BudgetHead(r[0], r[1], r[2], r[3], self.controller, r[4]) for r in self._conn.execute(q)]

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[str]:
        """Hex RFC 9162 consistency proof between two sizes of this ledger's log."""
        return self._store.consistency_proof(old_size, new_size)

    def check_against(self, kept: LedgerHead) -> None:
        """Refuse unless this ledger extends a head signed earlier by this node (rollback/fork check)."""
        self._store.check_against(kept)

    # -- caps --------------------------------------------------------------------------
    def set_node_cap(self, epsilon: float, delta: float | None = None, reason: str = "") -> Budget:
        """Set the node-wide lifetime cap every purpose draws from (a signed event; raising needs a reason)."""
        return self._set(NODE, epsilon, delta, reason)

    def set_budget(self, purpose: str, epsilon: float, delta: float | None = None, note: str = "", *,
                   reason: str = "") -> Budget:
        """Set ``purpose``'s sub-limit (or the node cap, ``purpose="*"``); raising one needs a reason.

        On a ledger with no node cap yet, the first budget set also becomes the node cap (its own
        signed event), so every purpose set later draws from it.
        """
        if purpose != NODE:
            check_purpose(purpose)
        budget = self._set(purpose, epsilon, delta, reason or note)
        return budget

    def _set(self, purpose: str, epsilon: float, delta: float | None, reason: str) -> Budget:
        if not (epsilon >= 0 and math.isfinite(epsilon)):
            raise PrivacyError(f"lifetime ε must be a finite number >= 0, got {epsilon}")
        if delta is not None and not 0 < delta < 1:
            raise PrivacyError(f"lifetime δ must be in (0, 1), got {delta}")
        reason = (reason or "").strip()
        with self._store.write(full_check=True):
            events = []
            if purpose != NODE and self.node_cap() is None:
                events.append((NODE, f"node cap initialised from the first budget set ({purpose})"
                               + (f": {reason}" if reason else "")))
            events.append((purpose, reason))
            for scope, why in events:
                old = self.budget(scope)
                if old is not None and _raises(old.epsilon, old.delta, epsilon, delta) and not why:
                    what = "the node-wide cap" if scope == NODE else f"the {scope} budget"
                    raise PrivacyError(
                        f"raising {what} from ε={old.epsilon:g} to ε={epsilon:g} needs a reason "
                        f"(kept in the signed ledger and shown in `fedretain privacy status`); nothing changed")
                values = self._store.sign_cap_event({
                    "seq": self._store.next_seq("budgets"), "purpose": scope, "epsilon": float(epsilon),
                    "delta": None if delta is None else float(delta), "set_at": _now(),
                    "note": why or "initial budget",
                    "previous_epsilon": None if old is None else old.epsilon,
                    "previous_delta": None if old is None else old.delta})
                self._store.insert("budgets", values)
        return self.budget(purpose)  # type: ignore[return-value]

    def node_cap(self) -> Budget | None:
        """The node-wide lifetime cap in force (None: not set, every run is refused)."""
        return self.budget(NODE)

    def budget(self, purpose: str) -> Budget | None:
        """The latest cap event of ``purpose`` (its sub-limit; ``"*"``: the node cap)."""
        row = self._conn.execute(f"SELECT {_BUDGET_COLS} FROM budgets WHERE purpose = ? ORDER BY seq DESC LIMIT 1",
                                 (purpose,)).fetchone()
        return Budget(**dict(row)) if row else None

    def budget_history(self, purpose: str | None = None) -> list[Budget]:
        """Every cap event (sub-limits; the node cap's events have purpose ``"*"``), oldest first."""
        sql = f"SELECT {_BUDGET_COLS} FROM budgets"
        rows = self._conn.execute(sql + (" WHERE purpose = ?" if purpose else "") + " ORDER BY seq",
                                  (purpose,) if purpose else ()).fetchall()
        return [Budget(**dict(r)) for r in rows]

    def cap_events(self) -> list[dict[str, Any]]:
        """Cap events as data for ``privacy status`` and the officer's report (signatures verified on open)."""
        return [{"scope": "node" if b.purpose == NODE else b.purpose, "kind": b.kind, "epsilon": b.epsilon,
                 "delta": b.delta, "previous_epsilon": b.previous_epsilon, "previous_delta": b.previous_delta,
                 "set_at": b.set_at, "reason": b.note, "key_fingerprint": b.key_fingerprint,
                 "signature": b.signature_hex} for b in self.budget_history()]

    # -- runs and spends ---------------------------------------------------------------
    def runs(self, purpose: str | None = None) -> list[RunPlan]:
        where = " WHERE purpose = ?" if purpose else ""
        sql = f"SELECT {_RUN_COLS} FROM runs{where} ORDER BY reserved_at, run_id"
        return [RunPlan(**dict(r)) for r in self._conn.execute(sql, (purpose,) if purpose else ()).fetchall()]

    def run(self, run_id: str, purpose: str) -> RunPlan | None:
        row = self._conn.execute(f"SELECT {_RUN_COLS} FROM runs WHERE run_id = ? AND purpose = ?",
                                 (run_id, purpose)).fetchone()
        return RunPlan(**dict(row)) if row else None

    def spends(self, run_id: str | None = None, purpose: str | None = None) -> list[Spend]:
        where, args = [], []
        if run_id is not None:
            where.append("run_id = ?")
            args.append(run_id)
        if purpose is not None:
            where.append("purpose = ?")
            args.append(purpose)
        sql = f"SELECT {_SPEND_COLS} FROM spends" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY seq"
        return [Spend(**dict(r)) for r in self._conn.execute(sql, args).fetchall()]

    def committed(self, purpose: str | None = None) -> tuple[float, float]:
        """(Σ ε, Σ δ) reserved by all runs of ``purpose`` (None or ``"*"``: of every purpose) — basic composition."""
        every = purpose in (None, NODE)
        row = self._conn.execute(
            "SELECT COALESCE(SUM(epsilon), 0.0) AS e, COALESCE(SUM(delta), 0.0) AS d FROM runs"
            + ("" if every else " WHERE purpose = ?"), () if every else (purpose,)).fetchone()
        return float(row["e"]), float(row["d"])

    def remaining(self, purpose: str) -> tuple[float | None, float | None]:
        """(ε, δ) a new run of ``purpose`` may still reserve: the tighter of node cap and sub-limit.

        ``(None, None)`` when no node cap is set; δ is None when neither limits it.
        """
        cap = self.node_cap()
        if cap is None:
            return None, None
        eps_all, delta_all = self.committed()
        eps = cap.epsilon - eps_all
        delta = None if cap.delta is None else cap.delta - delta_all
        sub = self.budget(purpose)
        if sub is not None:
            eps_p, delta_p = self.committed(purpose)
            eps = min(eps, sub.epsilon - eps_p)
            if sub.delta is not None:
                delta = sub.delta - delta_p if delta is None else min(delta, sub.delta - delta_p)
        return max(eps, 0.0), None if delta is None else max(delta, 0.0)

    def check_room(self, run_id: str, purpose: str, epsilon: float, delta: float) -> None:
        """Raise :class:`BudgetExceeded` unless a new run of (ε, δ) fits the node cap and the purpose's sub-limit."""
        cap = self.node_cap()
        if cap is None:
            raise BudgetExceeded(
                f"no lifetime privacy budget is set on this node ({self.path}); "
                f"refusing DP run {run_id!r} for purpose {purpose!r} before any training "
                f"(set one with `fedretain privacy set-budget --epsilon E --reason TEXT`)"
            )
        for scope, limit in ((NODE, cap), (purpose, self.budget(purpose))):
            if limit is None:
                continue
            used, delta_used = self.committed(scope)
            what = "lifetime budget" if scope == NODE else f"sub-limit for purpose {purpose!r}"
            n_runs = len(self.runs(None if scope == NODE else scope))
            if used + epsilon > limit.epsilon + EPS_SLACK:
                raise BudgetExceeded(
                    f"run {run_id!r} would spend ε={epsilon:g} for purpose {purpose!r}, but only "
                    f"ε={max(limit.epsilon - used, 0.0):g} of the {what} ε={limit.epsilon:g} remains "
                    f"({used:g} already committed by {n_runs} run(s)"
                    + (" of every purpose" if scope == NODE else "") + "); refused before any training, "
                    "nothing recorded"
                )
            if limit.delta is not None and delta_used + delta > limit.delta * (1 + 1e-9):
                raise BudgetExceeded(
                    f"run {run_id!r} would take δ to {delta_used + delta:.3g}, past the {what} "
                    f"δ={limit.delta:.3g}; refused before any training, nothing recorded"
                )

    def reserve(self, plan: RunPlan) -> RunPlan:
        """Reserve ``plan``'s whole (ε, δ), or raise :class:`BudgetExceeded` having written nothing.

        The ledger was verified in full on open; here the tip, triggers and row count are rechecked
        (any change by another writer triggers the full verification again), so a ledger tampered
        with meanwhile refuses the reservation.
        Reserving the same run again (a node restart, a resumed run) returns the stored
        plan; a *different* mechanism under an existing run id is refused.
        """
        check_purpose(plan.purpose)
        with self._store.write():
            existing = self.run(plan.run_id, plan.purpose)
            if existing is not None:
                if not existing.same_mechanism(plan):
                    raise PrivacyError(
                        f"run {plan.run_id!r} already reserved a different DP mechanism on this node "
                        f"(ε={existing.epsilon}, σ={existing.noise_multiplier:.4f}, q={existing.sample_rate:.5f}, "
                        f"{existing.planned_steps} steps); refusing to change it mid-run"
                    )
                return existing
            self.check_room(plan.run_id, plan.purpose, plan.epsilon, plan.delta)
            stored = RunPlan(**{**asdict(plan), "reserved_at": _now()})
            self._store.insert("runs", asdict(stored))
        return stored

    def accountant_for(self, run_id: str, purpose: str) -> Accountant:
        """The run's accountant as of its last recorded round (fresh if none yet)."""
        plan = self.run(run_id, purpose)
        if plan is None:
            raise PrivacyError(f"run {run_id!r} has no reservation on this node")
        spends = self.spends(run_id, purpose)
        if not spends:
            return Accountant(plan.accountant)
        acc = Accountant.from_state(spends[-1].accountant_state)
        if acc.name != plan.accountant:
            raise PrivacyError(f"run {run_id!r}: stored accountant {acc.name!r} differs from the plan's")
        return acc

    def record_spend(self, run_id: str, purpose: str, server_round: int, steps: int, accountant: Accountant) -> Spend:
        """Append the spend of one round; refuse (write nothing) if it exceeds the reservation."""
        plan = self.run(run_id, purpose)
        if plan is None:
            raise PrivacyError(f"run {run_id!r} has no reservation on this node")
        eps = accountant.epsilon(plan.delta)
        if eps > plan.epsilon + EPS_SLACK:
            raise BudgetExceeded(f"run {run_id!r} spent ε={eps:.4f}, more than its reservation ε={plan.epsilon:g}")
        with self._store.write():
            spend = Spend(self._store.next_seq("spends"), run_id, purpose, int(server_round), int(steps),
                          accountant.steps, float(eps), accountant.to_json(), _now())
            self._store.insert("spends", asdict(spend))
        return spend

    # -- reporting ---------------------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        """Per purpose: budget, committed, remaining, and per run: reserved vs spent so far."""
        purposes = sorted(({b.purpose for b in self.budget_history()} - {NODE}) | {r.purpose for r in self.runs()})
        out = []
        for purpose in purposes:
            budget = self.budget(purpose)
            eps, delta = self.committed(purpose)
            runs: list[dict[str, Any]] = []
            for plan in self.runs(purpose):
                spends = self.spends(plan.run_id, purpose)
                runs.append({
                    "run_id": plan.run_id, "mode": plan.mode, "accountant": plan.accountant,
                    "reserved_epsilon": plan.epsilon, "delta": plan.delta,
                    "spent_epsilon": spends[-1].epsilon if spends else 0.0,
                    "rounds": len(spends), "steps": spends[-1].total_steps if spends else 0,
                    "planned_steps": plan.planned_steps, "noise_multiplier": plan.noise_multiplier,
                    "sample_rate": plan.sample_rate, "reserved_at": plan.reserved_at,
                })
            out.append({
                "purpose": purpose,
                "budget_epsilon": budget.epsilon if budget else None,
                "budget_delta": budget.delta if budget else None,
                "committed_epsilon": eps, "committed_delta": delta,
                "spent_epsilon": sum(r["spent_epsilon"] for r in runs),
                "remaining_epsilon": self.remaining(purpose)[0],
                "runs": runs,
            })
        return out

    def report(self) -> dict[str, Any]:
        """Everything ``privacy status --json`` and the officer's report show: node cap, purposes, events, head."""
        cap = self.node_cap()
        eps, delta = self.committed()
        return {
            "ledger": str(self.path), "controller": self.controller,
            "node": {"cap_epsilon": cap.epsilon if cap else None, "cap_delta": cap.delta if cap else None,
                     "committed_epsilon": eps, "committed_delta": delta,
                     "remaining_epsilon": max(cap.epsilon - eps, 0.0) if cap else None},
            "purposes": self.status(), "cap_events": self.cap_events(), "head": self.head().to_dict(),
        }


def _check_pinned_key(key_file: Path, key: Any) -> Any:
    """Refuse a node key that is not the node's pinned key (``node.json`` beside it, when the node has one).

    Without this, an operator who swapped both ``node_key.pem`` and ``privacy.db`` for a fresh
    pair would get a self-consistent budget ledger with a free budget on this node; the pin
    written at provisioning (:mod:`fedretain.consent.identity`) names the only key the node trusts.
    """
    from fedretain.consent.identity import PinError, load_pin

    try:
        pin = load_pin(key_file.parent)
    except PinError as exc:
        raise PrivacyError(f"privacy ledger: {exc}") from None
    if pin is not None and signing.fingerprint(key) != pin.key_fingerprint:
        raise PrivacyError(
            f"privacy ledger: the node key {key_file} is {signing.fingerprint(key)}, but this node's pinned key "
            f"({pin.path}) is {pin.key_fingerprint}: the key was replaced; refusing the budget ledger. Restore "
            f"the node's own key from a backup")
    return pin
