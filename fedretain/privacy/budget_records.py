"""The privacy ledger's records: cap events, run reservations, per-round spends (plain data)."""

from __future__ import annotations

from dataclasses import dataclass

from fedretain.privacy.accountant import PrivacyError


class BudgetExceeded(PrivacyError):
    """A run would take the node past its lifetime cap or a purpose past its sub-limit (or no cap is set)."""


@dataclass(frozen=True)
class Budget:
    """A cap event: the node-wide cap (``purpose == NODE``) or a purpose's sub-limit, as set at ``set_at``."""

    purpose: str
    epsilon: float
    delta: float | None
    set_at: str
    note: str = ""
    previous_epsilon: float | None = None
    previous_delta: float | None = None
    key_fingerprint: str = ""
    signature_hex: str = ""

    @property
    def kind(self) -> str:
        """initial, raise (ε or δ up, or a δ limit removed), lower, or same."""
        if self.previous_epsilon is None:
            return "initial"
        return "raise" if _raises(self.previous_epsilon, self.previous_delta, self.epsilon, self.delta) else (
            "same" if (self.epsilon, self.delta) == (self.previous_epsilon, self.previous_delta) else "lower")


def _raises(old_eps: float, old_delta: float | None, eps: float, delta: float | None) -> bool:
    return eps > old_eps or (old_delta is not None and (delta is None or delta > old_delta))


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

    def same_mechanism(self, other: RunPlan) -> bool:
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
