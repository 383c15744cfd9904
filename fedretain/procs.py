"""Processes and ports on this machine: what the node supervisor and the platform share.

Flower's command-line programs are started from *this* Python environment with their
own ``FLWR_HOME`` and telemetry/update checks off (:func:`flower_env`,
:func:`flower_script`); ports are picked below the kernel's ephemeral range
(:func:`free_port`); a started process is remembered with its start time so a reused
pid is never signalled (:class:`ProcRef`), and a process tree is stopped with SIGTERM,
then SIGKILL (:func:`stop_tree`). Process and socket tables come from ``psutil``.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

STOP_GRACE_S = 10.0


_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")


def strip_ansi(text: str) -> str:
    """Remove terminal colour/control sequences: Flower colours its log lines, logs are read in editors."""
    return _ANSI.sub("", text)


class MissingTool(RuntimeError):
    """A Flower console script is not installed in this environment."""


def flower_env(flwr_home: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: own FLWR_HOME, no telemetry, no update check, no uv sync."""
    env = dict(os.environ if base is None else base)
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PYTHONUNBUFFERED": "1",
    })
    bindir = str(Path(sys.executable).parent)  # flower-superexec etc. must come from this environment
    if bindir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


def flower_script(name: str) -> str:
    """Path of a Flower console script installed next to this Python (or on PATH)."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise MissingTool(f"`{name}` not found next to {sys.executable} or on PATH: is flwr installed?")
    return found


# -- ports -----------------------------------------------------------------------------------------
def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A free port *below* the kernel's ephemeral range.

    A listening port taken from the ephemeral range can be stolen while its server is
    down: a client that keeps reconnecting to it may be given that very port as its
    source port and connect to itself, and the restarted server can no longer bind it.
    """
    lo, _ = _ephemeral_range()
    candidates = list(range(20000, max(20001, min(lo, 32768))))
    random.shuffle(candidates)
    for port in candidates[:200]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Does something accept TCP connections on ``host:port``?"""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def can_bind(host: str, port: int) -> bool:
    """Could a server listen on ``host:port`` now? (Bound as uvicorn does, with SO_REUSEADDR.)"""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host or "0.0.0.0", port))
        except OSError:
            return False
    return True


def port_owner(port: int) -> str:
    """`` (by pid N: command)`` for the process listening on TCP ``port`` ('' if unknown or not visible)."""
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return ""
    for conn in conns:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            try:
                cmd = " ".join(psutil.Process(conn.pid).cmdline())
            except psutil.Error:
                cmd = "?"
            return f" (by pid {conn.pid}: {cmd[:120]})"
    return ""


# -- process trees ---------------------------------------------------------------------------------
def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except (psutil.NoSuchProcess, ValueError):
        return None


def proc_start_time(pid: int) -> float | None:
    """Start time of ``pid`` (seconds since the epoch; None if it does not exist)."""
    proc = _process(pid)
    try:
        return proc.create_time() if proc is not None else None
    except psutil.NoSuchProcess:
        return None


def running(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    proc = _process(pid)
    try:
        return proc is not None and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (children first)."""
    proc = _process(pid)
    try:
        return [p.pid for p in proc.children(recursive=True)] if proc is not None else []
    except psutil.NoSuchProcess:
        return []


@dataclass(frozen=True)
class ProcRef:
    """A process something started: pid plus start time, so a reused pid is never signalled."""

    name: str
    pid: int
    start: float | None

    @classmethod
    def of(cls, name: str, pid: int) -> ProcRef:
        return cls(name, pid, proc_start_time(pid))

    def alive(self) -> bool:
        started = proc_start_time(self.pid)
        if started is None or (self.start is not None and abs(started - float(self.start)) > 0.01):
            return False
        return running(self.pid)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "pid": self.pid, "start": self.start}


def _signal(pids: list[int], sig: int) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


def wait_port_free(host: str, port: int, wait_s: float, echo: Callable[[str], None]) -> bool:
    """Could a server bind ``host:port`` within ``wait_s`` seconds? (Says once that it waits.)"""
    if can_bind(host, port):
        return True
    echo(f"port {port} is in use; waiting up to {wait_s:.0f} s for it to be released ...")
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if can_bind(host, port):
            return True
    return False


def stop_signal_handlers(on_stop: Callable[[], None]) -> dict[int, Any]:
    """Install SIGTERM/SIGINT handlers that run ``on_stop`` (returns the old handlers)."""
    def handler(signum: int, _frame: Any) -> None:
        on_stop()
        raise SystemExit(128 + signum)

    return {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}


def stop_tree(ref: ProcRef, grace: float = STOP_GRACE_S, *, crash: bool = False) -> bool:
    """SIGTERM ``ref`` and its descendants, SIGKILL whatever is left after ``grace`` s.

    ``crash=True`` sends SIGKILL to the whole tree at once (what a power cut does: nothing
    gets to save anything), for fault-injection. Returns once nothing of the tree runs.
    """
    if not ref.alive():
        return False
    tree = [ref.pid, *descendants(ref.pid)]

    def left() -> list[int]:
        return [p for p in tree if running(p)]

    if crash:
        _signal(tree, signal.SIGKILL)
    else:
        _signal([ref.pid], signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and left():
            time.sleep(0.1)
            if not ref.alive():  # the root is gone: now its children, which it did not stop
                _signal([p for p in tree[1:] if running(p)], signal.SIGTERM)
        _signal(left(), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while left() and time.monotonic() < deadline:
        time.sleep(0.05)
    return True


def terminate(proc: subprocess.Popen[Any], grace: float = STOP_GRACE_S, group: bool = False) -> int | None:
    """SIGTERM, wait ``grace`` seconds, then SIGKILL (the process, or its process group)."""
    if proc.poll() is not None:
        return proc.returncode

    def send(sig: int) -> None:
        try:
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        except ProcessLookupError:
            pass

    send(signal.SIGTERM)
    try:
        return proc.wait(grace)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        return proc.wait(5)


__all__ = [
    "STOP_GRACE_S", "MissingTool", "ProcRef", "can_bind", "descendants", "flower_env", "flower_script", "free_port",
    "port_open", "port_owner", "proc_start_time", "running", "stop_signal_handlers", "stop_tree", "strip_ansi",
    "terminate", "wait_port_free",
]
