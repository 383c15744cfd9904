"""Strategy set-up: Flower's own FedAvg / FedProx with fedretain's metric aggregation."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg, FedProx, Strategy

from fedretain.server.federation import weighted_mean
from fedretain.server.settings import RunSettings


def build_strategy(settings: RunSettings) -> Strategy:
    """FedAvg, or FedProx for non-IID merchants (the client adds the proximal term)."""
    common = dict(
        fraction_train=settings.fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=settings.min_nodes,
        min_evaluate_nodes=settings.min_nodes,
        min_available_nodes=settings.min_nodes,
        train_metrics_aggr_fn=weighted_mean,
        evaluate_metrics_aggr_fn=weighted_mean,
    )
    if settings.strategy == "fedprox":
        return FedProx(proximal_mu=settings.proximal_mu, **common)
    return FedAvg(**common)
