"""The SecAgg+ ServerApp: training runs whose updates the server only sees summed.

flwr 1.42 offers SecAgg+ only through the legacy stack, so this app drives Flower's
``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` with a legacy strategy, after
the same public input transform the regular ServerApp uses (nothing is asked of the nodes). Two strategies:

* :class:`SecureFedAvg` (``dp-mode`` ``none`` or ``local``): FedAvg of the nodes' models;
  SecAgg+ reveals only their (unweighted: every node sends weight 1) mean to the server.
* :class:`AggregateDPSGD` (``dp-mode aggregate``): each round is one DP-SGD step; nodes
  send their clipped gradient sums under SecAgg+, the server adds the Gaussian noise
  once and steps (``fedretain.privacy.aggregate``).

Both write the same run record (``run.json``: per-round metrics, per-merchant ε and
consent lineage) and per-round checkpoints as the regular ServerApp, and deliver the final model to
every participating node (``fedretain.server.delivery``, the record's ``delivery``). Settings beyond
``RunSettings`` are read from its ``extra`` (run_config keys): ``aggregate-batch-size``
(expected customers per step over all merchants; absent or 0 with ``dp-schedule auto``: chosen from N
with the rounds, ``fedretain.privacy.schedule``; 4096 with ``fixed``), ``server-learning-rate``
(Adam on the server in aggregate mode, default ``learning-rate``), ``dp-accountant``,
``secagg-num-shares`` and ``secagg-reconstruction-threshold`` (fractions, defaults 1.0 / 0.7), and
``aggregate-population`` (aggregate mode: the platform's *declared*, public number of customers over
all merchants; it sets the sampling rate q = B/N, the expected batch the noisy sum is divided by,
and the default δ — nodes no longer send exact example counts, and the accounting holds for any N
because every record is Poisson-sampled with rate q).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import Context
from flwr.common import FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp

from fedretain.models import RetentionNet, Standardizer, make_model
from fedretain.server import progress
from fedretain.server.checkpoints import save_checkpoint
from fedretain.server.federation import FederatedTraining, RunAborted, evaluation_metrics, sha256_file, train_epsilon
from fedretain.server.run_record import RunRecord, now_iso
from fedretain.server.settings import RunSettings

if TYPE_CHECKING:
    from fedretain.privacy.schedule import AggregateSchedule

log = logging.getLogger("fedretain.server")

SECURE_MODES = ("none", "local", "aggregate")
SECAGG_CLIENT_APP = "fedretain.clients.secagg_app:app"  # the node's SecAgg+ ClientApp, by component reference
DEFAULT_AGGREGATE_BATCH = 4096  # dp-schedule fixed without aggregate-batch-size


def legacy_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Legacy configs hold scalars only: lists travel as ``json:``-prefixed strings (see secagg_app)."""
    return {k: ("json:" + json.dumps(v)) if isinstance(v, (list, tuple)) else v for k, v in cfg.items()}


def wants_secure_aggregation(settings: RunSettings) -> bool:
    """True when the run must go through this app: ``dp-mode aggregate`` or ``secure-aggregation = true``."""
    flag = str(settings.extra.get("secure-aggregation", "false")).lower() in ("1", "true", "yes")
    if flag and settings.dp_mode == "central":
        raise ValueError("dp-mode central cannot run under SecAgg+ in flwr 1.42 (the DP wrappers need the "
                         "Message-API strategies); choose local or aggregate for secure aggregation")
    return flag or settings.dp_mode == "aggregate"


def extra(settings: RunSettings, key: str, default: Any) -> Any:
    return settings.extra.get(key, default)


def declared_population(settings: RunSettings) -> int:
    """Aggregate mode's N: declared by the platform (public), never counted from the nodes' data."""
    value = settings.extra.get("aggregate-population")
    try:
        n = int(float(value)) if value not in (None, "") else 0
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise ValueError("dp-mode aggregate needs the declared number of customers over all merchants "
                         "(run_config aggregate-population = N, a public figure; nodes do not send exact counts)")
    return n


def weighted_metrics(pairs: list[tuple[int, dict[str, Any]]]) -> dict[str, float]:
    """Weighted mean of the numeric, finite metrics (strings such as lineage are per node only)."""
    out: dict[str, float] = {}
    keys = sorted({k for _, m in pairs for k, v in m.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)})
    for key in keys:
        num = den = 0.0
        for w, m in pairs:
            v = m.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)) and w > 0:
                num += w * float(v)
                den += w
        if den > 0:
            out[key] = num / den
    return out


