"""The fedretain ServerApp (Flower Message API).

Runs with ``flwr run .`` like any Flower app (config from ``[tool.flwr.app.config]``),
in fedretain's in-process simulation, and under the Deployment Engine.
"""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedretain.server.federation import FederatedTraining
from fedretain.server.secagg import run_secure, wants_secure_aggregation
from fedretain.server.selection import SelectingTraining
from fedretain.server.settings import RunSettings
from fedretain.server.strategies import build_strategy

log = logging.getLogger("fedretain.server")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = RunSettings.from_run_config(dict(context.run_config))
    if wants_secure_aggregation(settings):  # SecAgg+ runs only through Flower's legacy workflow
        record = run_secure(grid, context, settings)
    else:
        training = SelectingTraining if settings.model == "auto" else FederatedTraining  # model choice first
        record = training(grid, settings, build_strategy(settings)).run()
    log.info("run %s %s; record at %s", settings.run_id, record.data["status"], record.path)
