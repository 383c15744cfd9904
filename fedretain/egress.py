"""The egress manifest: every value a merchant node sends, with what protects it.

One declared list (:data:`MANIFEST`) of every key of every record in every reply a node
sends — training, evaluation, analytics queries, the SecAgg+ legacy messages and the
witness record — each marked with its protection:

* ``run-dp``  — protected by the run's DP mechanism (DP-SGD model updates, the masked
  SecAgg+ contribution of aggregate mode, central mode's server-noised updates);
* ``own-dp``  — its own DP release, charged to the node's privacy budget before it leaves
  (noisy evaluation histograms, noisy analytics cells);
* ``public``  — public by declaration (merchant id, signed ledger head, protocol metadata,
  ε spent, public constants such as the weight 1);
* ``exact``   — an exact per-user-derived value, allowed only in ``dp-mode none`` (which
  promises no privacy).

:func:`check_reply` validates an outgoing message against the manifest and the run's
``dp-mode``; :func:`egress_guard` is the ClientApp mod that calls it on every reply, so
an undeclared key, or an exact value in a DP run, fails closed on the node itself. The
guard can also keep a copy of every reply for the node's operator
(``FEDRETAIN_EGRESS_AUDIT=<folder>``), which the egress tests use to inspect real runs.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import math
import os
import time
import uuid
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from flwr.app import Context, Message

from fedretain.atomic import write_atomic
from fedretain.protocol import DELIVERY_ACK_KEYS

AUDIT_ENV = "FEDRETAIN_EGRESS_AUDIT"
REQUIRE_DP = "require-dp"  # node_config flag: this merchant answers only DP runs
DP_MODES = ("local", "central", "aggregate")
ALL_MODES = ("none", *DP_MODES)


class Protection(str, Enum):
    RUN_DP = "run-dp"
    OWN_DP = "own-dp"
    PUBLIC = "public"
    EXACT = "exact"


class EgressError(RuntimeError):
    """A reply would send a value the manifest does not allow; nothing is sent."""


@dataclass(frozen=True)
class Field:
    """One declared key: message types and record names are fnmatch patterns."""

    messages: str  # e.g. "train", "train|evaluate", "query.retention_curve", "*" (fnmatch, "|" = or)
    record: str  # record name, e.g. "metrics", "fitres.metrics"
    key: str  # key in the record ("*" for any key, e.g. of a model's array record)
    protection: Protection
    why: str
    modes: tuple[str, ...] = ALL_MODES
    constant: float | None = None  # the value a public constant must have


P, R, OWN, X = Protection.PUBLIC, Protection.RUN_DP, Protection.OWN_DP, Protection.EXACT
NONE = ("none",)
TRAINING = "train"
REPLIES = "train|evaluate"
EVAL_REC = "evaluation"

# Keys a witness record (the signed tree heads of the node's ledgers, consent/witness_record.py's
# ``encode``: ``<kind>-<head field>`` per ledger kind) may carry.
WITNESS_HEAD_FIELDS = ("format", "controller", "size", "root", "signature", "timestamp", "key-fingerprint",
                       "public-key", "proof-from", "proof", "error")
WITNESS_KEYS = ("merchant-id", "kinds", "kind", "size", "root", "signature", "timestamp", "key-fingerprint",
                "public-key", "consistency-proof",
                *(f"{kind}-{f}" for kind in ("consent", "budget") for f in WITNESS_HEAD_FIELDS))
LINEAGE_KEYS = ("merchant-id", "purpose", "consent-at", "ledger-root", "ledger-size", "cutoff")
EXACT_METRICS = ("auc", "log_loss", "brier", "ece", "base_rate", "mean_pred", "loss", "ltv_spearman")
STATUS_KEYS = ("merchant-id", "data-end", "ledger-found", "budget-epsilon", "budget-delta", "committed-epsilon",
               "committed-delta")
ANSWER_PUBLIC = ("merchant-id", "query-id", "epsilon", "delta", "noise-multiplier", "l2-sensitivity", "mechanism",
                 "group", "cohort", "step", "measure", "sd")
SIZE_PUBLIC = ("merchant-id", "query-id", "epsilon", "delta", "noise-multiplier", "l2-sensitivity", "mechanism",
               "group", "bucket", "sd")
SECAGG_PUBLIC = {"pk1": "SecAgg+ public key", "pk2": "SecAgg+ public key",
                 "dsts": "SecAgg+ share destinations (node ids)", "ctxts": "SecAgg+ encrypted key shares",
                 "nids": "SecAgg+ node ids", "shares": "SecAgg+ secret shares for unmasking"}


def _counts(messages: str, record: str, prefix: str) -> list[Field]:
    k = lambda name: prefix + name
    return [
        Field(messages, record, k("num-examples"), X, "number of examples", NONE),
        Field(messages, record, k("num-examples"), P, "public constant weight 1 (unweighted mean)", DP_MODES, 1.0),
        Field(messages, record, k("users-*"), X, "consent counts (users admitted, used)", NONE),
        Field(messages, record, k("scope-*"), X, "users used per consent scope", NONE),
    ]


def _train_metrics(messages: str, record: str, prefix: str = "") -> list[Field]:
    """The numbers of a training reply (regular ``metrics`` or legacy ``fitres.metrics``)."""
    k = lambda name: prefix + name
    return [
        *_counts(messages, record, prefix),
        Field(messages, record, k("train_loss"), X, "training loss on the node's data", NONE),
        Field(messages, record, k("epsilon"), P, "ε spent so far in this run (the node's accountant)", DP_MODES),
        Field(messages, record, k("delta"), P, "the announced δ of aggregate mode (server's plan)", ("aggregate",)),
        Field(messages, record, k("noise-multiplier"), P, "the announced σ of aggregate mode", ("aggregate",)),
        Field(messages, record, k("dp-steps"), P, "aggregate steps taken = rounds (public)", ("aggregate",)),
        Field(messages, record, k("dp-weight"), P, "central DP's public weight 1", ("central",), 1.0),
    ]


def _eval_metrics(messages: str, record: str, prefix: str = "") -> list[Field]:
    """The numbers of an evaluation (``fedretain.dp_evaluation``): exact only in dp-mode none."""
    k = lambda name: prefix + name
    return [
        *_counts(messages, record, prefix),
        *[Field(messages, record, k(m), X, "exact held-out metric", NONE) for m in EXACT_METRICS],
        Field(messages, record, k("hist-pos"), X, "held-out score histogram, buyers (exact)", NONE),
        Field(messages, record, k("hist-neg"), X, "held-out score histogram, non-buyers (exact)", NONE),
        Field(messages, record, k("hist-pos"), OWN, "noisy held-out score histogram (dp_evaluation)", DP_MODES),
        Field(messages, record, k("hist-neg"), OWN, "noisy held-out score histogram (dp_evaluation)", DP_MODES),
        Field(messages, record, k("hist-sd"), P, "noise sd of the histogram cells (from ε, δ)"),
        Field(messages, record, k("eval-epsilon"), P, "ε of the evaluation release"),
        Field(messages, record, k("eval-delta"), P, "δ of the evaluation release"),
    ]


MANIFEST: tuple[Field, ...] = (
    # -- Message-API training and evaluation replies (clients/client_app.py) -------------------------
    Field(TRAINING, "arrays", "*", R, "the model after local training (DP-SGD in local mode; central mode: "
          "noised by the server, which sees it raw; none: unprotected)"),
    *_train_metrics(TRAINING, "metrics"),
    *_eval_metrics("evaluate", "metrics"),
    *_eval_metrics(TRAINING, EVAL_REC),
    *[Field(REPLIES, "lineage", key, P, "consent lineage: merchant id, purpose, signed ledger head, cutoff")
      for key in LINEAGE_KEYS],
    # -- SecAgg+ legacy replies (clients/secagg_app.py behind Flower's secaggplus_mod) -----------------
    Field(TRAINING, "fitres.parameters", "*", R, "cleared by secaggplus_mod: the model leaves masked"),
    Field(TRAINING, "fitres.num_examples", "num_examples", P, "public constant weight 1", ALL_MODES, 1.0),
    *_train_metrics(TRAINING, "fitres.metrics"),
    *[Field(TRAINING, "fitres.metrics", f"lineage-{key}", P, "consent lineage") for key in LINEAGE_KEYS],
    *[Field(TRAINING, "fitres.status", key, P, "Flower status") for key in ("code", "message")],
    Field(TRAINING, "secaggplus_configs", "masked_params", R, "the quantised update under SecAgg+ masks "
          "(aggregate mode: clipped gradient sum, noised once by the server; local: DP-SGD model)"),
    *[Field(TRAINING, "secaggplus_configs", key, P, why) for key, why in SECAGG_PUBLIC.items()],
    Field("evaluate", "evaluateres.loss", "loss", X, "exact held-out loss", NONE),
    Field("evaluate", "evaluateres.loss", "loss", OWN, "log loss computed from the noisy histogram", DP_MODES),
    Field("evaluate", "evaluateres.num_examples", "num_examples", X, "number of held-out examples", NONE),
    Field("evaluate", "evaluateres.num_examples", "num_examples", P, "public constant 1", DP_MODES, 1.0),
    *_eval_metrics("evaluate", "evaluateres.metrics"),
    *[Field("evaluate", "evaluateres.metrics", f"lineage-{key}", P, "consent lineage") for key in LINEAGE_KEYS],
    *[Field("evaluate", "evaluateres.status", key, P, "Flower status") for key in ("code", "message")],
    # -- analytics queries (clients/analytics_handlers.py) ---------------------------------------------
    *[Field("query.analytics_status", "status", key, P, "merchant id, declared data end, budget state")
      for key in STATUS_KEYS],
    *[Field("query.*", "answer", key, P, "query metadata and public cell labels") for key in ANSWER_PUBLIC],
    Field("query.*", "answer", "value", OWN, "noisy cells (Gaussian, charged to the analytics budget)"),
    *[Field("query.analytics_size", "size", key, P, "size release metadata and public cell labels (group, "
            "first-purchase age bucket)") for key in SIZE_PUBLIC],
    Field("query.analytics_size", "size", "value", OWN, "noisy user counts for auto granularity (Gaussian, "
          "charged to the analytics budget)"),
    *[Field("query.*", "refusal", key, P, "why nothing was released") for key in ("merchant-id", "query-id",
                                                                                  "reason")],
    # -- model delivery at the end of a run (clients/delivery.py): an acknowledgement only ----------------
    *[Field("query.deliver_model", "delivery", key, P, "acknowledgement of the delivered final model "
            "(merchant id, run id, round, the SHA-256 verified, saved)") for key in DELIVERY_ACK_KEYS],
    # -- the witness record on every reply (the node's signed ledger heads) -----------------------------
    *[Field("*", "witness", key, P, "signed tree head of the node's ledger(s)") for key in WITNESS_KEYS],
)


def dp_mode_of(msg: Message) -> str:
    """The run's dp-mode as the incoming message states it; ``"unknown"`` (checked strictly) if absent."""
    if msg.has_error():
        return "unknown"
    configs = msg.content.config_records
    for name in ("config", "fitins.config", "evaluateins.config"):
        if name in configs and "dp-mode" in configs[name]:
            return str(configs[name]["dp-mode"])
    return "unknown"


