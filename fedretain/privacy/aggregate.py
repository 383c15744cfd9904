"""Aggregate mode: federated DP-SGD with the noise added once, to the securely summed gradients.

Per-merchant DP-SGD (``local`` mode) calibrates noise to each merchant's own data, so a
merchant with a hundred customers sends an update that is mostly noise. In aggregate
mode every round is one DP-SGD step over *all* merchants' customers:

1. every merchant Poisson-samples its customers with the same rate q, computes the
   sum of their per-example gradients each clipped to norm C (no noise), and sends it
   under SecAgg+ — the server learns only the sum over merchants;
2. the server adds Gaussian noise σ·C' to that sum and takes an optimizer step
   (Opacus's DP optimizer: noise, averaging by the expected batch q·N, Adam).

For one customer record this is exactly centralized DP-SGD (sampling rate q, noise
multiplier σ, one step per round), so it is accounted with the same Opacus
accountant as local mode, by the server and independently by every node, which
checks the server's (σ, q, rounds, δ) against its own target before sending anything.

SecAgg+ sums integers: Flower clips each value to ±R (R = 8) and stochastically rounds
it to a grid of step Δ = 2R/2²². Nodes therefore send ``clamp(sum / S, ±R)`` with a
public scale S = C·B/R (B the expected batch). Clamping each coordinate is 1-Lipschitz,
and rounding moves each coordinate by less than Δ whatever the data, so one record
changes the summed vector by at most C' = C + S·Δ·√D in L2 (D parameters); the server's
noise is calibrated to C', not C (≈3% more noise at B = 1024).

Trust: the noise is added by the server, so the guarantee holds against everyone who
sees the model or its updates afterwards (other merchants, model users, outsiders), and
against the server only as far as SecAgg+ hides each merchant's sum: an
honest-but-curious server sees the un-noised sum of clipped gradients of all merchants.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedretain.models import RetentionLoss
from fedretain.privacy.accountant import (
    DEFAULT_ACCOUNTANT,
    Accountant,
    DpEvent,
    PrivacyError,
    calibrate,
    check_accountant,
    default_delta,
)
from fedretain.privacy.budget import EPS_SLACK, BudgetExceeded, BudgetLedger, RunPlan
from fedretain.privacy.dp_trainer import LinearCapture, check_model, dp_optimizer, secure_generator

SECAGG_CLIPPING_RANGE = 8.0  # Flower SecAggPlusWorkflow defaults; the server passes them explicitly
SECAGG_QUANTIZATION_RANGE = 2**22


@dataclass(frozen=True)
class AggregatePlan:
    """The run's mechanism, decided by the server and verified by every node."""

    target_epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    rounds: int
    max_grad_norm: float
    expected_batch: float
    scale: float
    accountant: str = DEFAULT_ACCOUNTANT
    clipping_range: float = SECAGG_CLIPPING_RANGE
    quantization_range: int = SECAGG_QUANTIZATION_RANGE

    @property
    def quantization_step(self) -> float:
        return 2.0 * self.clipping_range / self.quantization_range

    def sensitivity(self, n_params: int) -> float:
        """L2 change of the securely summed vector (unscaled) when one record is added or removed."""
        return self.max_grad_norm + self.scale * self.quantization_step * math.sqrt(n_params)

    def epsilon(self) -> float:
        return Accountant(self.accountant, [DpEvent(self.noise_multiplier, self.sample_rate, self.rounds)]).epsilon(
            self.delta)

    def to_config(self) -> dict[str, Any]:
        return {f"agg-{k.replace('_', '-')}": v for k, v in asdict(self).items()}

    @classmethod
    def from_config(cls, cfg: Any) -> AggregatePlan:
        try:
            kw = {f.name: cfg[f"agg-{f.name.replace('_', '-')}"] for f in fields(cls)}
        except KeyError as exc:
            raise PrivacyError(f"aggregate-mode config lacks {exc}: refusing to contribute") from None
        types = {"rounds": int, "quantization_range": int, "accountant": str}
        return cls(**{k: types.get(k, float)(v) for k, v in kw.items()})


def plan_aggregate(target_epsilon: float, target_delta: float, n_total: int, expected_batch: float, rounds: int,
                   max_grad_norm: float, accountant: str = DEFAULT_ACCOUNTANT) -> AggregatePlan:
    """σ for ``rounds`` steps at q = B/N so that every record's (ε, δ) holds over the whole run."""
    check_accountant(accountant)
    if n_total < 1 or expected_batch <= 0:
        raise PrivacyError(f"aggregate mode needs records and a positive batch (N={n_total}, B={expected_batch})")
    q = min(1.0, float(expected_batch) / n_total)
    delta = target_delta or default_delta(n_total)
    if delta >= 1.0 / n_total:
        raise PrivacyError(f"δ={delta:g} is not below 1/N = {1.0 / n_total:g}")
    sigma = calibrate(float(target_epsilon), float(delta), q, int(rounds), accountant)
    batch = q * n_total
    return AggregatePlan(float(target_epsilon), float(delta), sigma, q, int(rounds), float(max_grad_norm), batch,
                         scale=float(max_grad_norm) * batch / SECAGG_CLIPPING_RANGE, accountant=accountant)


