"""Charging an analytics query to the node's privacy budget ledger (purpose ``analytics``).

Each query is one entry of :class:`fedretain.privacy.budget.BudgetLedger`: reserved under
the query id as its run id (mode ``analytics:<kind>``, one unsampled Gaussian step), then
spent with the same Opacus accountant the ledger uses for training runs. Composition over
queries is the ledger's basic composition: Σ ε of all analytics queries ≤ the lifetime
budget. A query id is answered at most once: a second answer would be a second, uncharged
release of the same data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedretain.analytics.mechanisms import ACCOUNTANT, GaussianMechanism
from fedretain.analytics.queries import QuerySpec
from fedretain.privacy.accountant import PrivacyError
from fedretain.privacy.budget import BudgetExceeded, BudgetLedger, RunPlan, Spend

PURPOSE = "analytics"


class QueryRefused(PrivacyError):
    """The node will not answer this query (budget, repeat, missing ledger); nothing was released."""


@dataclass(frozen=True)
class BudgetState:
    """What a node may tell the server about its analytics budget (no user data).

    ``budget_*`` is the limit that binds analytics: the node-wide cap (shared with training) or
    the analytics sub-limit; ``committed_*`` is what is already committed against that limit
    (for the node cap: by every purpose), so ``budget - committed`` is what a query may still use.
    """

    ledger_found: bool
    budget_epsilon: float | None
    budget_delta: float | None
    committed_epsilon: float
    committed_delta: float

    @property
    def remaining_epsilon(self) -> float | None:
        return None if self.budget_epsilon is None else max(self.budget_epsilon - self.committed_epsilon, 0.0)

    @property
    def remaining_delta(self) -> float | None:
        return None if self.budget_delta is None else max(self.budget_delta - self.committed_delta, 0.0)

    def refusal(self, epsilon: float, delta: float) -> str | None:
        """Why a query at (ε, δ) would be refused, or None if it fits."""
        if not self.ledger_found or self.budget_epsilon is None:
            return ("no privacy budget is set for purpose 'analytics' (set one with "
                    "`fedretain privacy set-budget --silo SILO --purpose analytics --epsilon E`)")
        rem = self.remaining_epsilon or 0.0
        if epsilon > rem + 1e-9:
            return (f"the query needs ε={epsilon:g} but only ε={rem:g} of the node's budget for analytics "
                    f"ε={self.budget_epsilon:g} remains ({self.committed_epsilon:g} already spent)")
        if self.remaining_delta is not None and delta > self.remaining_delta * (1 + 1e-9):
            return (f"the query's δ={delta:g} is more than the δ={self.remaining_delta:.3g} left "
                    f"of the node's budget for analytics")
        return None


def budget_state(ledger_file: Path) -> BudgetState:
    if not Path(ledger_file).is_file():
        return BudgetState(False, None, None, 0.0, 0.0)
    with BudgetLedger.open(ledger_file) as ledger:
        cap, sub = ledger.node_cap(), ledger.budget(PURPOSE)
        if cap is None:
            return BudgetState(True, None, None, *ledger.committed(PURPOSE))
        scopes = [(cap, ledger.committed())] + ([(sub, ledger.committed(PURPOSE))] if sub is not None else [])
    limit, (eps, delta) = min(scopes, key=lambda s: s[0].epsilon - s[1][0])  # the limit with less room binds
    return BudgetState(True, limit.epsilon, limit.delta, eps, delta)


def charge_query(ledger_file: Path, spec: QuerySpec, mechanism: GaussianMechanism, n_users: int, *,
                 mode: str | None = None, then: QuerySpec | None = None) -> Spend:
    """Reserve and record the query's spend; raise :class:`QueryRefused` having written nothing.

    Called before the noisy answer leaves the node. If anything fails after the reservation
    the budget stays charged and nothing is released (fail closed, conservative).
    ``then`` is a query that will follow this release (the size release of auto granularity is
    followed by the query itself): this release is refused, before anything is spent, unless
    the budget has room for both and ``then`` has not been answered yet.
    """
    if not Path(ledger_file).is_file():
        raise QueryRefused(f"privacy ledger not found at {ledger_file}: no analytics budget, query "
                           f"{spec.query_id} refused (set one with `fedretain privacy set-budget`)")
    plan = RunPlan(run_id=spec.query_id, purpose=PURPOSE, mode=mode or f"analytics:{spec.kind}", accountant=ACCOUNTANT,
                   epsilon=spec.epsilon, delta=spec.delta, noise_multiplier=mechanism.noise_multiplier,
                   sample_rate=1.0, planned_steps=1, n_records=int(n_users))
    with BudgetLedger.open(ledger_file) as ledger:
        if ledger.spends(spec.query_id, PURPOSE):
            raise QueryRefused(f"query {spec.query_id} was already answered by this node; "
                               f"a query id is answered once (send a new query)")
        try:
            if then is not None:
                if ledger.spends(then.query_id, PURPOSE):
                    raise QueryRefused(f"query {then.query_id} was already answered by this node; its size release "
                                       f"{spec.query_id} is refused (send a new query)")
                ledger.check_room(spec.query_id, PURPOSE, spec.epsilon + then.epsilon, spec.delta + then.delta)
            ledger.reserve(plan)
        except BudgetExceeded as exc:
            if then is not None:
                raise QueryRefused(
                    f"analytics query {then.query_id} ({then.kind}) refused before its size release: the size "
                    f"release (ε={spec.epsilon:g}) and the query (ε={then.epsilon:g}) need "
                    f"ε={spec.epsilon + then.epsilon:g} together: {exc}") from None
            raise QueryRefused(f"analytics query {spec.query_id} ({spec.kind}) refused: {exc}") from None
        return ledger.record_spend(spec.query_id, PURPOSE, 0, 1, mechanism.accountant())
