"""``fedretain consent`` as mounted in the front end: the consent CLI plus the feature registry it may not import.

The consent package sits below the feature code (data flows silo → consent gate → features),
so ``consent show`` learns which scopes each feature reads from here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from fedretain.consent.cli import consent, provide_feature_scopes
from fedretain.consent.cli_impact import provide_dp_bounds
from fedretain.consent.impact import DPBound

__all__ = ["consent"]


def _feature_scopes() -> Mapping[str, Iterable[str]]:
    from fedretain.features import FEATURES

    return {name: f.scopes for name, f in FEATURES.items()}


def _dp_bounds(state_dir: Path, key: Path) -> Mapping[str, DPBound] | None:
    """Per run: the (ε, δ) the node's privacy ledger recorded (ε spent so far, else reserved); the loosest
    over the run's purposes. None when the node keeps no privacy ledger."""
    from fedretain.privacy.budget import BudgetLedger, ledger_path

    path = ledger_path(state_dir)
    if not path.is_file():
        return None
    out: dict[str, DPBound] = {}
    with BudgetLedger.open(path, key_path=key if key.is_file() else None) as budget:
        spent: dict[tuple[str, str], float] = {}
        for s in budget.spends():
            spent[(s.run_id, s.purpose)] = max(spent.get((s.run_id, s.purpose), 0.0), s.epsilon)
        for plan in budget.runs():
            eps = spent.get((plan.run_id, plan.purpose))
            bound = DPBound(plan.mode, plan.epsilon if eps is None else eps, plan.delta,
                            source="privacy ledger (" + ("reserved" if eps is None else "spent") + ")")
            old = out.get(plan.run_id)
            if old is None or (old.epsilon or 0.0) < (bound.epsilon or 0.0):
                out[plan.run_id] = bound
    return out


provide_feature_scopes(_feature_scopes)
provide_dp_bounds(_dp_bounds)
