"""The node's privacy-budget ledger: SQLite, append-only, beside the consent ledger.

Every DP run a merchant node takes part in *reserves* its whole (ε, δ) before the
first training step and then appends one spend record per round (ε spent so far in
the run and the accountant's history, so the accountant survives a node restart).

Composition over runs is **basic composition**: the committed budget of a purpose
is the sum of the ε (and of the δ) reserved by every run of that purpose. A run can
never spend more than it reserved (``record_spend`` refuses), so the sum is a sound
upper bound however the runs were accounted (RDP or PRV, local or aggregate mode).
It is conservative: a run that stopped early still counts with its full
reservation, because the node cannot know whether it will be resumed.

A new run is refused, with nothing written, when the reservation would take the
purpose past its lifetime budget or when no budget has been set (fail closed).
Rows are never updated or deleted (SQLite triggers enforce it); a new budget is a
new row, so the ledger keeps the history of budget changes too.
"""

from __future__ import annotations

import math
import sqlite3
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from fedretain.consent.vocab import check_purpose
from fedretain.privacy.accountant import Accountant, PrivacyError

LEDGER_FILE = "privacy.db"
FORMAT = "fedretain-privacy-ledger/1"
EPS_SLACK = 1e-9  # float noise allowed when comparing ε sums

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS budgets (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, purpose TEXT NOT NULL,
    epsilon REAL NOT NULL CHECK (epsilon >= 0), delta REAL CHECK (delta IS NULL OR (delta > 0 AND delta < 1)),
    set_at TEXT NOT NULL, note TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT NOT NULL, purpose TEXT NOT NULL, mode TEXT NOT NULL, accountant TEXT NOT NULL,
    epsilon REAL NOT NULL CHECK (epsilon > 0), delta REAL NOT NULL CHECK (delta > 0 AND delta < 1),
    noise_multiplier REAL NOT NULL, sample_rate REAL NOT NULL, planned_steps INTEGER NOT NULL,
    n_records INTEGER NOT NULL, reserved_at TEXT NOT NULL, PRIMARY KEY (run_id, purpose));
CREATE TABLE IF NOT EXISTS spends (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, purpose TEXT NOT NULL,
    round INTEGER NOT NULL, steps INTEGER NOT NULL, total_steps INTEGER NOT NULL,
    epsilon REAL NOT NULL, accountant_state TEXT NOT NULL, at TEXT NOT NULL,
    FOREIGN KEY (run_id, purpose) REFERENCES runs (run_id, purpose));
