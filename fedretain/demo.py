"""The two demos behind ``fedretain demo``: a simulation, and a whole deployment on one machine.

A composition root (like ``fedretain.cli``): it wires the merchant node, the platform and
the core together, so it may import all of them; the CLI command is ``fedretain/cli/demo.py``.

:func:`run_demo` synthesizes silos, provisions nodes, trains in Flower's Simulation
Engine, trains a centralized yardstick, scores users and writes ``report.html``.

A whole deployment on one machine: a platform and merchant nodes as separate processes.

:class:`LocalDeployment` prepares a workspace (synthetic silos, provisioned nodes, a
development CA, one node key per merchant, ``server.toml``), starts the platform
(SuperLink with TLS and node authentication) and each merchant's node with
``fedretain client start`` in its own process group, and stops everything it started
when used as a context manager — also when something fails. :func:`run_deploy_demo` is
the one-command demo (``fedretain demo --deploy``); the end-to-end tests and
``bench/bench_round_latency.py`` drive the same class.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedretain.procs import ProcRef, free_port, stop_tree
from fedretain.report import write_demo_report
from fedretain.server.deploy import Platform, PlatformConfig, run_progress


@dataclass(frozen=True)
class DemoPlan:
    workspace: Path
    merchants: int = 6
    users: int = 30000
    rounds: int = 6
    local_epochs: int = 3
    seed: int = 0


def run_demo(plan: DemoPlan, say: Callable[[str], Any] = print, ensure_nodes: Callable | None = None) -> dict[str, Any]:
    """Synthesize → provision nodes → simulate → centralized yardstick → score → report."""
    from fedretain.centralized import evaluate_bundle, pool, train_centralized
    from fedretain.clients.node import MerchantNode, NodeConfig
    from fedretain.ingest import write_table
    from fedretain.models import ModelBundle
    from fedretain.scoring import fit_money_calibration, merchant_currency, score_users
    from fedretain.server.run_record import write_json_atomic
    from fedretain.server.settings import RunSettings
    from fedretain.server.simulation import run_in_simulation
    from fedretain.synth import generate
    from fedretain.train import predict

    ws = plan.workspace
    data = ws / "silos"
    say(f"[1/5] synthesising {plan.merchants} merchants with {plan.users} users in {data}")
    silos = generate(data, plan.merchants, plan.users, plan.seed)
    say("[2/5] provisioning merchant nodes: node keys and consent ledgers from each silo's consent.csv")
    if ensure_nodes is not None:
        ensure_nodes(data)
    settings = RunSettings(rounds=plan.rounds, local_epochs=plan.local_epochs, out_dir=str(ws / "run"),
                           seed=plan.seed, min_nodes=plan.merchants)
    say(f"[3/5] federated training: {plan.rounds} rounds over {len(silos)} simulated merchant nodes")
    run_dir = run_in_simulation(settings, data)
    record = json.loads((run_dir / "run.json").read_text())
    bundle = ModelBundle.load(run_dir / "model.pt")

    say("[4/5] yardstick: the same model on the pooled data (what federation avoids), same users held out")
    nodes = [MerchantNode(NodeConfig.for_silo(s)) for s in silos]
    at = None
    prepared = [n.prepare(settings.purpose, list(settings.features), settings.horizon_days, at=at) for n in nodes]
    pooled = pool(prepared)
    central_model, central_scaler, central = train_centralized(
        pooled, settings.hidden, epochs=plan.rounds * plan.local_epochs, learning_rate=settings.learning_rate,
        seed=plan.seed)
    federated = evaluate_bundle(bundle, pooled)

    say(f"[5/5] scoring {nodes[0].merchant_id}'s users locally, checking value in money and the value of joining")
    horizon = float(settings.horizon_days)
    notes: list[str] = []
    try:
        currency = merchant_currency(nodes[0].silo.merchant)
    except ValueError as exc:
        currency = ""
        notes.append(f"{exc}; money shown without a currency")
    try:  # the shop's own factor, as `fedretain score` fits it (its labelled customers of the last horizon)
        calibration = fit_money_calibration(bundle, prepared[0], horizon, currency)
    except ValueError as exc:
        calibration = None
        notes.append(f"Predicted value not calibrated in money: {exc}.")
    decision, gated = nodes[0].gate(settings.purpose)
    scores = score_users(bundle, gated, nodes[0].data_end(), calibration=calibration)
    scores_csv = write_table(scores, ws / f"scores_{nodes[0].merchant_id}.csv")
    ltv = ltv_check(bundle, prepared[0], horizon, currency)
    if ltv is None:
        notes.append(f"No LTV decile check for {nodes[0].merchant_id}: too few buyers among its training customers "
                     f"to fit a money factor on them and check it on the held-out ones.")
    joining = value_of_joining(bundle, nodes, prepared, settings, epochs=plan.rounds * plan.local_epochs)

    coverage = {}
    for node, prep in zip(nodes, prepared):
        coverage[node.merchant_id] = {"candidates": prep.decision.n_candidates,
                                      "consented": len(prep.decision.grants), "used": len(prep.used_users)}
    last = record["rounds"][-1]
    per_merchant = {n["merchant_id"]: {"auc": n["metrics"].get("auc"), "num_examples": n["num_examples"]}
                    for n in last["nodes"] if n["phase"] == "evaluate" and not n.get("error")}
    y_test, fed_model = pooled.y_test[:, 0], bundle.build_model()
    federated.update(auc_interval(y_test, predict(fed_model, bundle.standardizer.transform(pooled.x_test))[0],
                                  plan.seed))
    central.update(auc_interval(y_test, predict(central_model, central_scaler.transform(pooled.x_test))[0], plan.seed))
    summary = {
        "workspace": str(ws), "merchants": [n.merchant_id for n in nodes],
        "federated": federated, "centralized": central, "auc_gap": central["auc"] - federated["auc"],
        "mean_merchant_auc": last.get("evaluate", {}).get("auc"),
        "consent_coverage": coverage, "per_merchant_auc": per_merchant,
        "segments": scores["segment"].value_counts().to_dict(),
        "currency": currency, "horizon_days": horizon,
        "money_calibration": calibration.as_dict() if calibration else None,
        "ltv_check": {k: v for k, v in ltv.items() if k != "deciles"} if ltv else None,
        "joining": joining,
        "scores_csv": str(scores_csv), "run_json": str(ws / "run.json"), "report_html": str(ws / "report.html"),
    }
    shutil.copyfile(run_dir / "run.json", ws / "run.json")
    write_json_atomic(ws / "summary.json", summary)
    write_demo_report(ws / "report.html", record, summary, scores, currency=currency, horizon_days=horizon,
                      calibrated=calibration is not None, ltv=ltv, joining=joining, notes=notes)
    return summary


def auc_interval(y: np.ndarray, prob: np.ndarray, seed: int = 0, resamples: int = 200) -> dict[str, float]:
    """95 % percentile-bootstrap interval of the pooled held-out AUC (empty when a class has < 5 customers)."""
    from scipy.stats import bootstrap

    from fedretain.metrics import roc_auc

    y = np.asarray(y, np.float64)
    if min(y.sum(), len(y) - y.sum()) < 5:
        return {}
    res = bootstrap((y, np.asarray(prob, np.float64)), roc_auc, paired=True, vectorized=False,
                    n_resamples=resamples, method="percentile", random_state=seed)
    return {"auc_low": float(res.confidence_interval.low), "auc_high": float(res.confidence_interval.high)}


def ltv_check(bundle, prep, horizon_days: float, currency: str) -> dict[str, Any] | None:
    """Money calibration fitted on the node's training customers, checked on held-out ones (None: too few buyers)."""
    from fedretain.ltv import holdout_check
    from fedretain.train import predict

    model, tr = bundle.build_model(), bundle.standardizer.transform
    (p_tr, raw_tr), (p_te, raw_te), spend = predict(model, tr(prep.x_train)), predict(model, tr(prep.x_test)), np.expm1
    return holdout_check(raw_tr, spend(prep.y_train[:, 1].astype(np.float64)), raw_te,
                         spend(prep.y_test[:, 1].astype(np.float64)), horizon_days, currency, p_train=p_tr, p_test=p_te)


