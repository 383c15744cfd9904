"""Which local trainer a node uses for a round, from the server's train config.

The single place where the ClientApp picks plain training or DP-SGD, so privacy modes
plug in here without touching the message handling:

* ``none``      — plain local training (``fedretain.train.LocalTrainer``);
* ``local``     — DP-SGD on the node (``fedretain.privacy.dp_trainer.DPTrainer``), budget
  reserved in and spend recorded to the node's privacy ledger before anything is sent;
* ``central``   — plain local training; the server clips each update and adds noise
  (Flower's central-DP wrapper). Every node reports the same weight (``dp-weight`` = 1)
  because the server's noise is calibrated for an unweighted mean;
* ``aggregate`` — runs only through the SecAgg+ workflow (``fedretain.clients.secagg_app``);
  a plain train message asking for it is refused.

Any other value is refused (fail closed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ConfigRecord, Context
from torch import nn

from fedretain.clients.node import MerchantNode, Prepared
from fedretain.train import LocalTrainer, TrainConfig, TrainResult

CENTRAL_WEIGHT_KEY = "dp-weight"
_log = logging.getLogger(__name__)


def train_config(cfg: ConfigRecord, context: Context) -> TrainConfig:
    return TrainConfig(
        epochs=int(cfg.get("local-epochs", 2)),
        batch_size=int(cfg.get("batch-size", 256)),
        learning_rate=float(cfg.get("learning-rate", 0.01)),
        proximal_mu=float(cfg.get("proximal-mu", 0.0)),
        seed=int(cfg.get("server-round", 0)) * 7919 + int(context.node_id) % 7919,
    )


def dp_config(cfg: ConfigRecord):
    """The run's DP settings as sent by the server (validated; bad values fail closed)."""
    from fedretain.privacy.dp_trainer import DPConfig

    return DPConfig(
        target_epsilon=float(cfg.get("target-epsilon", 3.0)),
        target_delta=float(cfg.get("target-delta", 0.0)),
        max_grad_norm=float(cfg.get("max-grad-norm", 1.0)),
        accountant=str(cfg.get("dp-accountant", "rdp")),
        total_rounds=int(cfg["total-rounds"]),
        clipping=str(cfg.get("dp-clipping", "bk")),
        max_merchants_per_person=int(cfg.get("max-merchants-per-person", 1)),
        person_epsilon_cap=float(cfg.get("person-epsilon-cap", 0.0)),
    )


def local_dp_train_config(cfg: ConfigRecord, context: Context, node: MerchantNode, prep: Prepared) -> TrainConfig:
    """Local DP-SGD's training settings: with ``dp-schedule auto`` the batch is sized from this silo's own
    number of training users (``fedretain.privacy.schedule.local_batch_size``), decided here and never sent."""
    import dataclasses

    from fedretain.privacy.schedule import local_batch_size, local_schedule_note

    config = train_config(cfg, context)
    if str(cfg.get("dp-schedule", "fixed")) != "auto" or prep.n_train < 1:
        return config
    batch = local_batch_size(prep.n_train)
    note = local_schedule_note(prep.n_train, batch, "auto")["note"]
    if note:  # the node's own log: the count behind it stays on the node
        _log.warning("merchant %s: %s", node.merchant_id, note)
    return dataclasses.replace(config, batch_size=batch)


@dataclass(frozen=True)
class WeightedResult(TrainResult):
    extra_metrics: dict[str, float] | None = None


class CentralModeTrainer(LocalTrainer):
    """Plain local training for central DP: the server clips and noises; every node weighs 1."""

    def fit(self, model: nn.Module, x: np.ndarray, y: np.ndarray,
            global_params: list[torch.Tensor] | None = None) -> WeightedResult:
        r = super().fit(model, x, y, global_params)
        return WeightedResult(r.loss, r.num_examples, r.steps, {CENTRAL_WEIGHT_KEY: 1.0})


def make_trainer(cfg: ConfigRecord, context: Context, node: MerchantNode, prep: Prepared) -> LocalTrainer:
    """The trainer for this round (non-private unless the run asks for a DP mode)."""
    mode = str(cfg.get("dp-mode", "none"))
    if mode == "none":
        return LocalTrainer(train_config(cfg, context))
    if mode == "central":
        return CentralModeTrainer(train_config(cfg, context))
    if mode == "local":
        from fedretain.privacy.budget import ledger_path
        from fedretain.privacy.dp_trainer import DPTrainer

        if "total-rounds" not in cfg:
            raise RuntimeError("dp-mode local needs total-rounds in the train config (noise covers the whole run)")
        return DPTrainer(  # type: ignore[return-value]  # same fit() interface as LocalTrainer
            local_dp_train_config(cfg, context, node, prep), dp_config(cfg), ledger_path(node.config.state_dir),
            run_id=str(cfg.get("run-id", "")), purpose=str(cfg["purpose"]),
            server_round=int(cfg.get("server-round", 0)),
        )
    if mode == "aggregate":
        raise RuntimeError(
            "dp-mode 'aggregate' runs only through the SecAgg+ workflow (fedretain.server.secagg); "
            "refusing to train without secure aggregation"
        )
    raise RuntimeError(f"dp-mode {mode!r} is not available on this node")  # fail closed
