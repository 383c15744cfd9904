"""The fedretain analytics ServerApp: one DP query per run (not a training round).

Run in simulation with :func:`run_query_in_simulation` (what ``fedretain analytics ...``
does), or in deployment with ``flwr run`` from an app folder whose pyproject names
``serverapp = "fedretain.server.analytics_app:app"`` (see ``docs/ANALYTICS.md``); the
merchants' SuperNodes run the usual fedretain ClientApp, which answers the queries.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedretain.analytics.granularity import NO_AUTO, AutoSettings
from fedretain.analytics.intervals import IntervalPolicy
from fedretain.analytics.queries import QueryError, QuerySpec
from fedretain.server.analytics import (
    AnalyticsRefused,
    AnalyticsSettings,
    FederatedQuery,
    output_stem,
    write_outputs,
    write_refusal,
)

log = logging.getLogger("fedretain.server.analytics")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        settings = AnalyticsSettings.from_run_config(dict(context.run_config))
    except (QueryError, ValueError) as exc:
        log.error("analytics query not started: %s", exc)
        raise
    try:
        result = FederatedQuery(grid, settings).run()
    except AnalyticsRefused as exc:
        write_refusal(settings.spec, str(exc), settings.out_dir)
        log.error("%s", exc)
        return
    write_outputs(result, settings.out_dir)
    log.info("query %s done (%d merchants)", settings.spec.query_id, len(result.merchants))


@dataclass
class QueryOutputs:
    """Files a completed query wrote, and its JSON record."""

    png: Path
    csv: Path
    json: Path
    record: dict[str, Any]


def run_query_in_simulation(
    query: QuerySpec,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    policy: IntervalPolicy | None = None,
    num_cpus: int | None = None,
    node_wait_timeout: float = 120.0,
    auto: AutoSettings = NO_AUTO,
) -> QueryOutputs:
    """Run ``query`` over every silo under ``data_dir`` (one simulated node each).

    With ``auto`` (a retention curve with auto cohorts or periods), the nodes first release a
    noisy size and the server chooses the grid; ``query``'s period/periods/cohorts are then
    only placeholders for the auto ones.

    Raises :class:`AnalyticsRefused` with the reason if the query was refused or failed
    (then nothing but ``<stem>.refused.json`` is written).
    """
    from fedretain.server.settings import RunSettings
    from fedretain.server.simulation import run_in_simulation, silo_folders

    out = Path(out_dir).resolve()
    n_nodes = len(silo_folders(Path(data_dir).resolve()))
    settings = AnalyticsSettings(spec=query, out_dir=str(out), policy=policy or IntervalPolicy(), min_nodes=n_nodes,
                                 node_wait_timeout=node_wait_timeout, auto=auto)
    stem = output_stem(query)
    # the ServerApp writes into a fresh folder; moved into place only once complete
    work = Path(tempfile.mkdtemp(prefix=f".{stem}.", dir=_ensure(out)))
    try:
        extra = {**settings.to_run_config(), "out-dir": str(work)}
        run_settings = RunSettings(out_dir=str(work), min_nodes=n_nodes, node_wait_timeout=node_wait_timeout,
                                   run_id=query.query_id, extra=extra)
        run_in_simulation(run_settings, data_dir, num_cpus=num_cpus, server_app=app)
        refused = work / f"{stem}.refused.json"
        if refused.is_file():
            shutil.move(str(refused), str(out / refused.name))
            raise AnalyticsRefused(json.loads((out / refused.name).read_text())["reason"])
        record_path = work / f"{stem}.json"
        if not record_path.is_file():
            raise RuntimeError(f"analytics query {query.query_id} wrote no result (see the log above)")
        record = json.loads(record_path.read_text())
        if record["query"]["query_id"] != query.query_id:
            raise RuntimeError(f"result in {work} is for query {record['query']['query_id']}, not {query.query_id}")
        paths = {}
        for ext in ("png", "csv", "json"):
            (work / f"{stem}.{ext}").replace(out / f"{stem}.{ext}")
            paths[ext] = out / f"{stem}.{ext}"
        (out / f"{stem}.refused.json").unlink(missing_ok=True)  # a stale refusal must not sit beside the result
        return QueryOutputs(paths["png"], paths["csv"], paths["json"], record)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
