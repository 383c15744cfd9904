"""Person-level ε: what a person present at up to k merchants gets from one run.

The unit of privacy of every mechanism in fedretain is **one record (one user) at one
merchant**: a node's DP guarantee covers adding or removing one of its users. Merchants do
not share user ids, so a person who buys at k merchants is k records, one per node, and
gets k-fold exposure. ``k`` is the platform's declared bound (``max-merchants-per-person``);
nothing in a run can check it (ids are pseudonymous per merchant).

Nothing here computes ε itself; the run's own Opacus accountant does
(:class:`fedretain.privacy.accountant.Accountant`), on a history built as follows:

* **local mode** (DP-SGD on each node, independent data): the person's k records are
  touched by k independent mechanisms, so the person's history is k copies of the node's
  history (each ``(σ, q, steps)`` entry repeated k times) — plain composition;
* **aggregate mode** (one noise-once Gaussian over the SecAgg sum of clipped gradients): the
  person's k records add up to k clipped gradients in the same sum, so the sensitivity is
  k·C, i.e. the noise multiplier is σ/k. Each record is Poisson-sampled independently with
  rate q at its node, so the person is in a step's batch with probability 1 − (1 − q)^k
  (≤ k·q); with fewer than k of their records sampled the shift is smaller, and the Rényi
  divergence of that mixture is bounded by the one of the largest shift (joint convexity).
  The person history is therefore ``(σ/k, 1 − (1 − q)^k, steps)``.

δ is the run's δ for both the per-record and the person-level ε.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedretain.privacy.accountant import Accountant, DpEvent, PrivacyError
from fedretain.privacy.budget import RunPlan

TABLE_KS = (1, 2, 5)


class PersonCapExceeded(PrivacyError):
    """A run's person-level ε (at the declared k) exceeds the configured person-level cap."""


def person_history(mode: str, events: list[DpEvent], k: int) -> list[DpEvent]:
    """The mechanism history a person present at up to ``k`` merchants is exposed to (see module doc)."""
    if k < 1:
        raise PrivacyError(f"max-merchants-per-person must be >= 1, got {k}")
    if mode == "local":
        return [ev for _ in range(k) for ev in events]
    if mode == "aggregate":
        return [DpEvent(ev.noise_multiplier / k, 1.0 - (1.0 - ev.sample_rate) ** k, ev.steps) for ev in events]
    raise PrivacyError(f"no person-level accounting for DP mode {mode!r} (local or aggregate)")


def plan_events(plan: RunPlan) -> list[DpEvent]:
    """A reserved run's whole planned history: ``planned_steps`` steps at the plan's (σ, q)."""
    return [DpEvent(plan.noise_multiplier, plan.sample_rate, plan.planned_steps)]


def person_epsilon(plan: RunPlan, k: int) -> float:
    """ε of ``plan`` for a person at up to ``k`` merchants, by the plan's accountant at the plan's δ."""
    return Accountant(plan.accountant, person_history(plan.mode, plan_events(plan), k)).epsilon(plan.delta)


@dataclass(frozen=True)
class PersonRow:
    k: int
    per_record_epsilon: float
    person_epsilon: float
    delta: float
    mechanism: str

    def as_dict(self) -> dict[str, Any]:
        return {"k": self.k, "per_record_epsilon": self.per_record_epsilon, "person_epsilon": self.person_epsilon,
                "delta": self.delta, "mechanism": self.mechanism}


def person_table(plan: RunPlan, ks: tuple[int, ...] = TABLE_KS) -> list[PersonRow]:
    """Per-record vs person-level ε of one run plan for each k (for PRIVACY.md and run reports)."""
    per_record = person_epsilon(plan, 1)
    rows = []
    for k in ks:
        hist = person_history(plan.mode, plan_events(plan), k)
        what = (f"{k} × ({plan.noise_multiplier:.3f}, {plan.sample_rate:.4f}, {plan.planned_steps})"
                if plan.mode == "local" else
                f"(σ/{k}={hist[0].noise_multiplier:.3f}, q={hist[0].sample_rate:.4f}, {plan.planned_steps})")
        rows.append(PersonRow(k, per_record, person_epsilon(plan, k), plan.delta, f"{plan.accountant}: {what}"))
    return rows


def check_person_cap(plan: RunPlan, k: int, cap: float, where: str = "") -> float:
    """Person-level ε of ``plan`` at ``k``; raise :class:`PersonCapExceeded` if above ``cap`` (0: no cap)."""
    eps = person_epsilon(plan, k)
    if cap > 0 and eps > cap:
        raise PersonCapExceeded(
            f"{where + ': ' if where else ''}run {plan.run_id!r} ({plan.mode} mode, ε={plan.epsilon:g} per record) "
            f"gives a person at up to {k} merchants ε={eps:.3f}, above the person-level cap "
            f"person-epsilon-cap={cap:g}; refused before any training (lower target-epsilon, or the platform's "
            f"declared max-merchants-per-person)"
        )
    return eps
