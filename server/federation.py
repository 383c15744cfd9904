"""The round loop of a federated training run.

Flower's ``Strategy.start`` runs rounds 1..N in one go; a platform also needs to
resume from a checkpoint, wait for nodes with a timeout, retry a round that got too
few replies, checkpoint every round and record which merchant (and which consent
state) fed which global model. So this loop drives the strategy's own
``configure_*``/``aggregate_*`` steps (FedAvg, FedProx, or Flower's DP wrappers) and
adds exactly those duties around them.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedretain.dp_evaluation import DEFAULT_EVAL_DELTA, pooled_metrics
from fedretain.features import feature_columns
from fedretain.models import ModelBundle, RetentionNet, Standardizer, make_model
from fedretain.protocol import EVALUATE_RECEIVED, evaluation_of, model_arrays, state_dict_from
from fedretain.server import progress
from fedretain.server.checkpoints import latest_checkpoint, save_checkpoint, sha256_file
from fedretain.server.polling import poll_interval
from fedretain.server.run_record import RunRecord, now_iso
from fedretain.server.settings import RunSettings
from fedretain.server.witness_grid import witnessed
from fedretain.transforms import TRANSFORM_ID, public_standardizer

log = logging.getLogger("fedretain.server")


class RunAborted(RuntimeError):
    """The run cannot go on (too few nodes, every retry failed); the record says why."""


# Share of a DP run's total ε spent on the held-out evaluation release (run_config ``eval-epsilon``
# overrides it): training gets the rest, so ε = ε_train + ε_eval per record (basic composition,
# as the node's budget ledger composes). Evaluated once, on the final model.
DEFAULT_EVAL_SHARE = 0.1


def eval_epsilon(settings: RunSettings) -> float:
    """ε of the held-out evaluation release of a DP run (0 in dp-mode none)."""
    if settings.dp_mode == "none":
        return 0.0
    eps = float(settings.extra.get("eval-epsilon") or settings.target_epsilon * DEFAULT_EVAL_SHARE)  # 0: default
    if not 0 < eps < settings.target_epsilon:
        raise ValueError(f"eval-epsilon must be in (0, target-epsilon={settings.target_epsilon:g}), got {eps:g}")
    from fedretain.dp_evaluation import calibrated
    from fedretain.privacy.accountant import PrivacyError

    try:
        calibrated(eps, DEFAULT_EVAL_DELTA)  # refuse before any node spends, not at the last round
    except PrivacyError as exc:
        raise ValueError(str(exc)) from None
    return eps


def train_epsilon(settings: RunSettings) -> float:
    """ε left for training once the evaluation release is taken out (local and aggregate modes).

    Central mode's ε is merchant-level and spent by the server (``server/strategies.py``); the
    evaluation release there is a record-level release charged to each node's own budget."""
    if settings.dp_mode in ("local", "aggregate"):
        return settings.target_epsilon - eval_epsilon(settings)
    return settings.target_epsilon


def evaluation_metrics(records: list[RecordDict]) -> dict[str, Any]:
    """A round's held-out metrics: pooled from the nodes' score histograms (noisy in DP modes),
    plus, in dp-mode none, the example-weighted mean of the exact per-node metrics."""
    if not records:
        return {}
    metrics = [next(iter(r.metric_records.values())) for r in records]
    hists = [(m["hist-pos"], m["hist-neg"], float(m.get("hist-sd", 0.0))) for m in metrics
             if "hist-pos" in m and "hist-neg" in m]
    out = dict(weighted_mean(records, "num-examples"))
    out.pop("hist-sd", None)
    out.update(pooled_metrics(hists))
    return out


COUNT_PREFIXES = ("users-", "scope-")  # per-node counts (consent_metrics): summed, not averaged


