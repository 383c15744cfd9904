"""``fedretain server status``: what the platform runs, who is online (by merchant), the run's progress."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedretain.server.platform_config import PlatformError
from fedretain.server.platform_keys import CONNECTION, node_merchant
from fedretain.server.run_progress import run_progress

# ``platform`` is a fedretain.server.deploy.Platform (not imported: deploy imports this module)

def platform_status(platform: Any, progress: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Processes, connected nodes (with the merchant each is), the current run and its progress."""
    state = platform.read_state()
    if state is None:
        return {"running": False, "state_dir": str(platform.state), "message": "no platform was started here"}
    link = platform.running()
    out: dict[str, Any] = {
        "running": link is not None, "state_dir": str(platform.state), "address": state.get("address"),
        "insecure": state.get("insecure"), "auth": state.get("auth"),
        "processes": [{**p.as_dict(), "alive": p.alive()} for p in platform.processes(state)],
        "nodes": None, "flower_run": None, "run": None,
    }
    runs = state.get("runs") or []
    if link is not None:
        _query_superlink(platform, out, runs, progress)
    if runs:
        out["run"] = {**runs[-1], **run_progress(Path(runs[-1]["out_dir"]))}
    merchants = (out.get("run") or {}).get("merchant_nodes") or {}
    for node in out.get("nodes") or []:
        node["merchant"] = node_merchant(node, state.get("node_keys") or {}, merchants)
    return out


def _query_superlink(platform: Any, out: dict[str, Any], runs: list[dict[str, Any]],
                     progress: Callable[[str], None]) -> None:
    """Ask the SuperLink for nodes, the run and its log.

    A ``flwr`` process spends seconds importing Flower for one small request, so the
    questions are asked in this process (Flower imported once); if that is not possible the
    three processes run side by side.
    """
    from concurrent.futures import ThreadPoolExecutor

    progress("asking the SuperLink for nodes" + (", the run and its log" if runs else "") + " ...")
    in_process = platform.cli_in_process
    try:
        from fedretain.compat.flower_cli import run_flwr  # noqa: F401  (the in-process CLI is installed)

        platform.cli_in_process = True
    except ImportError:
        pass
    try:
        with ThreadPoolExecutor(max_workers=1 if platform.cli_in_process else 3) as pool:
            nodes = pool.submit(platform.flwr_json, "supernode", "ls", CONNECTION, timeout=60)
            run = log = None
            if runs:
                run = pool.submit(platform.flwr_json, "ls", CONNECTION, "--run-id", runs[-1]["flower_run_id"],
                                  timeout=60)
                log = pool.submit(platform.fetch_run_log, runs[-1]["flower_run_id"])
            try:
                out["nodes"] = nodes.result().get("nodes", [])
            except PlatformError as exc:
                out["nodes_error"] = str(exc)
            if run is not None and log is not None:
                try:
                    out["flower_run"] = (run.result().get("runs") or [None])[0]
                except PlatformError as exc:
                    out["flower_run_error"] = str(exc)
                saved = log.result()
                out["server_log"] = str(saved) if saved else None
    finally:
        platform.cli_in_process = in_process


__all__ = ["platform_status"]
