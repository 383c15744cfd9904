"""Local training on a merchant node (non-private path).

``LocalTrainer.fit`` is the one entry point the ClientApp calls each round; the DP
trainer in ``fedretain.privacy`` offers the same interface. FedProx's proximal term
is added here when the server asks for it (``proximal_mu > 0``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedretain.metrics import classification_report, spearman
from fedretain.models import RetentionLoss


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one round of local training."""

    epochs: int = 2
    batch_size: int = 256
    learning_rate: float = 0.01
    proximal_mu: float = 0.0
    ltv_weight: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.learning_rate <= 0 or self.proximal_mu < 0:
            raise ValueError(f"invalid training configuration: {self}")


@dataclass(frozen=True)
class TrainResult:
    loss: float
    num_examples: int
    steps: int


def to_targets(repurchase: np.ndarray, spend: np.ndarray) -> np.ndarray:
    """Stack the two training targets: [buys again (0/1), log1p(spend)]."""
    return np.stack([np.asarray(repurchase, np.float32), np.log1p(np.asarray(spend, np.float32))], axis=1)


SGD_LR_SCALE = 2.0  # a logistic regression's SGD step is learning-rate × this (see make_optimizer)


def make_optimizer(model: nn.Module, learning_rate: float) -> torch.optim.Optimizer:
    """Adam for the MLP; plain SGD with ``learning_rate × SGD_LR_SCALE`` for a logistic regression.

    Why SGD for the convex model: FedAvg of local *Adam* runs on heterogeneous merchants converges
    to a biased point — Adam rescales every node's steps to about ``lr`` per coordinate whatever its
    gradient, so a seller with 3 customers pulls as hard per step as one with 3,000. Local SGD steps
    are proportional to the gradient, and their example-weighted mean approaches the pooled optimum
    (bench/bench_models.py, validation users of the rare-repeat marketplace: 0.839 AUC with SGD,
    0.828 with Adam). The scale is small because the public input transform (fedretain.transforms)
    does not centre on the data: typical columns sit near -3 with spread ~0.5, so ‖x‖² reaches
    ~300 and an SGD step above ~0.03 makes the LTV head (squared error) diverge to inf/NaN; at
    0.02 (the default learning-rate 0.01 × 2) it is stable on every benchmark dataset.
    """
    if len(getattr(model, "hidden", (0,))) == 0:
        return torch.optim.SGD(model.parameters(), lr=learning_rate * SGD_LR_SCALE)
    return torch.optim.Adam(model.parameters(), lr=learning_rate)


class LocalTrainer:
    """Mini-batch Adam (SGD for a logistic regression) on the node's own training users."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config

    def fit(
        self, model: nn.Module, x: np.ndarray, y: np.ndarray, global_params: list[torch.Tensor] | None = None
    ) -> TrainResult:
        cfg = self.config
        if len(x) == 0:
            raise ValueError("no training examples on this node")
        gen = torch.Generator().manual_seed(cfg.seed)
        xt = torch.as_tensor(x, dtype=torch.float32)
        yt = torch.as_tensor(y, dtype=torch.float32)
        criterion = RetentionLoss(cfg.ltv_weight)
        optimizer = make_optimizer(model, cfg.learning_rate)
        model.train()
        total, seen, steps = 0.0, 0, 0
        for _ in range(cfg.epochs):
            perm = torch.randperm(len(xt), generator=gen)
            for start in range(0, len(xt), cfg.batch_size):
                idx = perm[start : start + cfg.batch_size]
                optimizer.zero_grad()
                loss = criterion(model(xt[idx]), yt[idx])
                if cfg.proximal_mu > 0 and global_params is not None:
                    prox = sum(((p - g) ** 2).sum() for p, g in zip(model.parameters(), global_params))
                    loss = loss + cfg.proximal_mu / 2.0 * prox
                loss.backward()
                optimizer.step()
                total += loss.item() * len(idx)
                seen += len(idx)
                steps += 1
        return TrainResult(loss=total / max(seen, 1), num_examples=len(xt), steps=steps)


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(probability of buying again within the horizon, predicted spend in the horizon)."""
    model.eval()
    out = model(torch.as_tensor(x, dtype=torch.float32))
    prob = torch.sigmoid(out[:, 0].double()).numpy()  # float64 before the sigmoid: full precision near 0 and 1
    # softplus keeps the order of predictions below 0 (most users of a rare-repeat shop): a clamp at 0
    # would tie them all and destroy the LTV ranking; ≈ expm1(out) for out >> 0.
    ltv = np.expm1(torch.nn.functional.softplus(out[:, 1].double()).clamp(max=20.0).numpy())
    return prob, ltv


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, ltv_weight: float = 0.2) -> dict[str, float]:
    """Loss, AUC, log loss, Brier, calibration error and LTV rank correlation on held-out users."""
    if len(x) == 0:  # same keys as a real report, so replies stay consistent across nodes
        keys = ("auc", "log_loss", "brier", "ece", "base_rate", "mean_pred", "loss", "ltv_spearman")
        return {**{k: float("nan") for k in keys}, "num_examples": 0}
    model.eval()
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.float32)
    loss = RetentionLoss(ltv_weight)(model(xt), yt).item()
    prob, ltv = predict(model, x)
    report = classification_report(y[:, 0], prob)
    report.update(loss=loss, ltv_spearman=spearman(ltv, np.expm1(y[:, 1])), num_examples=len(x))
    return report