def weighted_mean(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted mean of every numeric metric, ignoring NaN (e.g. AUC of a one-class node).

    Counts are totals over the nodes: the weight, ``num-examples`` and the consent counts
    (``users-*``, ``scope-*``), which a mean would turn into meaningless fractions.
    """
    metrics = [next(iter(r.metric_records.values())) for r in records]
    keys = sorted(set().union(*(m.keys() for m in metrics)))
    out: dict[str, float] = {}
    for key in keys:
        if key in (weight_key, "num-examples") or key.startswith(COUNT_PREFIXES):
            values = [m.get(key, 0) for m in metrics]
            out[key] = float(sum(float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)))
            continue
        num = den = 0.0
        for m in metrics:
            v, w = m.get(key), float(m.get(weight_key, 0))
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)) and w > 0:
                num += w * float(v)
                den += w
        if den > 0:
            out[key] = num / den
    return MetricRecord(out)


REPLY_POLL_S = 0.1


def send_and_receive(grid: Grid, messages: list[Message], timeout: float, poll: float = REPLY_POLL_S) -> list[Message]:
    """``Grid.send_and_receive`` with a short poll: the HTTP grid of flwr 1.42 sleeps a fixed 3 s
    between pulls, which alone adds up to 3 s to every phase of a deployed round."""
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending -= {m.metadata.reply_to_message_id for m in got}
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(poll_interval(len(pending), poll, deadline - time.monotonic()))  # server/polling.py
    return replies


@dataclass
class NodeReply:
    node_id: int
    phase: str
    ok: bool
    metrics: dict[str, Any]
    lineage: dict[str, Any]
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "merchant_id": self.lineage.get("merchant-id", f"node-{self.node_id}"),
            "phase": self.phase,
            "num_examples": self.metrics.get("num-examples"),
            "epsilon": self.metrics.get("epsilon"),
            "metrics": self.metrics,
            "lineage": self.lineage,
            "error": self.error,
        }


def read_evaluations(replies: list[Message]) -> tuple[list[NodeReply], list[RecordDict]]:
    """Per-node evaluation info and metric records from train replies that carry one
    (``fedretain.protocol``) and from plain evaluate replies."""
    info: list[NodeReply] = []
    records: list[RecordDict] = []
    for msg in replies:
        if msg.has_error():
            info.extend(read_replies([msg], "evaluate"))
            continue
        content = msg.content
        folded = evaluation_of(content)
        if folded is None and msg.metadata.message_type == MessageType.TRAIN:
            continue  # a train reply that was not asked to evaluate
        rec = folded if folded is not None else content
        node = read_replies([msg], "evaluate")[0]
        node.metrics = dict(next(iter(rec.metric_records.values())))
        info.append(node)
        records.append(rec)
    return info, records


def read_replies(replies: list[Message], phase: str) -> list[NodeReply]:
    out = []
    for msg in replies:
        nid = int(msg.metadata.src_node_id)
        if msg.has_error():
            out.append(NodeReply(nid, phase, False, {}, {}, error=str(msg.error.reason)))
            continue
        content = msg.content
        metrics = {}
        for rec in content.metric_records.values():
            metrics.update({k: v for k, v in rec.items() if not isinstance(v, list)})
        lineage = dict(content["lineage"]) if "lineage" in content.config_records else {}
        out.append(NodeReply(nid, phase, True, metrics, lineage))
    return out


class FederatedTraining:
    """Runs (or resumes) one training run against a Flower ``Grid``."""

    def __init__(self, grid: Grid, settings: RunSettings, strategy: Strategy) -> None:
        self.grid = witnessed(grid, settings)  # every reply's ledger heads checked (server/witness.py)
        self.settings = settings
        self.strategy = strategy
        self.out_dir = Path(settings.out_dir)
        self.columns = feature_columns(settings.features)

    # -- helpers ---------------------------------------------------------------------
    def wait_for_nodes(self, minimum: int) -> list[int]:
        deadline = time.monotonic() + self.settings.node_wait_timeout
        while True:
            nodes = list(self.grid.get_node_ids())
            if len(nodes) >= minimum:
                return nodes
            if time.monotonic() > deadline:
                raise RunAborted(
                    f"only {len(nodes)} merchant node(s) connected after {self.settings.node_wait_timeout:.0f} s; "
                    f"this run needs at least {minimum}"
                )
            time.sleep(0.5)

    def base_config(self) -> dict[str, Any]:
        s = self.settings
        return {
            "run-id": s.run_id, "purpose": s.purpose, "features": list(s.features),
            "horizon-days": float(s.horizon_days), "cutoff": s.cutoff,
            "hidden": list(s.hidden), "dp-mode": s.dp_mode, "target-epsilon": float(train_epsilon(s)),
            "total-epsilon": float(s.target_epsilon), "eval-epsilon": float(eval_epsilon(s)),
            "eval-delta": DEFAULT_EVAL_DELTA, "transform": TRANSFORM_ID,
            "target-delta": float(s.target_delta), "max-grad-norm": float(s.max_grad_norm),
            "total-rounds": int(s.rounds),
            "dp-accountant": str(s.extra.get("dp-accountant", "rdp")),
            "dp-clipping": str(s.extra.get("dp-clipping", "bk")),
            "max-merchants-per-person": int(s.max_merchants_per_person),
            "person-epsilon-cap": float(s.person_epsilon_cap),
            "eval-fraction": float(s.eval_fraction), "dp-schedule": s.dp_schedule,
        }

    def person_level_record(self) -> dict[str, Any] | None:
        """What the run record says about a person present at several merchants (local DP mode).

        Each node's plan (σ, q) depends on its own number of users, which it does not send, so the
        server cannot compute the person-level table of a local-mode run; every node checks the cap
        itself before reserving budget (``DPTrainer.fit`` → ``fedretain.privacy.person.check_person_cap``)."""
        s = self.settings
        if s.dp_mode != "local":
            return None
        return {"max_merchants_per_person": int(s.max_merchants_per_person),
                "person_epsilon_cap": float(s.person_epsilon_cap), "table": None,
                "enforced_by": "each node's DP trainer, before it reserves budget (fedretain.privacy.person)",
                "why_no_table": "local plans depend on each node's private user count, which is not sent"}

    def dp_schedule_record(self) -> dict[str, Any] | None:
        """Local mode's batch rule for run.json (aggregate mode's schedule is written by server/secagg.py)."""
        if self.settings.dp_mode != "local":
            return None
        from fedretain.privacy.schedule import local_schedule_record

        return local_schedule_record(self.settings)

    def input_transform(self) -> Standardizer:
        """The public input transform (``fedretain.transforms``): nothing is asked of the nodes."""
        return public_standardizer(self.settings.features)

    def standardization_record(self) -> dict[str, Any]:
        s = self.settings
        return {"source": TRANSFORM_ID, "exchanged": "nothing (fixed public ranges, fedretain/transforms.py)",
                "epsilon_train": train_epsilon(s), "epsilon_evaluation": eval_epsilon(s),
                "evaluation": "every round, exact" if s.dp_mode == "none" else
                "final model only, noisy score histograms charged to each node's budget"}

    def bundle(self, arrays: ArrayRecord, scaler: Standardizer, server_round: int) -> ModelBundle:
        return ModelBundle(
            state_dict=state_dict_from(arrays, RetentionNet(len(self.columns), self.settings.hidden)),
            feature_names=self.columns,
            standardizer=scaler,
            hidden=self.settings.hidden,
            kind=self.settings.model,
            meta={
                "run_id": self.settings.run_id, "round": server_round, "purpose": self.settings.purpose,
                "horizon_days": self.settings.horizon_days, "created": now_iso(),
            },
        )

    # -- the loop --------------------------------------------------------------------
    def run(self) -> RunRecord:
        s = self.settings
        record, arrays, scaler, first = self._start_or_resume()
        # everything that can fail from here on (the settings' budget split, the wait for nodes, the
        # first exchange) is inside the tracked run: the record ends `failed` with the reason
        with progress.tracked_run(record, s.rounds, first, self.out_dir / "model.pt"):
            if not record.data.get("standardization"):
                record.data["standardization"] = self.standardization_record()
            if (person := self.person_level_record()) is not None:
                record.data["person_level"] = person
            if (schedule := self.dp_schedule_record()) is not None:
                record.data["dp_schedule"] = schedule
            train_cfg = ConfigRecord({
                **self.base_config(), "local-epochs": s.local_epochs, "batch-size": s.batch_size,
                "learning-rate": s.learning_rate, "proximal-mu": s.proximal_mu,
            })
            eval_cfg = ConfigRecord(self.base_config())
            # DP modes release one evaluation (of the final model): each release costs ε
            every_round = s.dp_mode == "none"
            unevaluated = self._unevaluated_round(record, first) if every_round else None
            record.event("waiting_for_nodes", minimum=s.min_nodes, timeout_s=s.node_wait_timeout)
            self.wait_for_nodes(s.min_nodes)
            for rnd in range(first, s.rounds + 1):
                arrays = self._round(record, rnd, arrays, scaler, train_cfg, eval_cfg, unevaluated)
                unevaluated = rnd if every_round or rnd == s.rounds else None
            if unevaluated:
                self._final_evaluation(record, unevaluated, arrays, eval_cfg)
            self._deliver(record)
        return record

    def _deliver(self, record: RunRecord) -> None:
        """Send the final global model to every participating node (``fedretain.server.delivery``)."""
        from fedretain.server.delivery import deliver_final_model

        deliver_final_model(self.grid, record, self.out_dir / "model.pt", self.settings, send_and_receive)

    @staticmethod
    def _unevaluated_round(record: RunRecord, first: int) -> int | None:
        """The round whose model the first round of this invocation must evaluate (resume)."""
        prev = next((r for r in record.data["rounds"] if r["round"] == first - 1), None)
        return first - 1 if prev is not None and not prev.get("evaluate") else None

    def _start_or_resume(self) -> tuple[RunRecord, ArrayRecord, Standardizer, int]:
        s = self.settings
        found = latest_checkpoint(self.out_dir) if s.resume else None
        if s.resume and (self.out_dir / RunRecord.FILENAME).is_file() and found:
            record = RunRecord.load(self.out_dir)
            rnd, path = found
            rnd = min(rnd, record.last_completed_round) if record.last_completed_round else rnd
            bundle = ModelBundle.load(path)
            if bundle.feature_names != self.columns:
                raise RunAborted(f"cannot resume: checkpoint {path} has other features than this run")
            record.data["status"] = "running"
            record.event("resumed", from_round=rnd, checkpoint=str(path))
            log.info("resuming run %s after round %d from %s", record.data["run_id"], rnd, path)
            return record, model_arrays(bundle.state_dict), bundle.standardizer, rnd + 1
        record = RunRecord.create(self.out_dir, s.run_id, s.as_dict())
        scaler = self.input_transform()
        record.data["feature_columns"] = self.columns
        torch.manual_seed(s.seed)
        model = make_model(s.model, len(self.columns), s.hidden, s.prior_rate)
        record.save()
        return record, model_arrays(model.state_dict()), scaler, 1

    def _round(
        self, record: RunRecord, rnd: int, arrays: ArrayRecord, scaler: Standardizer,
        train_cfg: ConfigRecord, eval_cfg: ConfigRecord, unevaluated: int | None,
    ) -> ArrayRecord:
        """One exchange: train round ``rnd`` and, if ``unevaluated``, evaluate the model it starts from.

        The model sent in round ``rnd`` is round ``unevaluated``'s global model: nodes
        sampled for training evaluate it before training on it; connected nodes not
        sampled get a plain evaluate message in the same exchange.
        """
        s = self.settings
        started = now_iso()
        cfg = ConfigRecord({**train_cfg, EVALUATE_RECEIVED: unevaluated is not None})
        for attempt in range(s.round_retries + 1):
            self.wait_for_nodes(s.min_nodes)
            messages = list(self.strategy.configure_train(rnd, arrays, cfg, self.grid))
            if unevaluated is not None:
                sampled = {m.metadata.dst_node_id for m in messages}
                others = [n for n in self.grid.get_node_ids() if n not in sampled]
                messages += self._evaluate_messages(others, rnd, arrays, eval_cfg)
            replies = send_and_receive(self.grid, messages, s.round_timeout)
            train_replies = [r for r in replies if r.metadata.message_type == MessageType.TRAIN]
            train_info = read_replies(train_replies, "train")
            n_ok = sum(r.ok for r in train_info)
            if n_ok >= s.min_nodes:
                break
            errors = "; ".join(f"node {r.node_id}: {r.error}" for r in train_info if not r.ok) or "no replies"
            record.event("round_retry" if attempt < s.round_retries else "round_failed", round=rnd,
                         answered=n_ok, minimum=s.min_nodes, errors=errors)
            if attempt == s.round_retries:
                raise RunAborted(f"round {rnd}: only {n_ok} node(s) answered (minimum {s.min_nodes}): {errors}")
        if unevaluated is not None:
            self._record_evaluation(record, unevaluated, replies, in_round=rnd)
        new_arrays, train_metrics = self.strategy.aggregate_train(rnd, train_replies)
        if new_arrays is None:
            raise RunAborted(f"round {rnd}: aggregation produced no model")
        ckpt = save_checkpoint(self.out_dir, rnd, self.bundle(new_arrays, scaler, rnd))
        entry = {
            "round": rnd, "status": "completed", "started": started, "finished": now_iso(),
            "train": dict(train_metrics) if train_metrics else {},
            "evaluate": {},  # filled when the next exchange (or the final evaluation) brings it
            "nodes": [r.as_dict() for r in train_info],
            "checkpoint": str(ckpt),
            "model_sha256": sha256_file(ckpt),  # what the officer's erasure-impact view names the model by
        }
        record.add_round(entry)
        progress.notify("on_round_trained", entry)
        return new_arrays

    def _evaluate_messages(self, nodes: list[int], rnd: int, arrays: ArrayRecord,
                           eval_cfg: ConfigRecord) -> list[Message]:
        content = RecordDict({"arrays": arrays, "config": ConfigRecord({**eval_cfg, "server-round": rnd})})
        return [Message(content, dst_node_id=n, message_type=MessageType.EVALUATE) for n in nodes]

    def _final_evaluation(self, record: RunRecord, rnd: int, arrays: ArrayRecord, eval_cfg: ConfigRecord) -> None:
        """Evaluate the last global model on every connected node (its own exchange)."""
        messages = self._evaluate_messages(list(self.grid.get_node_ids()), rnd, arrays, eval_cfg)
        self._record_evaluation(record, rnd, send_and_receive(self.grid, messages, self.settings.round_timeout),
                                in_round=rnd)

    def _record_evaluation(self, record: RunRecord, rnd: int, replies: list[Message], in_round: int) -> None:
        """Put the held-out metrics of round ``rnd``'s model into that round's entry."""
        info, records = read_evaluations(replies)
        entry = next(r for r in record.data["rounds"] if r["round"] == rnd)
        entry["evaluate"] = evaluation_metrics(records)
        entry["evaluated_in_round"] = in_round
        entry["nodes"] = [n for n in entry.get("nodes", []) if n.get("phase") != "evaluate"]
        entry["nodes"] += [r.as_dict() for r in info]
        record.add_round(entry)
        progress.notify("on_round", entry)
