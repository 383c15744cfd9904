"""DP-SGD on a merchant node, with the same interface as ``fedretain.train.LocalTrainer``.

Each round the node trains a *copy* of the global model with DP-SGD — Poisson
sampling with rate q, per-example gradient clipping to norm C, Gaussian noise σ·C on
the clipped sum — and copies the result back into the plain model, which is what the
ClientApp sends. The noise multiplier σ is calibrated once per run for all of the
run's local steps (``total-rounds`` × ``local-epochs`` × 1/q) and reserved in the
node's privacy ledger before the first step; each round's spend (and the
accountant's history) is appended to the ledger before the update leaves the node.

Per-example clipping has two implementations, selected by ``DPConfig.clipping``:

``"bk"`` (default)
    Book-keeping clipping for networks whose parameters all live in ``nn.Linear``
    layers (the retention MLP): one forward and one backward pass to the layer
    outputs give each example's gradient norm exactly (‖∇W_i‖² = ‖a_i‖²‖g_i‖², the
    ghost-norm identity), and the clipped sum is one matrix product per layer. No
    second backward pass and no per-example gradient tensors, so it costs about
    2× a non-private step on a 2-core CPU, where Opacus's ghost clipping costs
    ≈3.5×. Tests check it against Opacus's own per-sample gradients.
``"ghost"``
    Opacus's ghost clipping (``grad_sample_mode="ghost"``) for any model Opacus supports.

Sampling, noise and accounting are Opacus's in both cases: ``UniformWithReplacementSampler``
(Poisson), ``DPOptimizerFastGradientClipping`` (noise, ``secure_mode`` sampling that
resists floating-point attacks) and the accountant's optimizer hook. Both random
sources are seeded from ``os.urandom`` — never from the round number — unless a
benchmark passes ``noise_seed``.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedretain.models import RetentionLoss
from fedretain.privacy.accountant import (
    DEFAULT_ACCOUNTANT,
    Accountant,
    PrivacyError,
    calibrate,
    check_accountant,
    default_delta,
)
from fedretain.privacy.budget import BudgetExceeded, BudgetLedger, RunPlan
from fedretain.privacy.person import check_person_cap
from fedretain.train import TrainConfig, TrainResult, make_optimizer

CLIPPING_MODES = ("bk", "ghost")
DP_METRIC_KEYS = ("epsilon", "delta", "noise-multiplier", "dp-steps")


@dataclass(frozen=True)
class DPConfig:
    """Privacy settings of one run on one node."""

    target_epsilon: float = 3.0
    target_delta: float = 0.0  # 0 → default_delta(n): below 1/n of this node's records
    max_grad_norm: float = 1.0
    accountant: str = DEFAULT_ACCOUNTANT
    total_rounds: int = 1
    clipping: str = "bk"
    noise_seed: int | None = None  # benchmarks only; None → seeded from os.urandom
    max_merchants_per_person: int = 1  # the platform's declared bound k (fedretain.privacy.person)
    person_epsilon_cap: float = 0.0  # refuse a run whose person-level ε at k exceeds this; 0 = no cap

    def __post_init__(self) -> None:
        if not (self.target_epsilon > 0 and math.isfinite(self.target_epsilon)):
            raise PrivacyError(f"target ε must be positive and finite, got {self.target_epsilon}")
        if not 0 <= self.target_delta < 1:
            raise PrivacyError(f"target δ must be in [0, 1), got {self.target_delta}")
        if not self.max_grad_norm > 0:
            raise PrivacyError(f"max-grad-norm must be positive, got {self.max_grad_norm}")
        if self.total_rounds < 1:
            raise PrivacyError(f"total-rounds must be >= 1, got {self.total_rounds}")
        if self.clipping not in CLIPPING_MODES:
            raise PrivacyError(f"unknown clipping {self.clipping!r}; choose one of {', '.join(CLIPPING_MODES)}")
        check_accountant(self.accountant)
        if self.max_merchants_per_person < 1:
            raise PrivacyError(f"max-merchants-per-person must be >= 1, got {self.max_merchants_per_person}")
        if not (self.person_epsilon_cap >= 0 and math.isfinite(self.person_epsilon_cap)):
            raise PrivacyError(f"person-epsilon-cap must be >= 0 (0: no cap), got {self.person_epsilon_cap}")


@dataclass(frozen=True)
class DPTrainResult(TrainResult):
    """A round's result plus the privacy numbers the node reports (same keys on every node)."""

    extra_metrics: dict[str, float] = field(default_factory=dict)


