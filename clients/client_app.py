"""The fedretain ClientApp (Flower Message API): one merchant node's side of a run.

Every message re-evaluates consent first (withdrawals take effect at the next round),
then computes features of granted scopes only, trains or evaluates on the node's own
users, records the usage in the node's ledger, and replies with arrays and aggregate
numbers only — never user ids, rows, per-user features or scores.

What a reply may carry is declared in ``fedretain.egress`` (the egress manifest); the
app's :func:`fedretain.egress.egress_guard` mod checks every reply against it before it
leaves. Inputs are scaled by the public transforms of ``fedretain.transforms`` (no
statistics are exchanged). In a DP mode a reply carries no exact count: the weight is the
public constant 1, consent counts stay in the node's ledger, and held-out evaluation
leaves only as a noisy histogram charged to the node's budget (``fedretain.dp_evaluation``).
"""

from __future__ import annotations

import logging

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedretain.clients import analytics_handlers
from fedretain.clients.delivery import install as install_delivery
from fedretain.clients.replies import (  # noqa: F401  (re-exported: the handlers' building blocks)
    _consent_time,
    _model,
    _standardizer,
    dp_mode,
    evaluation_metrics,
    lineage,
    node_for,
    prepare_from_config,
    record_usage,
    record_usages,
    train_metrics,
)
from fedretain.clients.secagg_app import is_legacy_message, legacy_app
from fedretain.clients.training import make_trainer
from fedretain.clients.witnessing import install as install_witness
from fedretain.clients.witnessing import witness_mod
from fedretain.egress import egress_guard
from fedretain.protocol import EVALUATE_RECEIVED, EVALUATION, evaluation_record, model_arrays

torch.set_num_threads(1)  # one thread per node process is faster on small CPUs (see docs)

# every reply carries the node's signed ledger heads (clients/witnessing.py); the egress guard is the
# outer mod so that it checks the whole reply, witness record included, against the manifest
app = ClientApp(mods=[egress_guard, witness_mod])
install_witness(app)
install_delivery(app)  # query.deliver_model: the run's final model, kept for scoring
_log = logging.getLogger(__name__)


def _legacy(msg: Message, context: Context) -> Message | None:
    """SecAgg+ runs speak Flower's legacy protocol; hand those messages to the legacy app."""
    return legacy_app(msg, context) if is_legacy_message(msg) else None


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on the received model; if asked, first evaluate that model (see fedretain.protocol)."""
    if (reply := _legacy(msg, context)) is not None:
        return reply
    cfg = msg.content["config"]
    node = node_for(context)
    prep = prepare_from_config(node, cfg)
    if prep.n_train == 0:
        raise RuntimeError(f"merchant {node.merchant_id}: no consented training examples this round")
    model = _model(msg.content["arrays"], len(prep.columns), cfg)
    used: list[str] = []  # the evaluate use is recorded with the train use: one ledger commit per message
    received = evaluation_metrics(node, prep, cfg, model, used) if bool(cfg.get(EVALUATE_RECEIVED, False)) else None
    global_params = [p.detach().clone() for p in model.parameters()]
    scaler = _standardizer(cfg)
    try:
        trainer = make_trainer(cfg, context, node, prep)
        result = trainer.fit(model, scaler.transform(prep.x_train), prep.y_train, global_params)
    except BaseException:
        if used:  # nothing leaves, but the held-out users' data was read: the use is still recorded
            record_usages(node, prep, cfg, used)
        raise
    record_usages(node, prep, cfg, [*used, "train"])
    metrics = train_metrics(cfg, result.loss, result.num_examples, getattr(result, "extra_metrics", None), prep)
    content = RecordDict(
        {"arrays": model_arrays(model.state_dict()), "metrics": MetricRecord(metrics), "lineage": lineage(node, prep)}
    )
    if received is not None:
        content[EVALUATION] = evaluation_record(received)
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    if (reply := _legacy(msg, context)) is not None:
        return reply
    cfg = msg.content["config"]
    node = node_for(context)
    prep = prepare_from_config(node, cfg)
    model = _model(msg.content["arrays"], len(prep.columns), cfg)
    metrics = evaluation_metrics(node, prep, cfg, model)
    return Message(
        RecordDict({"metrics": MetricRecord(metrics), "lineage": lineage(node, prep)}), reply_to=msg
    )


analytics_handlers.register(app)  # query.analytics_status and the DP analytics queries
