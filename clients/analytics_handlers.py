"""A merchant node's side of federated analytics: DP answers to query messages.

Registered on the fedretain ClientApp by :func:`register` (``clients/client_app.py`` calls it):

* ``query.analytics_status`` — the node's data end and analytics budget (no user data), so
  the server can refuse a query that some node cannot afford *before* anyone spends;
* ``query.analytics_size`` — :func:`answer_size`: with auto granularity, the noisy size of the
  query's users (per group and first-purchase age, :mod:`fedretain.analytics.granularity`),
  charged under ``<query id>-size`` only if the budget also covers the query that follows;
* ``query.retention_curve``, ``query.repeat_rate``, ``query.spend_per_retained_user`` —
  :func:`answer_query`: consent gate (purpose ``analytics``) → exact cells of the users who
  granted every scope the query reads → charge (ε, δ) to the privacy budget ledger → Gaussian
  noise → usage record naming the query → reply with the noisy cells only.

A refusal (over budget, no budget, query already answered, consent ledger failing
verification, bad query) is a normal reply carrying a ``refusal`` record with the reason;
nothing is released and nothing is charged.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedretain.analytics.charge import PURPOSE, QueryRefused, budget_state, charge_query
from fedretain.analytics.granularity import SIZE_ACTION, SIZE_MODE, SizeAnswer, size_cells
from fedretain.analytics.mechanisms import MECHANISM, GaussianMechanism
from fedretain.analytics.queries import QueryError, QuerySpec, exact_cells, query_inputs, users_counted
from fedretain.analytics.results import NodeAnswer
from fedretain.clients.node import MerchantNode
from fedretain.clients.replies import node_for
from fedretain.consent.gate import ConsentError
from fedretain.privacy.accountant import PrivacyError
from fedretain.privacy.budget import ledger_path

STATUS_ACTION = "analytics_status"
_log = logging.getLogger(__name__)


def _consent_time(spec: QuerySpec) -> datetime:
    """Always the node's own clock: a query's ``consent_at`` (the server's choice) is ignored and logged.

    Evaluating consent at a server-chosen past time would count users who have since withdrawn
    or whose grants expired (see ``client_app._consent_time``).
    """
    if spec.consent_at:
        _log.warning("ignoring consent_at=%r in query %s: this node evaluates consent at its own clock",
                     spec.consent_at, spec.query_id)
    return datetime.now(timezone.utc)


def node_status(node: MerchantNode) -> dict[str, Any]:
    """Public facts a node reports before a query: merchant id, data end, analytics budget.

    The data end is reported only when ``merchant.json`` declares it (public metadata); a
    data end read off the events would leak the last event's time, so then it is "" and the
    server must be given the query's end explicitly.
    """
    state = budget_state(ledger_path(node.config.state_dir))
    declared = node.silo.merchant.get("data_end")
    return {
        "merchant-id": node.merchant_id,
        "data-end": node.data_end().isoformat() if declared else "",
        "ledger-found": bool(state.ledger_found),
        "budget-epsilon": -1.0 if state.budget_epsilon is None else float(state.budget_epsilon),
        "budget-delta": -1.0 if state.budget_delta is None else float(state.budget_delta),
        "committed-epsilon": float(state.committed_epsilon),
        "committed-delta": float(state.committed_delta),
    }


def answer_query(node: MerchantNode, spec: QuerySpec) -> NodeAnswer:
    """The node's DP answer to ``spec`` (charged, recorded), or :class:`QueryRefused`/errors."""
    end = spec.end_ts()
    if end > node.data_end():
        raise QueryRefused(f"query {spec.query_id} asks for data up to {end.date()}, after this merchant's data "
                           f"end {node.data_end().date()}: its answer would undercount; refused")
    decision, gated = node.gate(PURPOSE, _consent_time(spec))
    inputs = query_inputs(spec, gated, node.silo.merchant)
    cells = exact_cells(spec, inputs)
    users = users_counted(inputs)
    mechanism = GaussianMechanism.calibrated(spec.epsilon, spec.delta, spec.l2_sensitivity())
    bounds = np.array([spec.bound(m) for m in cells["measure"]], dtype=float)
    charge_query(ledger_path(node.config.state_dir), spec, mechanism, len(users))
    noisy, sd = mechanism.release(cells["value"].to_numpy(float), bounds)
    with node.ledger() as ledger:
        ledger.record_usage(
            run_id=spec.query_id, round=0, purpose=PURPOSE, feature_set=spec.describe(),
            scope_counts={s: len(users) for s in spec.scopes()}, n_users=len(users),
            ledger_size=decision.ledger_size, ledger_root=decision.ledger_head, at=decision.at,
            subjects=[str(u) for u in users],
        )
    released = cells[["group", "cohort", "step", "measure"]].assign(value=noisy, sd=sd)
    return NodeAnswer(node.merchant_id, spec.query_id, released, spec.epsilon, spec.delta,
                      mechanism.noise_multiplier, mechanism.l2_sensitivity, MECHANISM)


def answer_size(node: MerchantNode, spec: QuerySpec, then: QuerySpec) -> SizeAnswer:
    """The node's noisy size release for auto granularity (charged, recorded), or :class:`QueryRefused`.

    ``spec`` is the release (its own id, ε and δ; the query's scopes, groups and end), ``then``
    the query that follows it: nothing is computed or spent unless the budget covers both.
    """
    end = spec.end_ts()
    if end > node.data_end():
        raise QueryRefused(f"size release {spec.query_id} asks for data up to {end.date()}, after this merchant's "
                           f"data end {node.data_end().date()}; refused")
    refusal = budget_state(ledger_path(node.config.state_dir)).refusal(spec.epsilon + then.epsilon,
                                                                       spec.delta + then.delta)
    if refusal:
        raise QueryRefused(f"query {then.query_id} refused before its size release, nothing spent: {refusal} "
                           f"(size release ε={spec.epsilon:g} + query ε={then.epsilon:g})")
    decision, gated = node.gate(PURPOSE, _consent_time(spec))
    inputs = query_inputs(spec, gated, node.silo.merchant)
    cells = size_cells(spec, inputs)
    users = users_counted(inputs)
    mechanism = GaussianMechanism.calibrated(spec.epsilon, spec.delta, 1.0)  # one user is in one cell
    charge_query(ledger_path(node.config.state_dir), spec, mechanism, len(users), mode=SIZE_MODE, then=then)
    noisy, sd = mechanism.release(cells["value"].to_numpy(float), np.ones(len(cells)))
    with node.ledger() as ledger:
        ledger.record_usage(
            run_id=spec.query_id, round=0, purpose=PURPOSE,
            feature_set=(f"analytics-size:users-by-first-purchase-age(by={spec.by},end={spec.end[:10]},"
                         f"epsilon={spec.epsilon:g},delta={spec.delta:g}) for query {then.query_id} "
                         f"id={spec.query_id}"),
            scope_counts={s: len(users) for s in spec.scopes()}, n_users=len(users),
            ledger_size=decision.ledger_size, ledger_root=decision.ledger_head, at=decision.at,
            subjects=[str(u) for u in users],
        )
    return SizeAnswer(node.merchant_id, spec.query_id, cells[["group", "bucket"]].assign(value=noisy, sd=sd),
                      spec.epsilon, spec.delta, mechanism.noise_multiplier, MECHANISM)


def then_query(spec: QuerySpec, cfg: Any) -> QuerySpec:
    """The query announced to follow a size release (its id and (ε, δ)), for the budget check."""
    try:
        return replace(spec, query_id=str(cfg["then-query-id"]), epsilon=float(cfg["then-epsilon"]),
                       delta=float(cfg["then-delta"]))
    except KeyError as exc:
        raise QueryError(f"a size release must name the query that follows it ({exc.args[0]} missing)") from None


def _reply(msg: Message, name: str, record: dict[str, Any]) -> Message:
    return Message(RecordDict({name: ConfigRecord(record)}), reply_to=msg)


def _answer(msg: Message, context: Context, kind: str) -> Message:
    node = node_for(context)
    query_id = str(msg.content["query"].get("query_id", "")) if "query" in msg.content else ""
    try:
        if "query" not in msg.content:
            raise QueryError("the message carries no 'query' record")
        spec = QuerySpec.from_config(msg.content["query"])
        if spec.kind != kind:
            raise QueryError(f"message type query.{kind} carries a {spec.kind} query")
        answer = answer_query(node, spec)
    except (QueryRefused, QueryError, ConsentError, PrivacyError, FileNotFoundError) as exc:
        return _reply(msg, "refusal", {"merchant-id": node.merchant_id, "query-id": query_id,
                                       "reason": f"{type(exc).__name__}: {exc}"})
    return _reply(msg, "answer", answer.to_config())


def analytics_status(msg: Message, context: Context) -> Message:
    return _reply(msg, "status", node_status(node_for(context)))


def analytics_size(msg: Message, context: Context) -> Message:
    node = node_for(context)
    cfg: Any = msg.content["query"] if "query" in msg.content else {}
    try:
        if "query" not in msg.content:
            raise QueryError("the message carries no 'query' record")
        spec = QuerySpec.from_config(cfg)
        answer = answer_size(node, spec, then_query(spec, cfg))
    except (QueryRefused, QueryError, ConsentError, PrivacyError, FileNotFoundError, ValueError) as exc:
        return _reply(msg, "refusal", {"merchant-id": node.merchant_id, "query-id": str(cfg.get("query_id", "")),
                                       "reason": f"{type(exc).__name__}: {exc}"})
    return _reply(msg, "size", answer.to_config())


def retention_curve(msg: Message, context: Context) -> Message:
    return _answer(msg, context, "retention_curve")


def repeat_rate(msg: Message, context: Context) -> Message:
    return _answer(msg, context, "repeat_rate")


def spend_per_retained_user(msg: Message, context: Context) -> Message:
    return _answer(msg, context, "spend_per_retained_user")


def register(app: Any) -> None:
    """Register the status and query handlers on ``app`` (the fedretain ClientApp)."""
    app.query(STATUS_ACTION)(analytics_status)
    app.query(SIZE_ACTION)(analytics_size)
    for handler in (retention_curve, repeat_rate, spend_per_retained_user):
        app.query(handler.__name__)(handler)


__all__ = ["answer_query", "answer_size", "node_status", "register", "SIZE_ACTION", "STATUS_ACTION"]
