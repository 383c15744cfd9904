"""The server's side of a federated analytics query: ask, check budgets, sum, report.

One query is one exchange of Flower messages, not a training round:

1. ``query.analytics_status`` to every node: data end and analytics budget (public facts).
   If any node lacks the budget for the query's (ε, δ), the query is refused here, before any
   node computes or spends anything.
1b. With auto granularity (retention curves; :mod:`fedretain.analytics.granularity`),
   ``query.analytics_size``: every node releases a noisy size of the query's users, charged
   (a share of ε) under ``<query id>-size``; the server sums the sizes, picks period length,
   cohorts and periods, and asks the query with the rest of ε.
2. ``query.<kind>`` with the :class:`QuerySpec` (end = earliest data end unless given): each
   node answers with noisy cells, having charged its own budget, or with a refusal.
3. The answers are summed (:func:`fedretain.analytics.results.combine`) and written as
   ``<kind>_by-<by>.{png,csv,json}``; a refusal is written as ``<kind>_by-<by>.refused.json``.
   Partial answers are never published: if any node refused or failed, the query fails and
   says which nodes had already spent.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedretain.analytics.granularity import (
    AUTO,
    NO_AUTO,
    SIZE_ACTION,
    AutoSettings,
    SizeAnswer,
    auto_record,
    choose,
    size_spec,
    split_budget,
    sum_sizes,
)
from fedretain.analytics.intervals import IntervalPolicy
from fedretain.analytics.queries import QueryError, QuerySpec
from fedretain.analytics.results import NodeAnswer, QueryResult, combine
from fedretain.atomic import write_atomic

log = logging.getLogger("fedretain.server.analytics")

STATUS_ACTION = "analytics_status"  # same as fedretain.clients.analytics_handlers.STATUS_ACTION


class AnalyticsRefused(RuntimeError):
    """The query was refused (budget, consent, data end) or a node failed; nothing was published."""


# run_config key -> QuerySpec field (Flower config values are str/int/float/bool)
SPEC_KEYS: dict[str, str] = {
    "analytics-query": "kind", "analytics-by": "by", "analytics-epsilon": "epsilon", "analytics-delta": "delta",
    "analytics-period": "period", "analytics-periods": "periods", "analytics-cohorts": "cohorts",
    "analytics-windows": "windows", "analytics-window-days": "window_days", "analytics-spend-cap": "spend_cap",
    "analytics-end": "end", "analytics-query-id": "query_id",
}
POLICY_KEYS: dict[str, str] = {"analytics-confidence": "confidence", "analytics-min-snr": "min_snr",
                               "analytics-flag-width": "flag_width"}
AUTO_FIELDS = ("period", "periods", "cohorts")  # QuerySpec fields that may be "auto"
AUTO_KEYS: dict[str, str] = {"analytics-size-share": "size_share", "analytics-auto-target": "target"}


@dataclass(frozen=True)
class AnalyticsSettings:
    """Everything the analytics ServerApp needs, read from Flower's run_config."""

    spec: QuerySpec
    out_dir: str = "runs/analytics"
    policy: IntervalPolicy = field(default_factory=IntervalPolicy)
    min_nodes: int = 1
    node_wait_timeout: float = 120.0
    timeout: float = 600.0
    auto: AutoSettings = NO_AUTO  # which of period/periods/cohorts are chosen from a size release

    @property
    def auto_applies(self) -> bool:
        """A size release happens for a retention curve with auto cohorts or periods."""
        return self.spec.kind == "retention_curve" and self.auto.active

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> AnalyticsSettings:
        spec: dict[str, Any] = {}
        auto: dict[str, Any] = {name: False for name in AUTO_FIELDS}
        auto.update({name: float(run_config[key]) for key, name in AUTO_KEYS.items()
                     if run_config.get(key) not in (None, "")})
        for key, name in SPEC_KEYS.items():
            value = run_config.get(key)
            if name in AUTO_FIELDS and str(value).strip().lower() == AUTO:
                auto[name] = True
                continue
            if value in (None, "") and name != "kind":
                continue
            if name == "windows":
                value = tuple(int(w) for w in str(value).replace(";", ",").split(",") if w.strip())
            elif name == "query_id" and not value:
                continue
            spec[name] = value
        if not spec.get("kind"):
            raise QueryError("run_config names no analytics query: set analytics-query="
                             "'retention_curve' | 'repeat_rate' | 'spend_per_retained_user'")
        for name in ("periods", "cohorts", "window_days"):
            if name in spec:
                spec[name] = int(spec[name])
        policy = {name: float(run_config[key]) for key, name in POLICY_KEYS.items()
                  if run_config.get(key) not in (None, "")}
        return cls(
            spec=QuerySpec(**spec), out_dir=str(run_config.get("out-dir") or "runs/analytics"),
            policy=IntervalPolicy(**policy), min_nodes=int(run_config.get("min-nodes", 1)),
            node_wait_timeout=float(run_config.get("node-wait-timeout", 120.0)),
            timeout=float(run_config.get("round-timeout", 600.0)), auto=AutoSettings(**auto),
        )

    def to_run_config(self) -> dict[str, Any]:
        """The analytics keys of a run_config (merged with the training keys in simulation)."""
        out: dict[str, Any] = {}
        for key, name in SPEC_KEYS.items():
            value = getattr(self.spec, name)
            out[key] = ",".join(str(w) for w in value) if name == "windows" else value
            if name in AUTO_FIELDS and getattr(self.auto, name):
                out[key] = AUTO
        for key, name in POLICY_KEYS.items():
            out[key] = float(getattr(self.policy, name))
        if self.auto.active:  # explicit counts: the keys of before, nothing more
            out.update({key: float(getattr(self.auto, name)) for key, name in AUTO_KEYS.items()})
        out["out-dir"] = self.out_dir
        return out


