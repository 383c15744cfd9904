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
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedretain.clients import round_cache
from fedretain.clients.delivery import install as install_delivery
from fedretain.clients.node import MerchantNode, NodeConfig, Prepared
from fedretain.clients.training import make_trainer
from fedretain.clients.witnessing import install as install_witness
from fedretain.clients.witnessing import witness_mod
from fedretain.consent.vocab import SCOPES
from fedretain.dp_evaluation import DEFAULT_EVAL_DELTA, dp_release, exact_release
from fedretain.egress import egress_guard
from fedretain.models import RetentionNet, Standardizer
from fedretain.protocol import EVALUATE_RECEIVED, EVALUATION, evaluation_record, model_arrays, state_dict_from
from fedretain.train import evaluate, predict
from fedretain.transforms import TRANSFORM_ID, public_standardizer

torch.set_num_threads(1)  # one thread per node process is faster on small CPUs (see docs)

# every reply carries the node's signed ledger heads (clients/witnessing.py); the egress guard is the
# outer mod so that it checks the whole reply, witness record included, against the manifest
app = ClientApp(mods=[egress_guard, witness_mod])
install_witness(app)
install_delivery(app)  # query.deliver_model: the run's final model, kept for scoring
_log = logging.getLogger(__name__)


def node_for(context: Context) -> MerchantNode:
    return MerchantNode(NodeConfig.from_flower(dict(context.node_config), dict(context.run_config)))


def _consent_time(cfg: ConfigRecord) -> datetime:
    """When consent is evaluated: always the node's own clock, now. Consent is the node's decision.

    A ``consent-at`` sent by the server is ignored (and logged): evaluating consent at a
    server-chosen past time would re-admit users who have since withdrawn or whose grants
    expired. Ignoring rather than refusing keeps older servers working while giving them
    nothing; the server can still choose the feature ``cutoff`` (back-tests).
    """
    sent = str(cfg.get("consent-at", "") or "")
    if sent:
        _log.warning("ignoring consent-at=%r sent by the server: this node evaluates consent at its own clock", sent)
    return datetime.now(timezone.utc)


def prepare_from_config(node: MerchantNode, cfg: ConfigRecord) -> Prepared:
    """The round's inputs: consent decided once per round at the node's clock, features once per run
    while consent and data are unchanged (``fedretain.clients.round_cache``)."""
    return round_cache.prepared_for(node, cfg, _consent_time(cfg))


def _model(arrays: ArrayRecord, n_inputs: int, cfg: ConfigRecord) -> RetentionNet:
    model = RetentionNet(n_inputs, tuple(int(h) for h in cfg.get("hidden", [64, 32])))
    model.load_state_dict(state_dict_from(arrays, model))
    return model


def _standardizer(cfg: ConfigRecord) -> Standardizer:
    """The public input transform of the run's features (computed here, from nothing but their names)."""
    asked = str(cfg.get("transform", TRANSFORM_ID))
    if asked != TRANSFORM_ID:
        raise RuntimeError(f"the server asks for input transform {asked!r}; this node applies only the public "
                           f"transform {TRANSFORM_ID!r} (fedretain/transforms.py)")
    return public_standardizer(list(cfg["features"]))


def dp_mode(cfg: Any) -> str:
    return str(cfg.get("dp-mode", "none"))


# What a DP trainer may report beside ε in each mode (the rest stays in the node's budget ledger:
# local DP's δ, σ and step count are functions of the node's number of examples).
_DP_REPORTED = {"local": ("epsilon",), "central": ("dp-weight",),
                "aggregate": ("epsilon", "delta", "noise-multiplier", "dp-steps")}


def train_metrics(cfg: Any, loss: float, num_examples: int, extra: dict[str, Any] | None,
                  prep: Prepared) -> dict[str, Any]:
    """A train reply's numbers: exact in dp-mode none; the public weight 1 and ε spent in DP modes."""
    mode = dp_mode(cfg)
    if mode == "none":
        out = {"train_loss": float(loss), "num-examples": int(num_examples), **(extra or {})}
        out.update(consent_metrics(prep, "train"))
        return out
    keep = _DP_REPORTED.get(mode, ())
    return {"num-examples": 1, **{k: v for k, v in (extra or {}).items() if k in keep}}