def secure_generator(seed: int | None = None) -> torch.Generator:
    """A torch generator seeded from the OS entropy pool (or ``seed``, for benchmarks)."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") if seed is None else int(seed))


def check_model(model: nn.Module, clipping: str) -> None:
    """Fail closed on models DP-SGD cannot handle (Opacus's validator; Linear-only for ``bk``)."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise PrivacyError(f"model is not DP-SGD compatible (Opacus validator): {errors}")
    if clipping == "bk":
        for name, mod in model.named_modules():
            own = [p for p in mod.parameters(recurse=False) if p.requires_grad]
            if own and not isinstance(mod, nn.Linear):
                raise PrivacyError(
                    f"bk clipping supports nn.Linear layers only; {name or 'model'} is {type(mod).__name__} "
                    f"(use clipping='ghost')"
                )


class LinearCapture:
    """Forward hooks that keep each Linear layer's input and output for book-keeping clipping."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
        self.inputs: dict[nn.Module, torch.Tensor] = {}
        self.outputs: dict[nn.Module, torch.Tensor] = {}
        self._handles = [m.register_forward_hook(self._hook) for m in self.layers]

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if inputs[0].dim() != 2:
            raise PrivacyError("bk clipping expects 2-D (batch, features) inputs to Linear layers")
        self.inputs[module] = inputs[0]
        self.outputs[module] = output

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def clipped_grad_sum(self, per_sample_loss: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
        """Set ``p.grad`` = Σ_i clip_C(∇ loss_i) for every Linear parameter; return the per-example norms."""
        layers = [m for m in self.layers if m in self.outputs]
        grads = torch.autograd.grad(per_sample_loss.sum(), [self.outputs[m] for m in layers])
        norm2 = torch.zeros(per_sample_loss.shape[0], dtype=per_sample_loss.dtype)
        for m, g in zip(layers, grads):
            g2 = (g * g).sum(dim=1)
            if m.weight.requires_grad:
                a = self.inputs[m]
                norm2 = norm2 + (a * a).sum(dim=1) * g2
            if m.bias is not None and m.bias.requires_grad:
                norm2 = norm2 + g2
        norms = norm2.sqrt()
        factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for m, g in zip(layers, grads):
            gc = g * factor[:, None]
            if m.weight.requires_grad:
                m.weight.grad = gc.T @ self.inputs[m]
            if m.bias is not None and m.bias.requires_grad:
                m.bias.grad = gc.sum(dim=0)
        self.inputs.clear()
        self.outputs.clear()
        return norms


def run_delta(n: int, dp: DPConfig) -> float:
    """The run's δ: as configured, or below 1/n of this node's records; refused if not below 1/n."""
    delta = dp.target_delta or default_delta(n)
    if delta >= 1.0 / n:
        raise PrivacyError(f"δ={delta:g} is not below 1/n = {1.0 / n:g} for this node's {n} records")
    return delta


def dp_optimizer(optimizer: torch.optim.Optimizer, noise_multiplier: float, max_grad_norm: float,
                 expected_batch_size: float, generator: torch.Generator) -> Any:
    """Opacus's noise-adding optimizer for pre-clipped gradients (secure-mode noise sampling).

    Identical to ``DPOptimizerFastGradientClipping`` except for two per-step costs that
    dominate on a small model (one noise draw for all parameters, ``clone`` instead of
    ``deepcopy``); the override touches private Opacus names, so it lives in
    :mod:`fedretain.compat.opacus`.
    """
    from fedretain.compat.opacus import fused_dp_optimizer

    return fused_dp_optimizer(optimizer, noise_multiplier, max_grad_norm, expected_batch_size, generator)


def plan_run(run_id: str, purpose: str, n: int, train: TrainConfig, dp: DPConfig) -> RunPlan:
    """The whole run's mechanism: q = 1/⌈n/B⌉, all rounds' steps, σ for the target (ε, δ)."""
    if n < 1:
        raise PrivacyError("no training records on this node")
    batches = math.ceil(n / train.batch_size)
    q = 1.0 / batches
    steps = dp.total_rounds * train.epochs * batches
    delta = run_delta(n, dp)
    sigma = calibrate(dp.target_epsilon, delta, q, steps, dp.accountant)
    return RunPlan(run_id=run_id, purpose=purpose, mode="local", accountant=dp.accountant,
                   epsilon=float(dp.target_epsilon), delta=float(delta), noise_multiplier=sigma,
                   sample_rate=q, planned_steps=int(steps), n_records=int(n))


class DPTrainer:
    """DP-SGD local training that reserves and records its privacy spend in the node's ledger."""

    def __init__(self, config: TrainConfig, dp: DPConfig, ledger_path: str | Path, run_id: str, purpose: str,
                 server_round: int) -> None:
        if not run_id:
            raise PrivacyError("a DP run needs a run id (the ledger accounts spend per run)")
        self.config = config
        self.dp = dp
        self.ledger_path = Path(ledger_path)
        self.run_id = str(run_id)
        self.purpose = str(purpose)
        self.server_round = int(server_round)

    def fit(self, model: nn.Module, x: np.ndarray, y: np.ndarray,
            global_params: list[torch.Tensor] | None = None) -> DPTrainResult:
        private = copy.deepcopy(model).train()  # privatise a copy; the plain model is what gets sent
        check_model(private, self.dp.clipping)
        n = len(x)
        with BudgetLedger.open(self.ledger_path) as ledger:
            plan = ledger.run(self.run_id, self.purpose)
            if plan is None:  # a new run: check the budget first (cheap), then calibrate and reserve
                ledger.check_room(self.run_id, self.purpose, self.dp.target_epsilon, run_delta(n, self.dp))
                plan = plan_run(self.run_id, self.purpose, n, self.config, self.dp)
            # a person at up to k merchants: refused before anything is reserved or trained
            check_person_cap(plan, self.dp.max_merchants_per_person, self.dp.person_epsilon_cap, where="local DP-SGD")
            plan = ledger.reserve(plan)  # refuses before any training
            if plan.mode != "local":
                raise PrivacyError(f"run {self.run_id!r} reserved mode {plan.mode!r}, not local DP-SGD")
            accountant = ledger.accountant_for(self.run_id, self.purpose)
            batches = round(1.0 / plan.sample_rate)
            steps = self.config.epochs * batches
            # ε grows with steps at the plan's fixed (σ, q), and the plan's steps spend at most the
            # reserved ε, so "within the planned steps" is exactly "within the reservation".
            if any((ev.noise_multiplier, ev.sample_rate) != (plan.noise_multiplier, plan.sample_rate)
                   for ev in accountant.history):
                raise PrivacyError(f"run {self.run_id!r}: stored accountant history does not match the run's plan")
            if accountant.steps + steps > plan.planned_steps:
                raise BudgetExceeded(
                    f"round {self.server_round} of run {self.run_id!r} would take {accountant.steps + steps} DP "
                    f"steps, past the {plan.planned_steps} planned for the run's reservation ε={plan.epsilon:g} "
                    f"(a retried or extra round?); refused before training"
                )
            before = accountant.steps
            self._train(private, x, y, plan, accountant, steps, global_params)
            if accountant.steps - before != steps:
                raise PrivacyError(f"accountant recorded {accountant.steps - before} steps, expected {steps}")
            spend = ledger.record_spend(self.run_id, self.purpose, self.server_round, steps, accountant)
        model.load_state_dict(private.state_dict())
        metrics = {"epsilon": float(spend.epsilon), "delta": float(plan.delta),
                   "noise-multiplier": float(plan.noise_multiplier), "dp-steps": int(spend.total_steps)}
        # The training loss is a statistic of the raw data: not released under DP.
        return DPTrainResult(loss=float("nan"), num_examples=n, steps=steps, extra_metrics=metrics)

    # -- the DP-SGD loop -----------------------------------------------------------------
    def _train(self, model: nn.Module, x: np.ndarray, y: np.ndarray, plan: RunPlan, accountant: Accountant,
               steps: int, global_params: list[torch.Tensor] | None) -> None:
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        cfg, dp = self.config, self.dp
        gen = secure_generator(dp.noise_seed)
        xt = torch.as_tensor(x, dtype=torch.float32)
        yt = torch.as_tensor(y, dtype=torch.float32)
        expected = max(plan.n_records * plan.sample_rate, 1.0)  # data-independent averaging denominator
        base = make_optimizer(model, cfg.learning_rate)  # as without DP: Adam for the MLP, SGD for logreg
        model.train()
        criterion = RetentionLoss(cfg.ltv_weight, reduction="none")
        if dp.clipping == "ghost":
            optimizer, criterion, model_call = self._opacus_ghost(model, base, criterion, plan, expected, gen)
        else:
            optimizer = dp_optimizer(base, plan.noise_multiplier, dp.max_grad_norm, expected, gen)
            capture = LinearCapture(model)
            model_call = model
        optimizer.attach_step_hook(accountant.hook(plan.sample_rate))
        # steps= explicitly: Opacus's default int(1/q) is off by one for some q (int(1/(1/93)) == 92)
        sampler = UniformWithReplacementSampler(num_samples=len(xt), sample_rate=plan.sample_rate, generator=gen,
                                                steps=round(1.0 / plan.sample_rate))
        done = 0
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Full backward hook is firing")  # Opacus ghost; harmless
                for _ in range(cfg.epochs):
                    for idx in sampler:
                        self._step(model, model_call, optimizer, criterion, capture if dp.clipping == "bk" else None,
                                   xt, yt, torch.as_tensor(idx, dtype=torch.long), global_params)
                        done += 1
        finally:
            if dp.clipping == "bk":
                capture.remove()
        if done != steps:
            raise PrivacyError(f"ran {done} DP steps, planned {steps}")

    def _step(self, model: nn.Module, model_call: Any, optimizer: Any, criterion: Any, capture: Any,
              xt: torch.Tensor, yt: torch.Tensor, idx: torch.Tensor,
              global_params: list[torch.Tensor] | None) -> None:
        """One DP-SGD step: clipped sum into p.grad, then Opacus adds noise, scales and accounts."""
        optimizer.zero_grad(set_to_none=True)
        out = model_call(xt[idx])
        if capture is None:  # Opacus ghost clipping: its loss wrapper does both backward passes
            criterion(out, yt[idx]).backward()
        elif len(idx):
            capture.clipped_grad_sum(criterion(out, yt[idx]), self.dp.max_grad_norm)
        else:  # empty Poisson batch: the step still happens (noise only) and is accounted
            capture.inputs.clear()
            capture.outputs.clear()
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
        if optimizer.pre_step():
            mu = self.config.proximal_mu
            if mu > 0 and global_params is not None:  # FedProx term after the noise: post-processing, no cost
                for p, g in zip(model.parameters(), global_params):
                    if p.grad is not None:  # every trainable parameter has one after the noise step
                        p.grad.add_(p.detach() - g, alpha=mu)
            optimizer.original_optimizer.step()

    def _opacus_ghost(self, model: nn.Module, base: torch.optim.Optimizer, criterion: Any, plan: RunPlan,
                      expected: float, gen: torch.Generator) -> tuple[Any, Any, Any]:
        """Opacus's own ghost clipping (any Opacus-supported model), sharing our sampler and accountant."""
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gsm = GradSampleModuleFastGradientClipping(
                model, batch_first=True, loss_reduction="mean", max_grad_norm=self.dp.max_grad_norm,
                use_ghost_clipping=True,
            )
        optimizer = dp_optimizer(base, plan.noise_multiplier, self.dp.max_grad_norm, expected, gen)
        criterion.reduction = "mean"
        loss = DPLossFastGradientClipping(gsm, optimizer, criterion, loss_reduction="mean")
        return optimizer, loss, gsm