def output_stem(spec: QuerySpec) -> str:
    return f"{spec.kind}_by-{spec.by}"


class FederatedQuery:
    """Runs one query over the grid's nodes; see the module docstring."""

    def __init__(self, grid: Grid, settings: AnalyticsSettings) -> None:
        self.grid, self.settings = grid, settings
        self.statuses: list[dict[str, Any]] = []

    def wait_for_nodes(self) -> list[int]:
        need = self.settings.min_nodes
        deadline = time.monotonic() + self.settings.node_wait_timeout
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= need:
                return nodes
            if time.monotonic() > deadline:
                raise AnalyticsRefused(f"only {len(nodes)} merchant node(s) connected after "
                                       f"{self.settings.node_wait_timeout:.0f} s; this query needs {need}")
            time.sleep(0.5)

    def _exchange(self, nodes: list[int], message_type: str, content: dict[str, Any]) -> dict[int, Message]:
        msgs = [Message(RecordDict({"query": ConfigRecord(content)}), dst_node_id=nid, message_type=message_type)
                for nid in nodes]
        replies = {r.metadata.src_node_id: r for r in self.grid.send_and_receive(msgs, timeout=self.settings.timeout)}
        missing = [n for n in nodes if n not in replies]
        if missing:
            raise AnalyticsRefused(f"{message_type}: no reply from node(s) {missing} "
                                   f"within {self.settings.timeout:.0f} s")
        return replies

    def check_budgets(self, nodes: list[int]) -> QuerySpec:
        """Ask every node for its data end and budget; refuse before anyone spends. Returns the spec with its end."""
        spec = self.settings.spec
        replies = self._exchange(nodes, f"query.{STATUS_ACTION}", {"query_id": spec.query_id})
        problems: list[str] = []
        for nid in nodes:
            r = replies[nid]
            if r.has_error():
                problems.append(f"node {nid}: {r.error.reason}")
                continue
            st = dict(r.content["status"])
            self.statuses.append(st)
            budget = float(st["budget-epsilon"])
            remaining = budget - float(st["committed-epsilon"])
            if not st["ledger-found"] or budget < 0:
                problems.append(f"{st['merchant-id']}: no privacy budget is set for purpose 'analytics' (the "
                                f"merchant sets one with `fedretain privacy set-budget --silo SILO "
                                f"--purpose analytics --epsilon E`)")
            elif spec.epsilon > remaining + 1e-9:
                problems.append(f"{st['merchant-id']}: needs ε={spec.epsilon:g} but only ε={max(remaining, 0):g} "
                                f"of its analytics budget ε={budget:g} remains")
            elif 0 < float(st["budget-delta"]) * (1 + 1e-9) < float(st["committed-delta"]) + spec.delta:
                problems.append(f"{st['merchant-id']}: δ={spec.delta:g} would exceed its analytics δ budget "
                                f"{float(st['budget-delta']):g}")
        if problems:
            raise AnalyticsRefused(f"query {spec.query_id} ({spec.kind}, ε={spec.epsilon:g}) refused before any node "
                                   f"spent anything: " + "; ".join(sorted(problems)))
        undeclared = sorted(st["merchant-id"] for st in self.statuses if not st["data-end"])
        ends = {st["merchant-id"]: pd.Timestamp(st["data-end"]) for st in self.statuses if st["data-end"]}
        if not spec.end:
            if undeclared:
                raise AnalyticsRefused(f"merchant(s) {', '.join(undeclared)} declare no data_end in merchant.json; "
                                       f"give the query an explicit end date (--end)")
            return spec.with_end(min(ends.values()))
        late = {m: e for m, e in ends.items() if e < spec.end_ts()}
        if late:
            raise AnalyticsRefused(f"query end {spec.end_ts().date()} is after the data end of "
                                   + ", ".join(f"{m} ({e.date()})" for m, e in sorted(late.items())))
        return spec

    def size_release(self, nodes: list[int], spec: QuerySpec) -> tuple[QuerySpec, dict[str, Any]]:
        """Auto granularity: every node's noisy size, summed; the grid chosen; the query with the rest of ε."""
        auto, policy = self.settings.auto, self.settings.policy
        try:
            split = split_budget(spec.epsilon, spec.delta, auto.size_share)
        except QueryError as exc:
            raise AnalyticsRefused(f"query {spec.query_id} refused before any node spent anything: {exc}") from None
        release = size_spec(spec, split)
        content = {**release.to_config(), "then-query-id": spec.query_id, "then-epsilon": split.query_epsilon,
                   "then-delta": split.query_delta}
        replies = self._exchange(nodes, f"query.{SIZE_ACTION}", content)
        answers, problems = _answers(nodes, replies, "size", SizeAnswer.from_config)
        if problems:
            spent = ", ".join(a.merchant_id for a in answers) or "none"
            raise AnalyticsRefused(f"query {spec.query_id} failed at its size release, nothing published: "
                                   + "; ".join(sorted(problems))
                                   + f" (nodes that spent ε={split.size_epsilon:g} on the size release: {spent})")
        for a in answers:
            if a.release_id != release.query_id or abs(a.epsilon - release.epsilon) > 1e-12:
                raise AnalyticsRefused(f"size release of {a.merchant_id} is for {a.release_id} at ε={a.epsilon:g}, "
                                       f"not {release.query_id} at ε={release.epsilon:g}; nothing published")
        size = sum_sizes(answers)
        try:
            choice = choose(spec, auto, size, split, policy)
        except QueryError as exc:
            raise AnalyticsRefused(f"query {spec.query_id} failed after its size release (ε={split.size_epsilon:g} "
                                   f"spent by every node): {exc}") from None
        record = auto_record(choice, auto, size, split, policy, release.query_id)
        log.info("query %s: %s; %s", spec.query_id, record["summary"], record["reason"])
        final = replace(spec, period=choice.period, cohorts=choice.cohorts, periods=choice.periods,
                        epsilon=split.query_epsilon, delta=split.query_delta)
        return final, record

    def run(self) -> QueryResult:
        nodes = self.wait_for_nodes()
        spec = self.check_budgets(nodes)
        auto: dict[str, Any] | None = None
        if self.settings.auto_applies:
            spec, auto = self.size_release(nodes, spec)
        size_eps = auto["budget_split"]["size_epsilon"] if auto else 0.0
        log.info("query %s: %s by %s, end %s, ε=%g per node, %d nodes", spec.query_id, spec.kind, spec.by,
                 spec.end[:10], spec.epsilon, len(nodes))
        replies = self._exchange(nodes, f"query.{spec.kind}", spec.to_config())
        answers, problems = _answers(nodes, replies, "answer", NodeAnswer.from_config)
        if problems:
            spent = ", ".join(a.merchant_id for a in answers) or "none"
            before = f"; every node spent ε={size_eps:g} on the size release" if auto else ""
            raise AnalyticsRefused(f"query {spec.query_id} failed, nothing published: " + "; ".join(sorted(problems))
                                   + f" (nodes that answered and spent ε={spec.epsilon:g}: {spent}{before})")
        result = combine(spec, answers, self.settings.policy)
        result.auto = auto
        sigma = {a.merchant_id: a.noise_multiplier for a in answers}
        size_delta = auto["budget_split"]["size_delta"] if auto else 0.0
        result.nodes = [{**st, "epsilon-spent": spec.epsilon + size_eps, "delta-spent": spec.delta + size_delta,
                         "noise-multiplier": sigma[st["merchant-id"]],
                         **({"size-epsilon-spent": size_eps, "size-delta-spent": size_delta} if auto else {})}
                        for st in self.statuses]
        return result


