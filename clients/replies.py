"""What a merchant node computes for a reply: consent-gated inputs, usage records, metrics.

The building blocks of the ClientApp handlers (``clients/client_app.py``), the SecAgg+
legacy app (``clients/secagg_app.py``) and the analytics handlers, kept apart from the app
objects so those modules import this one and none of them imports another (no cycle).
Consent is always evaluated at the node's own clock (:func:`_consent_time`).
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context

from fedretain.clients import round_cache
from fedretain.clients.node import MerchantNode, NodeConfig, Prepared, data_view
from fedretain.consent.vocab import SCOPES
from fedretain.dp_evaluation import DEFAULT_EVAL_DELTA, dp_release, exact_release
from fedretain.models import RetentionNet, Standardizer
from fedretain.protocol import state_dict_from
from fedretain.train import evaluate, predict
from fedretain.transforms import TRANSFORM_ID, public_standardizer

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
    prep = round_cache.prepared_for(node, cfg, _consent_time(cfg))
    view = str(cfg.get("data-view", "") or "")  # model selection (server/selection.py): validation users
    return data_view(prep, node.merchant_id, view, float(cfg.get("validation-fraction", 0.2))) if view else prep


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
    record_usages(node, prep, cfg, [phase])


def record_usages(node: MerchantNode, prep: Prepared, cfg: ConfigRecord, phases: list[str]) -> None:
    """Append one usage record per phase, in one ledger open and one transaction (all or none; fails closed).

    A train message that first evaluates the received model uses two phases; writing both at
    once halves the node's ledger opens and commits per round (issue 14)."""
    d = prep.decision
    entries = []
    for phase in phases:
        users, counts = prep.usage(phase)
        entries.append(dict(run_id=str(cfg.get("run-id", "")), round=int(cfg.get("server-round", 0)),
                            purpose=d.purpose, feature_set=f"{phase}:" + ",".join(cfg["features"]),
                            scope_counts=counts, n_users=len(users), ledger_size=d.ledger_size,
                            ledger_root=d.ledger_head, at=d.at, subjects=[str(u) for u in users]))
    with node.ledger() as ledger:
        append_usages(ledger, entries)


def append_usages(ledger: Any, entries: list[dict[str, Any]]) -> None:
    """Write ``entries`` (keyword arguments of ``ConsentLedger.record_usage``) in one transaction; a storage
    fault raises ``UsageWriteError`` as the ledger's own method does (the node sends nothing)."""
    from fedretain.consent.ledger import LedgerError, UsageWriteError, storage_errors
    from fedretain.consent.usage import record_usages as insert_usages

    if len(entries) == 1:  # the ledger's own method, as every other writer uses
        ledger.record_usage(**entries[0])
        return
    try:
        with storage_errors(ledger.path, "record a data use in"):
            insert_usages(ledger.connection, entries)
    except LedgerError as exc:
        raise UsageWriteError(f"{exc}; the use was not recorded, so the node must not send anything "
                              "from it (fail closed)") from None


def evaluation_metrics(node: MerchantNode, prep: Prepared, cfg: Any, model: RetentionNet,
                       deferred: list[str] | None = None) -> dict[str, Any]:
    """What leaves the node about ``model`` on its consented held-out users; the usage is recorded first
    (dp-mode none with ``deferred``: the phase is appended to it instead and the caller records it,
    with its own, before its reply leaves — :func:`record_usages`).

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
        if deferred is None:
            record_usage(node, prep, cfg, "evaluate")
        else:
            deferred.append("evaluate")
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
