"""The ``flwr`` CLI run inside this process (flwr 1.42), for commands that ask it several things.

Each ``flwr`` process spends about 2 s of CPU importing Flower before it sends one small
request (6 s wall on a loaded 2-core machine), so ``fedretain server status``, which asks
the SuperLink for its nodes, the run and the run log, took 10-16 s. Run in-process, Flower
is imported once and each command costs one request. The CLI is reached through its
published console-script entry point (``flwr = flwr.cli.app:app``, a Typer app) and run
with Typer's test runner, which captures its output and exit code exactly as a process
would see them.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_LOCK = threading.Lock()  # the runner swaps sys.stdout(s) and os.environ: one command at a time
_APP: Any = None


@dataclass(frozen=True)
class CliResult:
    """What a ``flwr`` process would have returned."""

    returncode: int
    stdout: str
    stderr: str


def _app() -> Any:
    global _APP
    if _APP is None:
        from importlib.metadata import entry_points

        found = [e for e in entry_points(group="console_scripts") if e.name == "flwr"]
        if not found:
            raise RuntimeError("the `flwr` console script is not installed")
        _APP = found[0].load()
    return _APP


def run_flwr(args: Sequence[str], env: Mapping[str, str]) -> CliResult:
    """Run ``flwr ARGS`` in this process with the Flower variables of ``env`` (FLWR_HOME, ...)."""
    from typer.testing import CliRunner

    flwr_env = {k: v for k, v in env.items() if k.startswith("FLWR_")}
    with _LOCK:
        for k in ("FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK"):  # read by Flower at import
            if k in flwr_env:
                os.environ[k] = flwr_env[k]
        app = _app()
        direct = io.StringIO()  # `--format json` output goes to sys.__stdout__ ("bypassing any redirection")
        saved_out, flwr_log = sys.__stdout__, logging.getLogger("flwr")
        saved_level = flwr_log.level
        sys.__stdout__ = direct  # type: ignore[misc,assignment]  # typeshed: a read-only TextIOWrapper
        flwr_log.setLevel(logging.WARNING)  # its INFO lines would reach the operator's terminal
        try:
            res = CliRunner().invoke(app, list(args), env=flwr_env, catch_exceptions=True)
        finally:
            sys.__stdout__ = saved_out  # type: ignore[misc]
            flwr_log.setLevel(saved_level)
    stderr = ""
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        stderr = f"{type(res.exception).__name__}: {res.exception}"
    return CliResult(res.exit_code, direct.getvalue() + res.stdout, stderr)


__all__ = ["CliResult", "run_flwr"]
