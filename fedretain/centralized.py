"""The yardstick: the same model trained on all merchants' data pooled in one place.

Pooling is exactly what fedretain exists to avoid; this is used only by the demo and
benchmarks, on data the caller already holds (synthetic or research data), to report
how much the federated model gives up. Same consent gate, features, split and model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedretain.models import ModelBundle, RetentionNet, Standardizer
from fedretain.train import LocalTrainer, TrainConfig, evaluate


@dataclass
class Pooled:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def pool(prepared: Sequence) -> Pooled:
    """Stack the per-node train and test sets (each node's own held-out users stay held out)."""
    return Pooled(
        np.concatenate([p.x_train for p in prepared]), np.concatenate([p.y_train for p in prepared]),
        np.concatenate([p.x_test for p in prepared]), np.concatenate([p.y_test for p in prepared]),
    )


def train_centralized(
    pooled: Pooled, hidden: Sequence[int] = (64, 32), epochs: int = 10, learning_rate: float = 0.01,
    batch_size: int = 256, seed: int = 0,
) -> tuple[RetentionNet, Standardizer, dict[str, float]]:
    """Train on the pooled training users; metrics on the pooled held-out users."""
    torch.manual_seed(seed)
    scaler = Standardizer.fit(pooled.x_train)
    model = RetentionNet(pooled.x_train.shape[1], hidden)
    LocalTrainer(TrainConfig(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed)).fit(
        model, scaler.transform(pooled.x_train), pooled.y_train
    )
    return model, scaler, evaluate(model, scaler.transform(pooled.x_test), pooled.y_test)


def evaluate_bundle(bundle: ModelBundle, pooled: Pooled) -> dict[str, float]:
    """Metrics of a (federated) global model on the same pooled held-out users."""
    return evaluate(bundle.build_model(), bundle.standardizer.transform(pooled.x_test), pooled.y_test)