# -- outputs ------------------------------------------------------------------------------------
_A = TypeVar("_A")


def _answers(nodes: list[int], replies: dict[int, Message], key: str,
             parse: Callable[[Any], _A]) -> tuple[list[_A], list[str]]:
    """Each node's parsed ``key`` record, and a line per node that failed or refused (in ``nodes`` order)."""
    answers: list[_A] = []
    problems: list[str] = []
    for nid in nodes:
        r = replies[nid]
        if r.has_error():
            problems.append(f"node {nid}: {r.error.reason}")
        elif "refusal" in r.content:
            ref = r.content["refusal"]
            problems.append(f"{ref['merchant-id']}: {ref['reason']}")
        else:
            answers.append(parse(r.content[key]))
    return answers, problems


def _atomic_write(path: Path, data: bytes) -> None:
    write_atomic(path, data, mode=0o644)  # outputs are for people to read


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return None if not math.isfinite(float(v)) else float(v)
    return v


def _privacy(result: QueryResult) -> dict[str, Any]:
    """ε and δ each merchant spent in all (with auto granularity: size release + query, two ledger entries)."""
    spec = result.spec
    out: dict[str, Any] = {"epsilon_per_merchant": spec.epsilon, "delta_per_merchant": spec.delta}
    if result.auto:
        split = result.auto["budget_split"]
        out = {"epsilon_per_merchant": split["size_epsilon"] + spec.epsilon,
               "delta_per_merchant": split["size_delta"] + spec.delta,
               "charges": [{"release": "size", "id": result.auto["size_release_id"], "mode": "analytics:size",
                            "epsilon": split["size_epsilon"], "delta": split["size_delta"], "l2_sensitivity": 1.0},
                           {"release": "query", "id": spec.query_id, "mode": f"analytics:{spec.kind}",
                            "epsilon": spec.epsilon, "delta": spec.delta,
                            "l2_sensitivity": spec.l2_sensitivity()}]}
    return {**out, "l2_sensitivity": spec.l2_sensitivity(), "cells_per_user": spec.cells_per_user(),
            "mechanism": "gaussian", "budget_purpose": "analytics"}