"""
_TABLES = ("budgets", "runs", "spends")


def _append_only_triggers() -> str:
    out = []
    for table in _TABLES:
        for op in ("UPDATE", "DELETE"):
            out.append(
                f"CREATE TRIGGER IF NOT EXISTS {table}_no_{op.lower()} BEFORE {op} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only: {op} on {table} refused'); END;"
            )
    return "\n".join(out)


def ledger_path(state_dir: str | Path) -> Path:
    """Where a node keeps its privacy ledger: ``<state_dir>/privacy.db`` (next to consent.db)."""
    return Path(state_dir) / LEDGER_FILE


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class BudgetExceeded(PrivacyError):
    """A run would take a purpose past its lifetime budget (or no budget is set)."""


@dataclass(frozen=True)
class Budget:
    purpose: str
    epsilon: float
    delta: float | None
    set_at: str
    note: str = ""


@dataclass(frozen=True)
class RunPlan:
    """What a run reserves: its whole (ε, δ) and the mechanism that will spend it."""

    run_id: str
    purpose: str
    mode: str  # "local" (DP-SGD on the node) or "aggregate" (noise on the securely summed gradients)
    accountant: str
    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    planned_steps: int
    n_records: int
    reserved_at: str = ""

    def same_mechanism(self, other: "RunPlan") -> bool:
        keys = ("mode", "accountant", "epsilon", "delta", "noise_multiplier", "sample_rate", "planned_steps")
        return all(getattr(self, k) == getattr(other, k) for k in keys)


@dataclass(frozen=True)
class Spend:
    seq: int
    run_id: str
    purpose: str
    round: int
    steps: int
    total_steps: int
    epsilon: float
    accountant_state: str
    at: str


class BudgetLedger:
    """One SQLite file per merchant node; see the module docstring for the rules."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self._conn = conn

    # -- opening -----------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, *, create: bool = False) -> "BudgetLedger":
        path = Path(path)
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
            conn.execute("PRAGMA foreign_keys = ON")
            conn.executescript(_SCHEMA + _append_only_triggers())
            row = conn.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta VALUES ('format', ?)", (FORMAT,))
            elif row["value"] != FORMAT:
                raise PrivacyError(f"{path}: not a {FORMAT} file (found {row['value']!r})")
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise PrivacyError(f"{path}: unreadable privacy ledger ({exc})") from exc
        except PrivacyError:
            conn.close()
            raise
        return cls(path, conn)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "BudgetLedger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: the check and the append see the same ledger."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    # -- budgets -----------------------------------------------------------------------
    def set_budget(self, purpose: str, epsilon: float, delta: float | None = None, note: str = "") -> Budget:
        """Set the lifetime budget of ``purpose`` (a new row; earlier budgets stay in the history)."""
        check_purpose(purpose)
        if not (epsilon >= 0 and math.isfinite(epsilon)):
            raise PrivacyError(f"lifetime ε must be a finite number >= 0, got {epsilon}")
        if delta is not None and not 0 < delta < 1:
            raise PrivacyError(f"lifetime δ must be in (0, 1), got {delta}")
        budget = Budget(purpose, float(epsilon), None if delta is None else float(delta), _now(), note)
        with self._write() as c:
            c.execute("INSERT INTO budgets (purpose, epsilon, delta, set_at, note) VALUES (?, ?, ?, ?, ?)",
                      (budget.purpose, budget.epsilon, budget.delta, budget.set_at, budget.note))
        return budget

    def budget(self, purpose: str) -> Budget | None:
        row = self._conn.execute(
            "SELECT purpose, epsilon, delta, set_at, note FROM budgets WHERE purpose = ? ORDER BY seq DESC LIMIT 1",
            (purpose,),
        ).fetchone()
        return Budget(**dict(row)) if row else None

    def budget_history(self, purpose: str | None = None) -> list[Budget]:
        sql = "SELECT purpose, epsilon, delta, set_at, note FROM budgets"
        rows = self._conn.execute(sql + (" WHERE purpose = ?" if purpose else "") + " ORDER BY seq",
                                  (purpose,) if purpose else ()).fetchall()
        return [Budget(**dict(r)) for r in rows]

    # -- runs and spends ---------------------------------------------------------------
    def runs(self, purpose: str | None = None) -> list[RunPlan]:
        sql = "SELECT * FROM runs" + (" WHERE purpose = ?" if purpose else "") + " ORDER BY reserved_at, run_id"
        return [RunPlan(**dict(r)) for r in self._conn.execute(sql, (purpose,) if purpose else ()).fetchall()]

    def run(self, run_id: str, purpose: str) -> RunPlan | None:
        row = self._conn.execute("SELECT * FROM runs WHERE run_id = ? AND purpose = ?", (run_id, purpose)).fetchone()
        return RunPlan(**dict(row)) if row else None

    def spends(self, run_id: str | None = None, purpose: str | None = None) -> list[Spend]:
        where, args = [], []
        if run_id is not None:
            where.append("run_id = ?")
            args.append(run_id)
        if purpose is not None:
            where.append("purpose = ?")
            args.append(purpose)
        sql = "SELECT * FROM spends" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY seq"
        return [Spend(**dict(r)) for r in self._conn.execute(sql, args).fetchall()]

    def committed(self, purpose: str) -> tuple[float, float]:
        """(Σ ε, Σ δ) reserved by all runs of ``purpose`` — basic composition."""
        row = self._conn.execute(
            "SELECT COALESCE(SUM(epsilon), 0.0) AS e, COALESCE(SUM(delta), 0.0) AS d FROM runs WHERE purpose = ?",
            (purpose,),
        ).fetchone()
        return float(row["e"]), float(row["d"])

    def check_room(self, run_id: str, purpose: str, epsilon: float, delta: float) -> None:
        """Raise :class:`BudgetExceeded` unless a new run of (ε, δ) fits the purpose's lifetime budget."""
        budget = self.budget(purpose)
        if budget is None:
            raise BudgetExceeded(
                f"no lifetime privacy budget is set for purpose {purpose!r} on this node ({self.path}); "
                f"refusing DP run {run_id!r} before any training "
                f"(set one with `fedretain privacy set-budget --purpose {purpose} --epsilon E`)"
            )
        eps_used, delta_used = self.committed(purpose)
        if eps_used + epsilon > budget.epsilon + EPS_SLACK:
            raise BudgetExceeded(
                f"run {run_id!r} would spend ε={epsilon:g} for purpose {purpose!r}, but only "
                f"ε={max(budget.epsilon - eps_used, 0.0):g} of the lifetime budget ε={budget.epsilon:g} remains "
                f"({eps_used:g} already committed by {len(self.runs(purpose))} run(s)); "
                f"refused before any training, nothing recorded"
            )
        if budget.delta is not None and delta_used + delta > budget.delta * (1 + 1e-9):
            raise BudgetExceeded(
                f"run {run_id!r} would take δ for purpose {purpose!r} to {delta_used + delta:.3g}, "
                f"past the lifetime δ={budget.delta:.3g}; refused before any training, nothing recorded"
            )

    def reserve(self, plan: RunPlan) -> RunPlan:
        """Reserve ``plan``'s whole (ε, δ), or raise :class:`BudgetExceeded` having written nothing.

        Reserving the same run again (a node restart, a resumed run) returns the stored
        plan; a *different* mechanism under an existing run id is refused.
        """
        check_purpose(plan.purpose)
        with self._write() as c:
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
            c.execute(
                "INSERT INTO runs VALUES (:run_id, :purpose, :mode, :accountant, :epsilon, :delta, "
                ":noise_multiplier, :sample_rate, :planned_steps, :n_records, :reserved_at)",
                asdict(stored),
            )
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
        row = (run_id, purpose, int(server_round), int(steps), accountant.steps, eps, accountant.to_json(), _now())
        with self._write() as c:
            cur = c.execute(
                "INSERT INTO spends (run_id, purpose, round, steps, total_steps, epsilon, accountant_state, at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
        return Spend(int(cur.lastrowid), *row)

    # -- reporting ---------------------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        """Per purpose: budget, committed, remaining, and per run: reserved vs spent so far."""
        purposes = sorted({b.purpose for b in self.budget_history()} | {r.purpose for r in self.runs()})
        out = []
        for purpose in purposes:
            budget = self.budget(purpose)
            eps, delta = self.committed(purpose)
            runs = []
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
                "remaining_epsilon": max(budget.epsilon - eps, 0.0) if budget else None,
                "runs": runs,
            })
        return out
