"""The SecAgg+ ClientApp: a merchant node's side of a run whose updates are securely summed.

In flwr 1.42 SecAgg+ exists only for the legacy stack (``NumPyClient`` behind
``secaggplus_mod``, driven by the server's ``SecAggPlusWorkflow``). This app wraps that
legacy client in a Message-API ``ClientApp`` whose replies pass the same egress guard
(``fedretain.egress``) as the regular app's.

What a node sends per round depends on the run's ``dp-mode``:

* ``none`` / ``local`` — its trained model (plain or DP-SGD, ``clients/training.py``),
  with the public weight 1 (no count leaves the node: Flower's legacy reply carries the
  weight in the clear beside the masked vector); the server only sees the mean;
* ``aggregate`` — the clipped, scaled sum of its sampled customers' gradients
  (``fedretain.privacy.aggregate.contribute``) with weight 1; the server adds the noise.

The node re-runs the consent gate every round, records its usage in the consent
ledger and its privacy spend in the budget ledger before anything leaves, exactly like
the regular ClientApp. At the end of the run it keeps the final global model for scoring
(``query.deliver_model``, ``clients/delivery.py``) exactly as the regular app does. Metrics
are the regular app's (``train_metrics``,
``evaluation_metrics``: no exact numbers in DP modes) plus lineage strings; legacy
metrics hold scalars only, so the histograms travel as ``json:`` strings.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from fedretain.clients import replies as regular
from fedretain.clients.delivery import install as install_delivery
from fedretain.clients.node import MerchantNode, Prepared
from fedretain.clients.training import make_trainer
from fedretain.clients.witnessing import install as install_witness
from fedretain.clients.witnessing import witness_mod
from fedretain.dp_evaluation import pooled_metrics
from fedretain.egress import egress_guard
from fedretain.models import RetentionNet


def from_legacy_config(config: dict[str, Any]) -> dict[str, Any]:
    """Undo the server's encoding of lists as ``json:`` strings (legacy configs hold scalars only)."""
    return {k: json.loads(v[5:]) if isinstance(v, str) and v.startswith("json:") else v for k, v in config.items()}


def to_legacy_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Legacy metrics are scalars: lists travel as ``json:`` strings (``from_legacy_config`` undoes it)."""
    return {k: ("json:" + json.dumps(v)) if isinstance(v, (list, tuple)) else v for k, v in metrics.items()}


def lineage_metrics(node: MerchantNode, prep: Prepared) -> dict[str, Any]:
    """The regular app's lineage record, flattened into legacy (string-valued) metrics."""
    return {f"lineage-{k}": v for k, v in dict(regular.lineage(node, prep)).items()}


def parameters_of(model: torch.nn.Module) -> list[np.ndarray]:
    return [v.detach().cpu().numpy() for v in model.state_dict().values()]


def model_from(parameters: list[np.ndarray], n_inputs: int, cfg: dict[str, Any]) -> RetentionNet:
    model = RetentionNet(n_inputs, tuple(int(h) for h in cfg.get("hidden", [64, 32])))
    keys = list(model.state_dict())
    if len(keys) != len(parameters):
        raise ValueError(f"server sent {len(parameters)} arrays; the model has {len(keys)}")
    model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in zip(keys, parameters)})
    return model


class MerchantClient(NumPyClient):
    """The legacy client behind ``secaggplus_mod``: train/contribute and evaluate on one silo."""

    def __init__(self, context: Context) -> None:
        self.context = context
        self.node = regular.node_for(context)

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict]:
        cfg = from_legacy_config(config)
        node = self.node
        prep = regular.prepare_from_config(node, cfg)
        if prep.n_train == 0:
            raise RuntimeError(f"merchant {node.merchant_id}: no consented training examples this round")
        model = model_from(parameters, len(prep.columns), cfg)
        x = regular._standardizer(cfg).transform(prep.x_train)
        mode = str(cfg.get("dp-mode", "none"))
        extra: dict[str, Any] | None  # DP accounting figures or the trainer's extra metrics
        if mode == "aggregate":
            from fedretain.privacy.aggregate import AggregatePlan, contribute
            from fedretain.privacy.budget import ledger_path

            arrays, dp_metrics = contribute(
                ledger_path(node.config.state_dir), str(cfg.get("run-id", "")), str(cfg["purpose"]),
                int(cfg.get("server-round", 0)), AggregatePlan.from_config(cfg), model, x, prep.y_train,
            )
            loss, n, extra = float("nan"), 1, dp_metrics  # the sampled batch size is not released
        else:
            global_params = [p.detach().clone() for p in model.parameters()]
            result = make_trainer(cfg, self.context, node, prep).fit(model, x, prep.y_train, global_params)
            arrays = parameters_of(model)
            loss, n, extra = float(result.loss), int(result.num_examples), getattr(result, "extra_metrics", None)
        regular.record_usage(node, prep, cfg, "train")
        metrics = regular.train_metrics(cfg, loss, n, extra, prep)
        metrics.update(lineage_metrics(node, prep))
        return arrays, 1, metrics  # weight 1: an unweighted mean, no example count in the clear

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[float, int, dict]:
        cfg = from_legacy_config(config)
        prep = regular.prepare_from_config(self.node, cfg)
        model = model_from(parameters, len(prep.columns), cfg)
        metrics = regular.evaluation_metrics(self.node, prep, cfg, model)
        if regular.dp_mode(cfg) == "none":
            loss, n = float(metrics["loss"]), int(metrics["num-examples"])
        else:  # post-processing of the node's own noisy histogram; the weight is the constant 1
            own = pooled_metrics([(metrics["hist-pos"], metrics["hist-neg"], metrics["hist-sd"])])
            loss, n = float(own.get("log_loss", float("nan"))), 1
        metrics.update(lineage_metrics(self.node, prep))
        return loss, n, to_legacy_metrics(metrics)


def is_legacy_message(msg: Message) -> bool:
    """A message of the SecAgg+ / legacy workflow (for a ClientApp that serves both kinds of run)."""
    names = set(msg.content.config_records) | set(msg.content.array_records)
    return any(n == "secaggplus_configs" or n.startswith(("fitins.", "evaluateins.")) for n in names)


def _client_fn(context: Context):
    # one thread per node process is faster on small CPUs; set where the node's work starts, not at
    # import time (which would slow every other user of this process, e.g. the demo's yardstick)
    torch.set_num_threads(1)
    return MerchantClient(context).to_client()


legacy_app = ClientApp(client_fn=_client_fn, mods=[secaggplus_mod])
# every reply, each SecAgg+ stage too, carries the signed ledger heads; the guard checks all of it
app = ClientApp(mods=[egress_guard, witness_mod])
install_witness(app)
install_delivery(app)  # query.deliver_model: the run's final model, as the regular app keeps it


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Every SecAgg+ stage arrives as a train message; the legacy app and its mod handle them."""
    return legacy_app(msg, context)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    return legacy_app(msg, context)