def lineage(node: MerchantNode, prep: Prepared) -> ConfigRecord:
    """What ties this reply to the node's consent state (no user ids)."""
    d = prep.decision
    return ConfigRecord(
        {
            "merchant-id": node.merchant_id,
            "purpose": d.purpose,
            "consent-at": d.at.isoformat(),
            "ledger-root": d.ledger_head,
            "ledger-size": int(d.ledger_size),
            "cutoff": prep.cutoff.isoformat(),
        }
    )


def consent_metrics(prep: Prepared, phase: str) -> dict[str, Any]:
    """Aggregate consent counts: users admitted, excluded, used, and used per scope (all scopes: fixed keys)."""
    d = prep.decision
    users, counts = prep.usage(phase)
    out: dict[str, Any] = {
        "users-candidates": int(d.n_candidates),
        "users-consented": int(len(d.grants)),
        "users-used": int(len(users)),
    }
    for scope in SCOPES:
        out[f"scope-{scope}"] = int(counts.get(scope, 0))
    return out


def record_usage(node: MerchantNode, prep: Prepared, cfg: ConfigRecord, phase: str) -> None:
    """Append the usage record to the node's ledger before replying (fails closed)."""
    d = prep.decision
    users, counts = prep.usage(phase)
    with node.ledger() as ledger:
        ledger.record_usage(
            run_id=str(cfg.get("run-id", "")),
            round=int(cfg.get("server-round", 0)),
            purpose=d.purpose,
            feature_set=f"{phase}:" + ",".join(cfg["features"]),
            scope_counts=counts,
            n_users=len(users),
            ledger_size=d.ledger_size,
            ledger_root=d.ledger_head,
            at=d.at,
            subjects=[str(u) for u in users],
        )


def _legacy(msg: Message, context: Context) -> Message | None:
    """SecAgg+ runs speak Flower's legacy protocol; hand those messages to the legacy app."""
    from fedretain.clients.secagg_app import is_legacy_message, legacy_app  # late: it imports this module

    return legacy_app(msg, context) if is_legacy_message(msg) else None


def evaluation_metrics(node: MerchantNode, prep: Prepared, cfg: Any, model: RetentionNet) -> dict[str, Any]:
    """What leaves the node about ``model`` on its consented held-out users; the usage is recorded first.

    dp-mode none: exact metrics, counts and the exact score histogram. DP modes: only the
    noisy score histogram (``fedretain.dp_evaluation``), charged to the node's budget under
    the run's purpose at the run's ``eval-epsilon`` — the held-out users get DP like the
    training users.
    """
    x = _standardizer(cfg).transform(prep.x_test)
    mode = dp_mode(cfg)
    y = prep.y_test[:, 0] if len(prep.y_test) else np.zeros(0)
    prob = predict(model, x)[0] if len(x) else np.zeros(0)
    if mode == "none":
        record_usage(node, prep, cfg, "evaluate")
        report = evaluate(model, x, prep.y_test)
        metrics: dict[str, Any] = {k: float(v) for k, v in report.items() if k != "num_examples"}
        metrics["num-examples"] = int(prep.n_test)
        metrics.update(consent_metrics(prep, "evaluate"))
        release = exact_release(y, prob)
    else:
        from fedretain.privacy.budget import ledger_path

        eps = float(cfg.get("eval-epsilon", 0.0))
        delta = float(cfg.get("eval-delta", DEFAULT_EVAL_DELTA))
        if eps <= 0:
            raise RuntimeError(f"dp-mode {mode}: the run names no eval-epsilon; the held-out evaluation is a DP "
                               f"release and is refused without one")
        release = dp_release(ledger_path(node.config.state_dir), str(cfg.get("run-id", "")), str(cfg["purpose"]),
                             int(cfg.get("server-round", 0)), y, prob, eps, delta)
        record_usage(node, prep, cfg, "evaluate")
        metrics = {"eval-epsilon": release.epsilon, "eval-delta": release.delta}
    metrics.update({"hist-pos": [float(v) for v in release.pos], "hist-neg": [float(v) for v in release.neg],
                    "hist-sd": float(release.sd)})
    return metrics


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
    received = evaluation_metrics(node, prep, cfg, model) if bool(cfg.get(EVALUATE_RECEIVED, False)) else None
    global_params = [p.detach().clone() for p in model.parameters()]
    scaler = _standardizer(cfg)
    trainer = make_trainer(cfg, context, node, prep)
    result = trainer.fit(model, scaler.transform(prep.x_train), prep.y_train, global_params)
    record_usage(node, prep, cfg, "train")
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


from fedretain.clients import analytics_handlers  # noqa: E402,F401  (registers query handlers)