def node_entry(proxy: Any, phase: str, num_examples: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """One merchant's line in the run record (same shape as the regular ServerApp's)."""
    lineage = {k[len("lineage-"):]: v for k, v in metrics.items() if k.startswith("lineage-")}
    numbers = {k: v for k, v in metrics.items() if not k.startswith("lineage-")}
    return {
        "node_id": int(proxy.node_id), "merchant_id": lineage.get("merchant-id", f"node-{proxy.node_id}"),
        "phase": phase, "num_examples": num_examples, "epsilon": numbers.get("epsilon"), "metrics": numbers,
        "lineage": lineage, "error": None,
    }


def decode_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Undo the nodes' ``json:`` encoding of list-valued legacy metrics (clients/secagg_app.py)."""
    return {k: json.loads(v[5:]) if isinstance(v, str) and v.startswith("json:") else v for k, v in metrics.items()}


def aggregate_person_level(plan: Any, settings: RunSettings, population: int) -> dict[str, Any]:
    """Person-level ε of an aggregate plan (``fedretain.privacy.person``): refuse above the cap, else the table.

    The server decides aggregate mode's mechanism (σ, q, steps), so it can account for a person
    present at up to k merchants itself, before any node is asked to contribute."""
    from fedretain.privacy.budget import RunPlan
    from fedretain.privacy.person import check_person_cap, person_table

    run_plan = RunPlan(run_id=settings.run_id, purpose=settings.purpose, mode="aggregate", accountant=plan.accountant,
                       epsilon=plan.target_epsilon, delta=plan.delta, noise_multiplier=plan.noise_multiplier,
                       sample_rate=plan.sample_rate, planned_steps=plan.rounds, n_records=population)
    k, cap = settings.max_merchants_per_person, settings.person_epsilon_cap
    eps = check_person_cap(run_plan, k, cap, where="aggregate plan")
    return {"max_merchants_per_person": k, "person_epsilon_cap": cap, "person_epsilon": eps,
            "table": [row.as_dict() for row in person_table(run_plan)]}


def aggregate_schedule(settings: RunSettings) -> AggregateSchedule:
    """Aggregate mode's batch and rounds for the declared population (``fedretain.privacy.schedule``):
    with ``dp-schedule auto`` whatever the operator left open is chosen to fit N; refused before any record."""
    from fedretain.privacy.accountant import PrivacyError
    from fedretain.privacy.schedule import aggregate_schedule_for

    try:
        return aggregate_schedule_for(settings, declared_population(settings), train_epsilon(settings))
    except PrivacyError as exc:
        raise ValueError(str(exc)) from None


def record_schedule(record: RunRecord, run: FederatedTraining, schedule: AggregateSchedule | None) -> None:
    """Put the DP schedule (what was chosen, by whom, why) into run.json; warnings as events and in the log."""
    if schedule is None:
        if (local := run.dp_schedule_record()) is not None:
            record.data["dp_schedule"] = local
        return
    record.data["dp_schedule"] = schedule.as_dict()
    for warning in schedule.warnings:
        log.warning("aggregate DP schedule: %s", warning)
        record.event("dp_schedule_warning", mode="aggregate", message=warning)


class _RecordedStrategy(LegacyFedAvg):
    """Legacy FedAvg plumbing shared by both strategies: configs, run record, checkpoints."""

    def __init__(self, run: FederatedTraining, record: RunRecord, scaler: Standardizer, model: RetentionNet,
                 n_nodes: int, fit_config: dict[str, Any]) -> None:
        self.run, self.record, self.scaler, self.model = run, record, scaler, model
        self.fit_config = fit_config
        self.eval_config = {k: v for k, v in fit_config.items() if not k.startswith("agg-")}
        self._round: dict[str, Any] = {}
        super().__init__(
            fraction_fit=1.0, fraction_evaluate=1.0, min_fit_clients=n_nodes, min_evaluate_clients=n_nodes,
            min_available_clients=n_nodes, accept_failures=True,
            on_fit_config_fn=lambda rnd: legacy_config({**self.fit_config, "server-round": rnd}),
            on_evaluate_config_fn=lambda rnd: legacy_config({**self.eval_config, "server-round": rnd}),
            initial_parameters=ndarrays_to_parameters([v.detach().numpy() for v in model.state_dict().values()]),
        )

    def _start_round(self, server_round: int, results, failures) -> None:
        errors = [str(f) for f in failures]
        self._round = {"round": server_round, "status": "completed", "started": now_iso(),
                       "nodes": [node_entry(p, "train", r.num_examples, r.metrics) for p, r in results]
                       + [{"phase": "train", "error": e, "merchant_id": "?", "num_examples": None, "epsilon": None}
                          for e in errors]}
        if len(results) < self.run.settings.min_nodes:
            raise RunAborted(f"round {server_round}: only {len(results)} node(s) contributed "
                             f"(minimum {self.run.settings.min_nodes}): {'; '.join(errors) or 'no replies'}")

    def _set_model(self, arrays: list[np.ndarray]) -> Parameters:
        keys = list(self.model.state_dict())
        self.model.load_state_dict({k: torch.as_tensor(np.asarray(a, dtype=np.float32)) for k, a in zip(keys, arrays)})
        return ndarrays_to_parameters([v.detach().numpy() for v in self.model.state_dict().values()])

    def evaluates(self, server_round: int) -> bool:
        """DP runs release one evaluation (of the final model): each release costs ε."""
        return self.run.settings.dp_mode == "none" or server_round == self.run.settings.rounds

    def configure_evaluate(self, server_round: int, parameters, client_manager):
        return super().configure_evaluate(server_round, parameters, client_manager) if self.evaluates(
            server_round) else []

    def _finish_round(self, server_round: int, evaluate: dict[str, Any], eval_nodes: list[dict[str, Any]]) -> None:
        bundle = self.run.bundle(self._arrayrecord(), self.scaler, server_round)
        ckpt = save_checkpoint(self.run.out_dir, server_round, bundle)
        entry = {**self._round, "finished": now_iso(), "evaluate": evaluate, "checkpoint": str(ckpt),
                 "model_sha256": sha256_file(ckpt)}
        entry["nodes"] = entry.get("nodes", []) + eval_nodes
        self.record.add_round(entry)
        progress.notify("on_round", entry)

    def _fitted(self, server_round: int) -> None:
        """After aggregate_fit: a round without an evaluation is finished here."""
        if not self.evaluates(server_round):
            self._finish_round(server_round, {}, [])

    def aggregate_evaluate(self, server_round: int, results, failures):
        from flwr.app import MetricRecord, RecordDict

        if self._round.get("round") != server_round:  # SecAgg+ halted this round: nothing was aggregated
            raise RunAborted(f"round {server_round}: secure aggregation did not complete (too few nodes "
                             f"answered a SecAgg+ stage); stopping the run")
        decoded = [(p, r, decode_metrics(r.metrics)) for p, r in results]
        records = [RecordDict({"metrics": MetricRecord({k: v for k, v in m.items() if not isinstance(v, str)})})
                   for _, _, m in decoded]
        evaluate = evaluation_metrics(records)
        failed = [{"phase": "evaluate", "error": str(f), "merchant_id": "?", "num_examples": None, "epsilon": None}
                  for f in failures]  # kept in the record: a missing evaluation must say why
        self._finish_round(server_round, evaluate, [node_entry(p, "evaluate", r.num_examples, m)
                                                    for p, r, m in decoded] + failed)
        return float(evaluate.get("log_loss", float("nan"))), evaluate

    def _arrayrecord(self):
        from flwr.app import ArrayRecord

        return ArrayRecord({k: v.detach().clone() for k, v in self.model.state_dict().items()})


class SecureFedAvg(_RecordedStrategy):
    """FedAvg whose weighted mean comes out of SecAgg+ (no single node's model is seen)."""

    def aggregate_fit(self, server_round: int, results: list[tuple[Any, FitRes]], failures):
        self._start_round(server_round, results, failures)
        # SecAggPlusWorkflow already put the weighted mean into every result's parameters
        mean = parameters_to_ndarrays(results[0][1].parameters)
        params = self._set_model(mean)
        train = weighted_metrics([(r.num_examples, r.metrics) for _, r in results])
        self._round["train"] = train
        self._fitted(server_round)
        return params, train


class AggregateDPSGD(_RecordedStrategy):
    """One DP-SGD step per round on the securely summed clipped gradients (noise added here)."""

    def __init__(self, *args: Any, plan, server_learning_rate: float, **kwargs: Any) -> None:
        from fedretain.privacy.aggregate import ServerDPSGD

        super().__init__(*args, **kwargs)
        self.plan = plan
        self.sgd = ServerDPSGD(self.model, plan, server_learning_rate)

    def aggregate_fit(self, server_round: int, results: list[tuple[Any, FitRes]], failures):
        self._start_round(server_round, results, failures)
        if any(r.num_examples != 1 for _, r in results):
            raise RunAborted(f"round {server_round}: aggregate mode needs weight 1 from every node")
        # SecAgg+ returns the mean over the contributing nodes (all weight 1): × count = the sum
        epsilon = self.sgd.step_mean(parameters_to_ndarrays(results[0][1].parameters), len(results))
        params = self._set_model([v.detach().numpy() for v in self.model.state_dict().values()])
        train = weighted_metrics([(1, r.metrics) for _, r in results])
        train.update({"aggregate-epsilon": epsilon, "aggregate-delta": self.plan.delta,
                      "aggregate-noise-multiplier": self.plan.noise_multiplier, "contributors": float(len(results))})
        self._round["train"] = train
        self._fitted(server_round)
        return params, train


def run_secure(grid: Grid, context: Context, settings: RunSettings) -> RunRecord:
    """Standardise, then run all rounds under SecAgg+; return the finished run record."""
    if settings.dp_mode not in SECURE_MODES:
        raise ValueError(f"dp-mode {settings.dp_mode!r} does not run under SecAgg+ (use one of {SECURE_MODES})")
    if settings.resume:
        raise ValueError("resuming a secure-aggregation run is not supported (SecAgg+ state is per run)")
    if settings.strategy != "fedavg":
        raise ValueError("secure aggregation runs with strategy fedavg only")
    if settings.model == "auto":
        raise ValueError("model auto (selection on validation users) does not run under SecAgg+ yet: choose a model")
    schedule = aggregate_schedule(settings) if settings.dp_mode == "aggregate" else None
    if schedule is not None:  # auto may choose the rounds: every later step sees the chosen number
        settings = dataclasses.replace(settings, rounds=schedule.rounds)
    run = FederatedTraining(grid, settings, strategy=None)  # its helpers only (strategy unused)
    record = RunRecord.create(run.out_dir, settings.run_id,
                              {**settings.as_dict(), "secure_aggregation": "secagg+"})
    with progress.tracked_run(record, settings.rounds, 1, run.out_dir / "model.pt"):
        scaler = run.input_transform()
        record.data["feature_columns"] = run.columns
        record.data["standardization"] = run.standardization_record()
        if (person := run.person_level_record()) is not None:
            record.data["person_level"] = person
        record_schedule(record, run, schedule)
        torch.manual_seed(settings.seed)
        model = make_model(settings.model, len(run.columns), settings.hidden, settings.prior_rate)
        n_nodes = len(run.wait_for_nodes(settings.min_nodes))
        fit_config = {**run.base_config(), "local-epochs": settings.local_epochs, "batch-size": settings.batch_size,
                      "learning-rate": settings.learning_rate, "proximal-mu": settings.proximal_mu,
                      "dp-accountant": str(extra(settings, "dp-accountant", "rdp")),
                      "dp-clipping": str(extra(settings, "dp-clipping", "bk"))}
        common = dict(run=run, record=record, scaler=scaler, model=model, n_nodes=n_nodes, fit_config=fit_config)
        if settings.dp_mode == "aggregate":
            from fedretain.privacy.aggregate import plan_aggregate

            assert schedule is not None
            plan = plan_aggregate(train_epsilon(settings), settings.target_delta, declared_population(settings),
                                  schedule.expected_batch, settings.rounds, settings.max_grad_norm,
                                  fit_config["dp-accountant"])
            fit_config.update(plan.to_config())
            record.data["aggregate_plan"] = plan.to_config()
            record.data["person_level"] = aggregate_person_level(plan, settings, declared_population(settings))
            strategy: _RecordedStrategy = AggregateDPSGD(
                **common, plan=plan,
                server_learning_rate=float(extra(settings, "server-learning-rate", 0.0) or settings.learning_rate))
            workflow = SecAggPlusWorkflow(
                float(extra(settings, "secagg-num-shares", 1.0)),
                float(extra(settings, "secagg-reconstruction-threshold", 0.7)),
                max_weight=1.0, clipping_range=plan.clipping_range, quantization_range=plan.quantization_range,
                timeout=settings.round_timeout)
        else:
            strategy = SecureFedAvg(**common)
            workflow = SecAggPlusWorkflow(
                float(extra(settings, "secagg-num-shares", 1.0)),
                float(extra(settings, "secagg-reconstruction-threshold", 0.7)),
                max_weight=1.0, timeout=settings.round_timeout)  # every node sends weight 1
        record.save()
        legacy = LegacyContext(context, config=ServerConfig(num_rounds=settings.rounds,
                                                           round_timeout=settings.round_timeout), strategy=strategy)
        DefaultWorkflow(fit_workflow=workflow)(run.grid, legacy)  # run.grid: witnessed
        done = record.last_completed_round
        if done != settings.rounds:
            raise RunAborted(f"secure aggregation stopped after {done} of {settings.rounds} rounds "
                             f"(a SecAgg+ stage lost too many nodes; see the server log)")
        run._deliver(record)  # every participating node receives the final model, as in a FedAvg run
    return record


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = RunSettings.from_run_config(dict(context.run_config))
    record = run_secure(grid, context, settings)
    log.info("secure run %s %s; record at %s", settings.run_id, record.data["status"], record.path)


def run_secagg_simulation(settings: RunSettings, data_dir: str | Path, *, num_cpus: int | None = None) -> Path:
    """Like ``fedretain.server.simulation.run_in_simulation`` but with the SecAgg+ apps."""
    from fedretain.server.simulation import run_in_simulation

    return run_in_simulation(settings, data_dir, num_cpus=num_cpus, server_app=app, client_app=SECAGG_CLIENT_APP)
