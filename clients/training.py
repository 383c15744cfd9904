"""Which local trainer a node uses for a round, from the server's train config.

The single place where the ClientApp picks plain training or DP-SGD, so privacy modes
plug in here without touching the message handling.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context

from fedretain.clients.node import MerchantNode, Prepared
from fedretain.train import LocalTrainer, TrainConfig


def train_config(cfg: ConfigRecord, context: Context) -> TrainConfig:
    return TrainConfig(
        epochs=int(cfg.get("local-epochs", 2)),
        batch_size=int(cfg.get("batch-size", 256)),
        learning_rate=float(cfg.get("learning-rate", 0.01)),
        proximal_mu=float(cfg.get("proximal-mu", 0.0)),
        seed=int(cfg.get("server-round", 0)) * 7919 + int(context.node_id) % 7919,
    )


def make_trainer(cfg: ConfigRecord, context: Context, node: MerchantNode, prep: Prepared) -> LocalTrainer:
    """The trainer for this round (non-private unless the run asks for a DP mode)."""
    mode = str(cfg.get("dp-mode", "none"))
    if mode != "none":
        raise RuntimeError(f"dp-mode {mode!r} is not available on this node")  # fail closed
    return LocalTrainer(train_config(cfg, context))