def _allowed(field: Field, mode: str) -> bool:
    return mode in field.modes if mode in ALL_MODES else field.modes != NONE


def lookup(message_type: str, record: str, key: str, mode: str) -> list[Field]:
    """The manifest entries that allow ``key`` of ``record`` in a ``message_type`` reply in ``mode``."""
    return list(_lookup(message_type, record, key, mode))


@functools.lru_cache(maxsize=8192)  # MANIFEST is a constant: every reply asks the same few hundred keys
def _lookup(message_type: str, record: str, key: str, mode: str) -> tuple[Field, ...]:
    return tuple(f for f in MANIFEST if any(fnmatch.fnmatchcase(message_type, m) for m in f.messages.split("|"))
                 and fnmatch.fnmatchcase(record, f.record) and fnmatch.fnmatchcase(key, f.key) and _allowed(f, mode))


def _equals(value: Any, constant: float | None) -> bool:
    return (constant is not None and isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isclose(float(value), constant))


def items_of(content: Any) -> list[tuple[str, str, str, Any]]:
    """(kind, record name, key, value) of every value in a RecordDict."""
    out: list[tuple[str, str, str, Any]] = []
    for kind, records in (("array", content.array_records), ("metric", content.metric_records),
                          ("config", content.config_records)):
        for name, record in records.items():
            out.extend((kind, name, key, record[key]) for key in record)
    return out