def node_contribution(model: nn.Module, x: np.ndarray, y: np.ndarray, plan: AggregatePlan,
                      generator: torch.Generator, ltv_weight: float = 0.2) -> list[np.ndarray]:
    """One merchant's share of a step: clamp(Σ_{i∈Poisson(q)} clip_C(∇ loss_i) / S, ±R), per parameter."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    model = model.train()
    check_model(model, "bk")
    [idx] = list(UniformWithReplacementSampler(num_samples=len(x), sample_rate=plan.sample_rate,
                                               generator=generator, steps=1))
    idx = torch.as_tensor(idx, dtype=torch.long)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    if len(idx):
        capture = LinearCapture(model)
        try:
            xb = torch.as_tensor(x, dtype=torch.float32)[idx]
            yb = torch.as_tensor(y, dtype=torch.float32)[idx]
            capture.clipped_grad_sum(RetentionLoss(ltv_weight, reduction="none")(model(xb), yb), plan.max_grad_norm)
        finally:
            capture.remove()
    r = plan.clipping_range
    grads = [p.grad for p in model.parameters()]
    if any(g is None for g in grads):
        raise PrivacyError("a model parameter has no clipped gradient sum: refusing to contribute")
    return [np.clip(g.detach().numpy().astype(np.float64) / plan.scale, -r, r) for g in grads if g is not None]


def contribute(ledger_file: str | Path, run_id: str, purpose: str, server_round: int, plan: AggregatePlan,
               model: nn.Module, x: np.ndarray, y: np.ndarray, *, noise_seed: int | None = None
               ) -> tuple[list[np.ndarray], dict[str, float]]:
    """A node's whole aggregate-mode round: verify the plan, reserve/check budget, compute, record the spend.

    Refuses (raising, having written nothing) if the server's mechanism would spend more
    than the target ε it announced, if δ is not below 1/n, if the lifetime budget has no
    room for the run, or if the run already used all its rounds.
    """
    n = len(x)
    if n < 1:
        raise PrivacyError("no training records on this node")
    if plan.delta >= 1.0 / n:
        raise PrivacyError(f"aggregate plan δ={plan.delta:g} is not below 1/n = {1.0 / n:g} on this node")
    with BudgetLedger.open(ledger_file) as ledger:
        stored = ledger.run(run_id, purpose)
        if stored is None:
            ledger.check_room(run_id, purpose, plan.target_epsilon, plan.delta)
            eps = plan.epsilon()  # the node's own accounting of the server's mechanism
            if eps > plan.target_epsilon + EPS_SLACK:
                raise PrivacyError(
                    f"the server's aggregate plan (σ={plan.noise_multiplier:.4f}, q={plan.sample_rate:.5f}, "
                    f"{plan.rounds} rounds) spends ε={eps:.3f} > the announced ε={plan.target_epsilon:g}; refused"
                )
        stored = ledger.reserve(RunPlan(
            run_id=run_id, purpose=purpose, mode="aggregate", accountant=plan.accountant,
            epsilon=plan.target_epsilon, delta=plan.delta, noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate, planned_steps=plan.rounds, n_records=n,
        ))
        accountant = ledger.accountant_for(run_id, purpose)
        if accountant.steps + 1 > stored.planned_steps:
            raise BudgetExceeded(f"run {run_id!r} already took its {stored.planned_steps} aggregate steps on this "
                                 f"node (a retried or extra round?); refused")
        arrays = node_contribution(model, x, y, plan, secure_generator(noise_seed))
        accountant.add(DpEvent(plan.noise_multiplier, plan.sample_rate, 1))
        spend = ledger.record_spend(run_id, purpose, server_round, 1, accountant)
    metrics = {"epsilon": float(spend.epsilon), "delta": float(plan.delta),
               "noise-multiplier": float(plan.noise_multiplier), "dp-steps": int(spend.total_steps)}
    return arrays, metrics


class ServerDPSGD:
    """The server's half of a step: noise σ·C' on the securely summed clipped gradients, then Adam.

    Noise, averaging by the expected batch and accounting are Opacus's
    (``DPOptimizerFastGradientClipping`` with secure-mode sampling, and its accountant hook).
    """

    def __init__(self, model: nn.Module, plan: AggregatePlan, learning_rate: float,
                 noise_seed: int | None = None) -> None:
        self.model = model
        self.plan = plan
        n_params = sum(p.numel() for p in model.parameters())
        self.sensitivity = plan.sensitivity(n_params)
        self.accountant = Accountant(plan.accountant)
        self.optimizer = dp_optimizer(torch.optim.Adam(model.parameters(), lr=learning_rate), plan.noise_multiplier,
                                      self.sensitivity, plan.expected_batch, secure_generator(noise_seed))
        self.optimizer.attach_step_hook(self.accountant.hook(plan.sample_rate))

    def step(self, scaled_sum: list[np.ndarray]) -> float:
        """Apply one noisy step from Σ_merchants clamp(sum/S); return ε spent so far (per record)."""
        params = list(self.model.parameters())
        if len(scaled_sum) != len(params) or any(s.shape != tuple(p.shape) for s, p in zip(scaled_sum, params)):
            raise PrivacyError("securely aggregated vector does not match the model's parameters")
        if self.accountant.steps >= self.plan.rounds:
            raise BudgetExceeded(f"all {self.plan.rounds} planned aggregate steps were taken; refusing another")
        self.optimizer.zero_grad(set_to_none=True)
        for p, s in zip(params, scaled_sum):
            p.grad = torch.as_tensor(np.asarray(s, dtype=np.float64) * self.plan.scale, dtype=p.dtype)
        self.optimizer.step()
        return self.accountant.epsilon(self.plan.delta)

    def step_mean(self, secagg_mean: list[np.ndarray], contributors: int) -> float:
        """One step from what SecAgg+ hands the strategy: the mean of ``contributors`` weight-1 vectors.

        The ServerApp (``server/secagg.py``) and the in-process benchmark both step through here."""
        if contributors < 1:
            raise PrivacyError("no merchant contributed to this aggregate step")
        return self.step([np.asarray(a, dtype=np.float64) * contributors for a in secagg_mean])
