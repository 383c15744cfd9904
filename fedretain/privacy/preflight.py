"""Before a DP simulation starts anything (Ray, Flower): can every silo take part? (issue 13)

A refused budget used to surface only after Ray and Flower had started (~50 s). This reads
each silo's privacy ledger (verified: a tampered ledger refuses here too) and checks the
run's ε fits the node cap and the purpose's sub-limit, and — when a person-level cap is
set — plans each node's mechanism exactly as the node will (same functions: the node's
``prepare``, ``plan_run`` / ``plan_aggregate``) and checks the person-level ε at the
platform's declared ``max-merchants-per-person``. Nothing is written.

The nodes check again when they reserve (the authority is each node's own ledger); this is
only the early, readable refusal for the operator of a simulation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedretain.privacy.accountant import PrivacyError
from fedretain.privacy.budget import BudgetLedger, RunPlan, ledger_path

NODE_DIR = ".node"
CHARGED_MODES = ("local", "aggregate")  # modes whose nodes reserve in their own ledger


@dataclass
class Preflight:
    """What the checks found: refusals (one per silo at most) and the person-level table rows."""

    problems: list[str] = field(default_factory=list)
    person: list[dict[str, Any]] = field(default_factory=list)

    def message(self) -> str:
        return ("DP run refused before starting the simulation:\n  " + "\n  ".join(self.problems))


def check_budgets(silos: list[Path], run_id: str, purpose: str, epsilon: float, delta: float) -> list[str]:
    """One line per silo whose ledger is missing, tampered, or has no room for ε (δ when given)."""
    problems = []
    for silo in silos:
        path = ledger_path(Path(silo) / NODE_DIR)
        try:
            with BudgetLedger.open(path) as ledger:
                if ledger.run(run_id, purpose) is None:  # a resumed run has its reservation already
                    ledger.check_room(run_id, purpose, epsilon, delta)
        except PrivacyError as exc:
            problems.append(f"{Path(silo).name}: {exc}")
    return problems


def node_plans(settings: Any, counts: list[tuple[str, int]], epsilon: float | None = None
               ) -> list[tuple[str, RunPlan]]:
    """Each node's plan of this run from its training-record count, by the nodes' own planning functions.

    ``epsilon``: the training share of the run's ε the nodes are sent (``server.federation.train_epsilon``;
    default: the whole target). Batches and rounds follow the run's ``dp-schedule``
    (``fedretain.privacy.schedule``), exactly as the server (aggregate) or each node (local) chooses them.
    """
    from fedretain.privacy.aggregate import plan_aggregate
    from fedretain.privacy.dp_trainer import DPConfig, plan_run
    from fedretain.privacy.schedule import aggregate_schedule_for, local_batch_for
    from fedretain.train import TrainConfig

    eps = float(settings.target_epsilon if epsilon is None else epsilon)
    accountant = str(settings.extra.get("dp-accountant", "rdp"))
    if settings.dp_mode == "aggregate":  # as server/secagg.py plans it: one mechanism over all nodes' records
        n_total = declared_or_counted(settings, counts)
        schedule = aggregate_schedule_for(settings, n_total, eps)
        agg = plan_aggregate(eps, settings.target_delta, n_total, schedule.expected_batch, schedule.rounds,
                             settings.max_grad_norm, accountant)
        plan = RunPlan(settings.run_id, settings.purpose, "aggregate", accountant, agg.target_epsilon, agg.delta,
                       agg.noise_multiplier, agg.sample_rate, agg.rounds, n_total)
        return [("all nodes", plan)]
    dp = DPConfig(target_epsilon=eps, target_delta=settings.target_delta,
                  max_grad_norm=settings.max_grad_norm, accountant=accountant, total_rounds=settings.rounds)
    return [(name, plan_run(settings.run_id, settings.purpose, n,
                            TrainConfig(epochs=settings.local_epochs, batch_size=local_batch_for(settings, n),
                                        learning_rate=settings.learning_rate), dp))
            for name, n in counts if n > 0]


def declared_or_counted(settings: Any, counts: list[tuple[str, int]]) -> int:
    """Aggregate mode's N: the platform's declared population when set (what the server uses), else the count."""
    declared = settings.extra.get("aggregate-population")
    try:
        n = int(float(declared)) if declared not in (None, "") else 0
    except (TypeError, ValueError):
        n = 0
    return n if n > 0 else sum(n for _, n in counts)


def preflight(settings: Any, silos: list[Path], count: Callable[[Path], int],
              epsilon: float | None = None) -> Preflight:
    """Budget (and, with a person cap or k > 1, person-level) checks of a DP run over ``silos``.

    ``count(silo)`` is the node's number of training records for this run (the CLI passes the
    node's own ``prepare``); it is only called when person-level ε is needed.
    """
    from fedretain.privacy.person import check_person_cap, person_table

    out = Preflight()
    if settings.dp_mode not in CHARGED_MODES:
        return out
    out.problems = check_budgets(silos, settings.run_id, settings.purpose, settings.target_epsilon,
                                 settings.target_delta)
    k, cap = int(settings.max_merchants_per_person), float(settings.person_epsilon_cap)
    if out.problems or (cap <= 0 and k == 1):
        return out
    for name, plan in node_plans(settings, [(Path(s).name, count(Path(s))) for s in silos], epsilon):
        out.person.extend({"node": name, **row.as_dict()} for row in person_table(plan, tuple(sorted({1, k}))))
        try:
            check_person_cap(plan, k, cap, where=name)
        except PrivacyError as exc:
            out.problems.append(str(exc))
    return out