def violations(items: list[tuple[str, str, str, Any]], message_type: str, mode: str) -> list[str]:
    """Every value the manifest does not allow in this reply; names keys, never values."""
    problems: list[str] = []
    for kind, name, key, value in items:
        fields = lookup(message_type, name, key, mode)
        if not fields:
            problems.append(f"{kind} record {name!r} key {key!r} is not declared for a {message_type} reply "
                            f"in dp-mode {mode}")
        elif all(f.constant is not None for f in fields) and not any(_equals(value, f.constant) for f in fields):
            problems.append(f"{kind} record {name!r} key {key!r} must be the public constant "
                            f"{fields[0].constant:g} in dp-mode {mode}")
    return problems


def check_reply(reply: Message, message_type: str, mode: str) -> None:
    """Raise :class:`EgressError` unless every key of ``reply`` is declared for this message and dp-mode."""
    if reply.has_error():
        return  # an error reply carries Flower's error code and reason only
    problems = violations(items_of(reply.content), message_type, mode)
    if problems:
        raise EgressError("egress manifest (fedretain/egress.py) refuses this reply: " + "; ".join(problems))


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"bytes": len(value)}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def audit_copy(folder: str | Path, msg: Message, reply: Message, mode: str, context: Context) -> Path:
    """Write what ``reply`` sends (every record, key and value; arrays as lists) for the node's operator."""
    records: dict[str, Any] = {}
    if not reply.has_error():
        c = reply.content
        for name, arrays in c.array_records.items():
            records[name] = {"kind": "array", "items": {k: a.numpy().astype(float).ravel().tolist()
                                                         for k, a in arrays.items()}}
        for name, metrics in c.metric_records.items():
            records[name] = {"kind": "metric", "items": {k: _jsonable(v) for k, v in metrics.items()}}
        for name, config in c.config_records.items():
            records[name] = {"kind": "config", "items": {k: _jsonable(v) for k, v in config.items()}}
    entry = {"message_type": msg.metadata.message_type, "dp_mode": mode, "node_id": int(context.node_id),
             "node_config": {k: str(v) for k, v in dict(context.node_config).items()}, "time": time.time(),
             "error": str(reply.error.reason) if reply.has_error() else None, "records": records}
    out = Path(folder) / f"{time.time_ns()}-{uuid.uuid4().hex[:8]}.json"
    return write_atomic(out, json.dumps(entry).encode("utf-8"))


