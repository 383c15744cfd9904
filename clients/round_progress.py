"""One console line per task a merchant node served: round, examples used, ε spent.

``fedretain client start`` is otherwise silent while the platform trains; the merchant
sees here, as each reply leaves the node, which round ran, how many of its examples were
used and how much of its privacy budget the run has spent (the figures the node also
records in its consent usage log and privacy ledger).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fedretain.protocol import DELIVER_ACTION, DELIVERY_RECORD


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def format_progress(kind: str, config: Mapping[str, Any], metrics: Mapping[str, Any],
                    evaluation: Mapping[str, Any] | None = None) -> str:
    """The console line for one served message (``kind`` is its Flower message type)."""
    rnd, total = config.get("server-round"), config.get("total-rounds")
    head = f"round {rnd}/{total}" if rnd is not None and total else (f"round {rnd}" if rnd is not None else "task")
    parts = [f"{head} {kind}"]
    n = metrics.get("num-examples")
    if n is not None:
        parts.append(f"{int(n):,} examples used" if kind == "train" else f"{int(n):,} examples evaluated")
    eps, delta = _num(metrics.get("epsilon")), _num(metrics.get("delta"))
    mode = str(config.get("dp-mode", "none"))
    if eps is not None:
        target = _num(config.get("target-epsilon"))
        spent = f"ε spent {eps:.3f}" + (f" of {target:g}" if target else "") + (f" (δ {delta:.0e})" if delta else "")
        parts.append(spent)
    elif kind == "train":
        parts.append("ε: no local DP on this node (dp-mode " + mode + ")")
    loss = _num(metrics.get("train_loss"))
    if loss is not None and not math.isnan(loss):
        parts.append(f"loss {loss:.4f}")
    for source in (evaluation or {}, metrics if kind == "evaluate" else {}):
        auc = _num(source.get("auc"))
        if auc is not None:
            parts.append(f"AUC {auc:.3f}")
            break
    return ", ".join(parts)


def describe_reply(message: Any, reply: Any) -> str | None:
    """:func:`format_progress` for a Flower request/reply pair; None when there is nothing to show."""
    try:
        kind = str(message.metadata.message_type)
        if kind.endswith(DELIVER_ACTION):  # the end of a run: the model kept and what joining gained
            from fedretain.clients.delivery import delivery_line

            ack = dict(reply.content[DELIVERY_RECORD])
            return delivery_line(str(ack["run-id"]), str(ack["model-sha256"]))
        content = message.content
        config = dict(content["config"]) if "config" in content else {}
        rc = reply.content
        metrics = dict(rc["metrics"]) if "metrics" in rc else {}
        evaluation = dict(rc["evaluation"]) if "evaluation" in rc else None
    except Exception:  # noqa: BLE001 - an error reply or an unknown message shape: show nothing
        return None
    if not metrics and not config:
        return None
    return format_progress(kind, config, metrics, evaluation)


__all__ = ["describe_reply", "format_progress"]