def result_json(result: QueryResult) -> dict[str, Any]:
    return _jsonable({
        "status": "completed",
        "query": result.spec.to_config(),
        "description": result.spec.describe(),
        "merchants": result.merchants,
        "nodes": result.nodes,
        **({"auto": result.auto} if result.auto else {}),
        "privacy": _privacy(result),
        "intervals": {f.name: getattr(result.policy, f.name) for f in fields(result.policy)},
        "advice": result.suppression_advice(),
        "figures": result.figures.to_dict(orient="records"),
        "cells": result.cells.to_dict(orient="records"),
    })


def write_outputs(result: QueryResult, out_dir: str | Path) -> dict[str, Path]:
    """``<stem>.png`` (plot), ``<stem>.csv`` (figures), ``<stem>.json`` (everything), written atomically."""
    from fedretain.analytics.plots import plot_result

    out = Path(out_dir)
    stem = output_stem(result.spec)
    paths = {"png": out / f"{stem}.png", "csv": out / f"{stem}.csv", "json": out / f"{stem}.json"}
    _atomic_write(paths["png"], plot_result(result))
    _atomic_write(paths["csv"], result.figures.to_csv(index=False, float_format="%.6g").encode())
    _atomic_write(paths["json"], json.dumps(result_json(result), indent=2, ensure_ascii=False).encode())
    (out / f"{stem}.refused.json").unlink(missing_ok=True)  # an older refusal must not sit beside this result
    return paths


def write_refusal(spec: QuerySpec, reason: str, out_dir: str | Path) -> Path:
    path = Path(out_dir) / f"{output_stem(spec)}.refused.json"
    _atomic_write(path, json.dumps({"status": "refused", "query": _jsonable(spec.to_config()), "reason": reason},
                                   indent=2, ensure_ascii=False).encode())
    return path


__all__ = ["AnalyticsRefused", "AnalyticsSettings", "FederatedQuery", "write_outputs", "write_refusal",
           "output_stem", "result_json"]
