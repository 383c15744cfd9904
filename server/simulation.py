"""Run the fedretain ServerApp and ClientApp in Flower's Simulation Engine, in-process.

``flwr run`` with a local simulation works too (the apps are normal Flower apps), but it
starts a detached SuperLink and re-reads pyproject; for the CLI and tests we run the
same two apps in this process so a run's settings, progress bar and exceptions stay
here. One virtual SuperNode per silo; each silo is partition ``i`` in sorted order.

Ray starts its workers at nice 15 by default (``RAY_worker_niceness``). The merchant nodes
*are* those workers, so on a machine with any other load a run crawls behind everything
else (a 5-merchant run stalled for over 6 minutes until the setting was 0, issue 14). A
simulation is the user's own foreground job: its workers run at the driver's priority
(``RAY_worker_niceness=0``) unless the user set the variable, e.g. ``RAY_worker_niceness=10``
to keep a long simulation in the background.
"""

from __future__ import annotations

import importlib
import logging
import os
import tempfile
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from fedretain.server.settings import RunSettings

SERVER_APP = "fedretain.server.server_app:app"
CLIENT_APP = "fedretain.clients.client_app:app"  # as in pyproject's [tool.flwr.app.components]
WORKER_NICENESS_ENV = "RAY_worker_niceness"


def load_app(ref: str) -> Any:
    """A Flower app from its component reference ``module:attribute`` (as ``flwr run`` loads them).

    The platform names the merchant node's ClientApp the way pyproject.toml does, instead of
    importing the node package: in a deployment the two run on different machines.
    """
    module, _, attr = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def silo_folders(data_dir: str | Path) -> list[Path]:
    """The merchant silos of a simulation (folders with ``merchant.json``), in partition order."""
    silos = sorted(p for p in Path(data_dir).iterdir() if p.is_dir() and (p / "merchant.json").is_file())
    if not silos:
        raise RuntimeError(f"no merchant silos (folders with merchant.json) under {data_dir}")
    return silos


def simulation_env(env: MutableMapping[str, str]) -> None:
    """Defaults of a simulation's environment (inherited by Ray's processes); what the user set wins."""
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    env.setdefault("RAY_DEDUP_LOGS", "0")
    env.setdefault(WORKER_NICENESS_ENV, "0")  # see the module docstring: not Ray's nice 15


def run_in_simulation(settings: RunSettings, data_dir: str | Path, *, num_cpus: int | None = None,
                      server_app: Any = None, client_app: Any = None) -> Path:
    """Train on every silo under ``data_dir``; return the run folder (run.json, checkpoints).

    ``server_app`` runs another ServerApp over the same ClientApp (default: the training one,
    e.g. ``fedretain.server.analytics_app:app``); apps may be given as objects or as component
    references. ``settings.extra`` reaches the ServerApp in run_config.
    """
    simulation_env(os.environ)
    ray_tmp = Path(os.environ.get("RAY_TMPDIR") or tempfile.mkdtemp(prefix="fedretain-ray-"))
    os.environ["RAY_TMPDIR"] = str(ray_tmp)
    data_dir = Path(data_dir).resolve()
    os.environ["FEDRETAIN_SIM_DATA_DIR"] = str(data_dir)  # inherited by the Ray workers

    from flwr.app import Context, RecordDict

    from fedretain.compat.flower import run_simulation

    n_nodes = len(silo_folders(data_dir))
    logging.getLogger("flwr").setLevel(logging.WARNING)  # the run's own progress is reported by observers
    run_config = {**settings.extra, **settings.to_run_config()}
    run_config["out-dir"] = str(Path(settings.out_dir).resolve())
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    cpus = num_cpus or max(1, min(os.cpu_count() or 1, n_nodes))
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "_node_ip_address": "127.0.0.1", "_temp_dir": str(ray_tmp),
                      "logging_level": logging.ERROR, "log_to_driver": True},
    }
    server_app, client_app = server_app or SERVER_APP, client_app or CLIENT_APP
    server_app = load_app(server_app) if isinstance(server_app, str) else server_app
    client_app = load_app(client_app) if isinstance(client_app, str) else client_app
    run_simulation(num_supernodes=n_nodes, client_app=client_app, server_app=server_app,
                   backend_config=backend_config, server_app_context=context)
    return Path(run_config["out-dir"])