def value_of_joining(bundle, nodes, prepared, settings, epochs: int) -> list[dict[str, Any]]:
    """Per merchant, on its own node: local-only vs global vs fine-tuned (``fedretain.joining``), nothing sent."""
    from fedretain.joining import compare
    from fedretain.train import TrainConfig

    cfg = TrainConfig(epochs=1, batch_size=settings.batch_size, learning_rate=settings.learning_rate,
                      seed=settings.seed)
    out = []
    for node, prep in zip(nodes, prepared):
        if len(prep.x_train) == 0 or len(prep.x_test) == 0:
            continue
        tr = bundle.standardizer.transform
        res = compare(node.merchant_id, bundle.build_model(), tr(prep.x_train), prep.y_train, tr(prep.x_test),
                      prep.y_test, cfg, local_epochs=epochs)
        out.append(res.as_dict())
    return out


# -- the deployment demo: platform and nodes as separate processes -----------------------------------
NODE_STOP_GRACE_S = 15.0


def fedretain_command(*args: str) -> list[str]:
    """``fedretain ARGS`` with this very interpreter (no PATH lookup)."""
    return [sys.executable, "-c", "from fedretain.cli import main; main()", *args]


@dataclass
class NodeProcess:
    """One ``fedretain client start`` process (the leader of its own process group)."""

    index: int
    proc: subprocess.Popen
    log: Path
    ref: ProcRef

    def output(self) -> str:
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class LocalDeployment:
    """Platform + merchant nodes on 127.0.0.1, all started (and stopped) by this object."""

    workspace: Path
    merchants: int = 3
    users: int = 1500
    rounds: int = 3
    min_nodes: int | None = None
    run: dict[str, Any] = field(default_factory=dict)
    executor: str = "warm"
    poll_interval: float | None = 0.2
    heartbeat_interval: float | None = None  # None: Flower's 30 s
    port: int = 0
    seed: int = 7
    project_dir: Path | None = None
    echo: Callable[[str], None] = print
    nodes: dict[int, NodeProcess] = field(default_factory=dict)  # the current process of each merchant
    started: list[NodeProcess] = field(default_factory=list)  # every node process ever started here
    platform: Platform | None = None

    def __post_init__(self) -> None:
        self.workspace = Path(self.workspace).resolve()
        self.port = self.port or free_port()

    # -- paths -------------------------------------------------------------------------------
    @property
    def silos(self) -> list[Path]:
        return sorted(p for p in (self.workspace / "silos").iterdir() if p.is_dir())

    def key(self, i: int) -> Path:
        return self.workspace / "keys" / f"merchant_{i:02d}"

    @property
    def config_path(self) -> Path:
        return self.workspace / "server.toml"

    @property
    def out_dir(self) -> Path:
        return self.workspace / "runs" / "deploy"

    # -- setup -------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Silos, node provisioning, CA + server certificate, node keys, server config (idempotent)."""
        from fedretain import tls
        from fedretain.clients.provision import provision_node
        from fedretain.synth import generate

        ws = self.workspace
        if not (ws / "silos").is_dir():
            generate(ws / "silos", n_merchants=self.merchants, n_users=self.users, seed=self.seed)
        for silo in self.silos:
            provision_node(silo)
        if not (ws / "certs" / "ca.crt").exists():
            tls.init_certs(ws / "certs")
        (ws / "node-keys").mkdir(parents=True, exist_ok=True)
        for i in range(len(self.silos)):
            if not self.key(i).exists():
                tls.create_node_key(self.key(i), f"merchant_{i:02d}")
            pub = ws / "node-keys" / f"merchant_{i:02d}.pub"
            if not pub.exists():
                pub.write_bytes(self.key(i).with_name(self.key(i).name + ".pub").read_bytes())
        self.write_config()

    def write_config(self) -> Path:
        import tomli_w

        run = {"num-server-rounds": self.rounds, "min-nodes": self.min_nodes or len(self.silos),
               "out-dir": str(self.out_dir), "local-epochs": 1, **self.run}
        server: dict[str, Any] = {"host": "127.0.0.1", "port": self.port, "state-dir": str(self.workspace / "platform")}
        if self.project_dir:
            server["project-dir"] = str(self.project_dir)
        cfg = {
            "server": server,
            "tls": {"ca-cert": "certs/ca.crt", "server-cert": "certs/server.pem", "server-key": "certs/server.key"},
            "auth": {"enabled": True, "node-keys": "node-keys"},
            "run": run,
        }
        self.config_path.write_text(tomli_w.dumps(cfg), encoding="utf-8")
        return self.config_path

    # -- processes ---------------------------------------------------------------------------
    def start_platform(self, *, resume: bool = False, submit: bool = True) -> dict[str, Any]:
        """Start the platform; ``submit=False`` starts it without a run (``server start --no-run``)."""
        self.platform = Platform(PlatformConfig.load(self.config_path))
        return self.platform.start(resume=resume, echo=self.echo, submit=submit)

    def submit_run(self, *, resume: bool = False) -> dict[str, Any]:
        """Submit the run to the platform started with ``submit=False`` (``server run``)."""
        assert self.platform is not None, "start_platform(submit=False) first"
        return self.platform.submit_run(resume=resume, echo=self.echo)

    def start_node(self, i: int, *, key: Path | None = None, insecure: bool = False,
                   extra: tuple[str, ...] = ()) -> NodeProcess:
        """Start merchant ``i``'s node (``key`` overrides its registered key)."""
        silo = self.silos[i]
        args = ["client", "start", "--server", f"127.0.0.1:{self.port}", "--data", str(silo),
                "--executor", self.executor, "--poll-interval", str(self.poll_interval or 0)]
        if self.heartbeat_interval is not None:
            args += ["--heartbeat-interval", str(self.heartbeat_interval)]
        if insecure:
            args.append("--insecure")
        else:
            args += ["--root-cert", str(self.workspace / "certs" / "ca.crt"), "--key", str(key or self.key(i))]
        log = self.workspace / "logs" / f"node-{i}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", PYTHONUNBUFFERED="1")
        with open(log, "ab") as fh:
            proc = subprocess.Popen(fedretain_command(*args, *extra), stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, cwd=self.workspace, start_new_session=True)
        node = NodeProcess(i, proc, log, ProcRef.of(f"node-{i}", proc.pid))
        self.started.append(node)
        if i not in self.nodes or not self.nodes[i].alive():
            self.nodes[i] = node  # an extra process for the same merchant (a test's intruder) is not "the" node
        return node

    def kill_node(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Kill merchant ``i``'s whole node (supervisor, SuperNode, executor) like a crash would."""
        node = self.nodes[i]
        try:
            os.killpg(node.proc.pid, sig)
        except ProcessLookupError:
            pass
        node.proc.wait(30)

    def stop_node(self, i: int) -> None:
        node = self.nodes.get(i)
        if node is not None:
            self._stop(node)

    @staticmethod
    def _stop(node: NodeProcess) -> None:
        if node.alive():
            try:
                os.killpg(node.proc.pid, signal.SIGTERM)
                node.proc.wait(NODE_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                pass
        try:  # anything left in the group (a SuperNode that ignored SIGTERM)
            os.killpg(node.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        node.proc.wait(10)

    def kill_platform(self) -> None:
        """SIGKILL the SuperLink and everything under it (a crashed server; nothing is saved)."""
        if self.platform is None:
            return
        for ref in self.platform.processes():
            stop_tree(ref, crash=True)

    def stop_platform(self) -> None:
        if self.platform is not None:
            self.platform.stop(echo=lambda _m: None)

    def stop_all(self) -> None:
        for node in self.started:
            self._stop(node)
        self.stop_platform()

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    # -- waiting -----------------------------------------------------------------------------
    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        """Poll ``run.json`` until ``predicate(progress)``; fail with node output on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            prog = run_progress(self.out_dir)
            if predicate(prog):
                return prog
            if prog.get("status") == "failed":
                raise RuntimeError(f"run failed while waiting for {what}: {prog.get('error')}")
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- node {i} ---\n{n.output()[-1500:]}" for i, n in self.nodes.items())
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}; run: {prog}\n{tails}")
            time.sleep(0.5)

    def wait_online(self, n: int, timeout: float = 300) -> list[dict[str, Any]]:
        """Wait until the SuperLink lists ``n`` nodes as online (before a run is submitted)."""
        from fedretain.server.platform_keys import CONNECTION

        assert self.platform is not None, "start the platform first"
        deadline = time.monotonic() + timeout
        while True:
            nodes = self.platform.flwr_json("supernode", "ls", CONNECTION, timeout=60).get("nodes", [])
            online = [nd for nd in nodes if str(nd.get("status", "")).lower() == "online"]
            if len(online) >= n:
                return online
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {n} online nodes; {nodes}")
            time.sleep(1.0)

    def wait_round(self, n: int, timeout: float = 300) -> dict[str, Any]:
        return self.wait_for(lambda p: p.get("last_round", 0) >= n, timeout, f"round {n}")

    def wait_done(self, timeout: float = 300) -> dict[str, Any]:
        return self.wait_for(lambda p: p.get("status") in ("completed", "failed"), timeout, "the end of the run")


def run_deploy_demo(workspace: str | os.PathLike[str], *, merchants: int = 3, users: int = 1500, rounds: int = 3,
                    timeout: float = 600, echo: Callable[[str], None] = print,
                    project_dir: Path | None = None) -> dict[str, Any]:
    """Platform + ``merchants`` nodes as separate processes on 127.0.0.1, TLS and node auth, ``rounds`` rounds.

    Returns a summary (rounds, merchants per round, final metrics, paths, wall time). Every
    process started here is stopped before returning, also on error or Ctrl-C. An existing
    ``workspace/silos`` folder is used as it is; ``project_dir`` is the fedretain source
    root ``flwr run`` packages (default: the installed one).
    """
    started = time.monotonic()
    dep = LocalDeployment(Path(workspace), merchants=merchants, users=users, rounds=rounds, echo=echo,
                          project_dir=project_dir)
    echo(f"preparing {dep.workspace}: {merchants} synthetic merchants, CA, node keys")
    dep.prepare()
    with dep:
        dep.start_platform()
        for i in range(len(dep.silos)):
            node = dep.start_node(i)
            echo(f"started merchant node {i} (pid {node.proc.pid}); log {node.log}")
        shown = 0

        def progress(p: dict[str, Any]) -> bool:
            nonlocal shown
            from fedretain.server.run_progress import format_round

            for r in p.get("rounds_done", [])[shown:]:
                echo(format_round(r, rounds))
            shown = len(p.get("rounds_done", []))
            return p.get("status") in ("completed", "failed")

        prog = dep.wait_for(progress, timeout, "the end of the run")
    last = prog["rounds_done"][-1] if prog.get("rounds_done") else {}
    summary = {
        "status": prog.get("status"), "rounds": prog.get("last_round", 0), "merchants": prog.get("merchants", {}),
        "final_evaluate": last.get("evaluate", {}), "run_record": str(dep.out_dir / "run.json"),
        "model": str(dep.out_dir / "model.pt"), "logs": str(dep.workspace / "logs"),
        "platform_logs": str(dep.workspace / "platform" / "logs"), "seconds": round(time.monotonic() - started, 1),
    }
    echo(f"run {summary['status']} after {summary['rounds']} round(s) in {summary['seconds']} s; "
         f"all processes stopped; record {summary['run_record']}")
    return summary