def requires_dp(context: Context) -> bool:
    return str(dict(context.node_config).get(REQUIRE_DP, "false")).lower() in ("1", "true", "yes")


def egress_guard(msg: Message, context: Context, call_next: Any) -> Message:
    """ClientApp mod: check every reply against the manifest before it leaves (fail closed).

    The dp-mode is the run's, chosen by the platform; a merchant that accepts only DP runs sets
    ``require-dp = true`` in its node config and the node then refuses ``dp-mode none`` before
    computing anything.
    """
    mode = dp_mode_of(msg)
    if mode == "none" and requires_dp(context):
        raise EgressError("this node requires a DP run (node config require-dp = true); the server asked for "
                          "dp-mode none: refused, nothing computed or sent")
    reply = call_next(msg, context)
    folder = os.environ.get(AUDIT_ENV)
    if folder:
        audit_copy(folder, msg, reply, mode, context)
    check_reply(reply, msg.metadata.message_type, mode)
    return reply


def render_markdown() -> str:
    """The manifest as a Markdown table, one row per (reply, record, protection, modes) (docs/PRIVACY.md)."""
    rows: dict[tuple, list[str]] = {}
    whys: dict[tuple, list[str]] = {}
    for f in MANIFEST:
        const = f" (= {f.constant:g})" if f.constant is not None else ""
        row = (f.messages, f.record, f.protection.value + const, ", ".join(f.modes))
        rows.setdefault(row, []).append(f"`{f.key}`")
        if f.why not in whys.setdefault(row, []):
            whys[row].append(f.why)
    lines = ["| reply | record | keys | protection | dp-modes | what |", "|---|---|---|---|---|---|"]
    for (messages, record, protection, modes), keys in rows.items():
        why = "; ".join(whys[(messages, record, protection, modes)])
        names = messages.replace("|", "`, `")
        lines.append(f"| `{names}` | `{record}` | {' '.join(keys)} | {protection} | {modes} | {why} |")
    return "\n".join(lines)
