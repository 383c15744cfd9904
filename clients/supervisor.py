"""Supervising a merchant node: ``fedretain client start`` runs :func:`run_node`.

It runs the pre-connection checks (:mod:`fedretain.clients.preflight`), writes
``node.toml``, starts ``flower-supernode`` (through the launcher
``python -m fedretain.clients.supernode``) as a child process, serves the ClientApp in
a warm executor (:mod:`fedretain.clients.warm_executor`) and restarts the SuperNode
with a growing delay when it loses the platform. The launcher reports the node id and
Flower's exit code in ``supernode-status.json``; the SuperNode's log is kept for people
(and for a one-line reason when the platform refuses the node).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedretain.atomic import write_atomic
from fedretain.clients.node_settings import NodeSettings, NodeSetupError, write_node_config
from fedretain.clients.preflight import preflight, probe_server
from fedretain.clients.warm_executor import WarmExecutor
from fedretain.compat.flower import HEARTBEAT_DEFAULT_S, HEARTBEAT_PATIENCE, RECEIVING_MARKER, read_supernode_status
from fedretain.procs import MissingTool, flower_env, flower_script, free_port, port_open, strip_ansi, terminate

STOP_GRACE_S = 10.0
EXIT_SUPERNODE_FAILED = 3
STATUS_FILE = "supernode-status.json"


def supernode_command(settings: NodeSettings, node_toml: Path, port: int, parent_pid: int | None = None) -> list[str]:
    """The ``flower-supernode`` command line (through the fedretain launcher if any tweak is asked for)."""
    args = ["--superlink", settings.server]
    if settings.insecure:
        args.append("--insecure")
    elif settings.root_cert is not None:
        args += ["--root-certificates", str(Path(settings.root_cert).resolve())]
    if settings.auth_key is not None:
        args += ["--auth-supernode-private-key", str(Path(settings.auth_key).resolve())]
    args += ["--node-config", str(node_toml), "--host", "127.0.0.1", "--port", str(port),
             "--isolation", "process" if settings.executor == "warm" else "subprocess"]
    if settings.max_wait_time is not None:
        args += ["--max-wait-time", str(settings.max_wait_time)]
    if settings.poll_interval is None and settings.heartbeat_interval is None and parent_pid is None:
        try:
            return [flower_script("flower-supernode"), *args]
        except MissingTool as exc:
            raise NodeSetupError(str(exc)) from None
    launcher = [sys.executable, "-m", "fedretain.clients.supernode",
                "--status-file", str(settings.state / STATUS_FILE)]
    if settings.poll_interval is not None:
        launcher += ["--poll-interval", str(settings.poll_interval)]
    if settings.heartbeat_interval is not None:
        launcher += ["--heartbeat-interval", str(settings.heartbeat_interval)]
    if parent_pid is not None:
        launcher += ["--parent-pid", str(parent_pid)]
    return [*launcher, "--", *args]


_REFUSALS = (
    ("2004", "the platform refused this node: its public key is not registered there "
             "(send the .pub file to the platform operator; they add it to the server's node-keys folder)"),
    ("2001", "the platform requires node authentication: start the node with --key NODE_KEY"),
    ("Server disconnected without sending a response",
     "the platform closed the connection during the handshake: it serves TLS, so do not use --insecure; "
     "pass --root-cert CA instead"),
    ("CERTIFICATE_VERIFY_FAILED", "the platform's TLS certificate does not verify against the root "
                                  "certificate given (--root-cert) or does not name the address dialled"),
    ("WRONG_VERSION_NUMBER", "TLS handshake failed: the platform does not serve TLS at this address "
                             "(if it really runs insecure, both sides need --insecure)"),
    ("requires encrypted TLS", "node authentication needs TLS"),
)


def explain_failure(lines: list[str]) -> str:
    """A one-line reason for a SuperNode exit, from the last lines it logged."""
    text = "\n".join(lines)
    for marker, why in _REFUSALS:
        if marker in text:
            return why
    errors = [ln.strip() for ln in lines if "ERROR" in ln or "Error" in ln or "error" in ln]
    return errors[-1] if errors else (lines[-1].strip() if lines else "no output")




class _LogPump(threading.Thread):
    """Copies the SuperNode's output to its log file; keeps the tail; echoes warnings and errors."""

    def __init__(self, stream: Any, path: Path, echo: Callable[[str], None],
                 wake: threading.Event | None = None) -> None:
        super().__init__(daemon=True, name="supernode-log")
        self.stream, self.path, self.echo, self.wake = stream, path, echo, wake
        self.tail: deque[str] = deque(maxlen=60)

    def run(self) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(f"===== fedretain node supervisor pid {os.getpid()}: SuperNode started "
                     f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} =====\n")
            for raw in iter(self.stream.readline, b""):
                line = strip_ansi(raw.decode("utf-8", "replace").rstrip("\n"))
                fh.write(line + "\n")
                fh.flush()
                self.tail.append(line)
                if self.wake is not None and RECEIVING_MARKER in line:
                    self.wake.set()  # a latency hint for the executor; it polls anyway
                if "ERROR" in line or "WARNING" in line:
                    self.echo(f"[supernode] {line.strip()}")


class _Status:
    """The launcher's ``supernode-status.json``: node id once connected, Flower's exit code at exit."""

    def __init__(self, path: Path, echo: Callable[[str], None]) -> None:
        self.path, self.echo = path, echo
        self.path.unlink(missing_ok=True)
        self.node_id: str | None = None

    def poll(self) -> str | None:
        if self.node_id is None:
            node_id = read_supernode_status(self.path).get("node_id")
            if node_id is not None:
                self.node_id = str(node_id)
                self.echo(f"connected to the platform as SuperNode {self.node_id}")
        return self.node_id

    def exit_code(self, returncode: int | None) -> Any:
        code = read_supernode_status(self.path).get("exit_code")
        return returncode if code is None else code


class _Session:
    """When this node was last connected, so a quick restart after a crash is recognised.

    The SuperLink keeps a node that vanished without deactivating "online" until it
    misses heartbeats (2 x the node's heartbeat interval, 30 s by default in flwr 1.42)
    and refuses to activate it again meanwhile, with the same error as for an
    unregistered key. A node that was connected to the same platform with the same key
    less than that long ago retries instead of giving up.
    """

    WRITE_EVERY_S = 5.0

    def __init__(self, path: Path, server: str, key: str | None,
                 heartbeat_interval: float = HEARTBEAT_DEFAULT_S) -> None:
        self.path, self.server, self.key = path, server, key
        self.linger_s = HEARTBEAT_PATIENCE * heartbeat_interval + 15.0  # plus a margin
        self._written = 0.0
        try:
            self.previous = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.previous = {}

    def alive(self, node_id: str) -> None:
        now = time.time()
        if now - self._written < self.WRITE_EVERY_S:
            return
        status = {"server": self.server, "key": self.key, "node_id": node_id, "alive_at": now}
        write_atomic(self.path, json.dumps(status).encode("utf-8"))
        self._written = now

    def still_listed(self) -> float:
        """Seconds until the platform should have released this node (<= 0: not applicable)."""
        prev = self.previous
        if prev.get("server") != self.server or prev.get("key") != self.key or self.key is None:
            return 0.0
        return float(prev.get("alive_at", 0)) + self.linger_s - time.time()


def is_refusal(lines: list[str]) -> bool:
    """Did the platform refuse this node (as opposed to a lost connection)?"""
    text = "\n".join(lines)
    return any(marker in text for marker, _ in _REFUSALS)



def run_node(settings: NodeSettings, echo: Callable[[str], None] = print) -> int:
    """Run one merchant node in the foreground until SIGTERM/SIGINT or a refusal.

    Supervises the SuperNode: if it exits after having been connected (the platform was
    restarted and no longer knows this node id, the network went away, ...) it is started
    again with a growing delay; the warm executor stays up meanwhile, so torch & co. are
    not imported again. A refusal before the node was ever admitted (unregistered key,
    TLS mismatch) ends the node with a one-line reason.

    Returns 0 after a requested stop, ``EXIT_SUPERNODE_FAILED`` (3) after a refusal.
    Checks that fail before connecting raise :class:`NodeSetupError`.
    """
    info = preflight(settings)
    echo(f"merchant {info.merchant_id}: {info.n_events} events of {info.n_users} users; consent ledger verified "
         f"({info.ledger_size} records, head {info.ledger_head[:16]})")
    if settings.insecure:
        echo("WARNING: --insecure: traffic to the platform is NOT encrypted and the node is not authenticated; "
             "use only for local experiments")
    if info.key_fingerprint:
        echo(f"node key {settings.auth_key} (public key {info.key_fingerprint})")
    echo(probe_server(settings))
    node_toml = write_node_config(settings)
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    settings.flwr_home.mkdir(parents=True, exist_ok=True)
    _setup_file_logging(settings.log_dir / "node.log")

    stop = threading.Event()
    old = {s: signal.signal(s, lambda *_a: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    executor, worker = None, None
    if settings.executor == "warm":
        from importlib.metadata import version

        executor = WarmExecutor("", app_ref=settings.app, fab_version=version("fedretain"), wake=threading.Event(),
                                progress=echo)
        executor.load()  # before connecting: the node is ready the moment it is listed
    port = settings.runtime_port or free_port()
    env = flower_env(settings.flwr_home)
    if settings.poll_interval is not None:
        env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(settings.poll_interval)
    session = _Session(settings.state / "session.json", settings.server, info.key_fingerprint,
                       settings.heartbeat_interval or HEARTBEAT_DEFAULT_S)
    ever_connected, restarts = False, 0
    try:
        while not stop.is_set():
            status = _Status(settings.state / STATUS_FILE, echo)
            proc = subprocess.Popen(supernode_command(settings, node_toml, port, parent_pid=os.getpid()),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=settings.state,
                                    stdin=subprocess.DEVNULL)
            pump = _LogPump(proc.stdout, settings.log_dir / "supernode.log", echo,
                            executor.wake if executor else None)
            pump.start()
            echo(f"SuperNode started (pid {proc.pid}, runtime API 127.0.0.1:{port}, "
                 f"{'warm executor' if executor else 'one process per message'}); logs in {settings.log_dir}")
            while proc.poll() is None and not stop.is_set():
                if executor is not None and worker is None and port_open("127.0.0.1", port, 0.2):
                    executor.runtime_address = f"127.0.0.1:{port}"
                    worker = threading.Thread(target=executor.serve, args=(lambda: not stop.is_set(),),
                                              name="warm-executor", daemon=True)
                    worker.start()
                if status.poll() is not None:
                    session.alive(str(status.node_id))
                stop.wait(0.2)
            if stop.is_set():
                terminate(proc)
                pump.join(2)
                break
            pump.join(2)
            connected = status.poll() is not None
            ever_connected = ever_connected or connected
            if connected:
                restarts = 0  # it had been admitted: a fresh problem, start the backoff over
            tail = list(pump.tail)
            flwr_code = status.exit_code(proc.returncode)
            why = explain_failure(tail)
            if is_refusal(tail) and not ever_connected:
                lingering = session.still_listed()
                if lingering <= 0:
                    echo(f"SuperNode exited (Flower exit code {flwr_code}): {why}")
                    return EXIT_SUPERNODE_FAILED
                echo(f"the platform still lists this node as online from before it stopped uncleanly; "
                     f"it releases it within {lingering:.0f} s (missed heartbeats); retrying")
                stop.wait(min(2.0, lingering))
                continue
            delay = min(30.0, 2.0 ** restarts)
            restarts += 1
            echo(f"SuperNode exited (Flower exit code {flwr_code}: {why}); restarting in {delay:.0f} s")
            stop.wait(delay)
    finally:
        stop.set()
        for s, h in old.items():
            signal.signal(s, h)
        if worker is not None:
            worker.join(STOP_GRACE_S)
    echo("node stopped")
    return 0


def _setup_file_logging(path: Path) -> None:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("fedretain", "flwr"):
        lg = logging.getLogger(name)
        lg.addHandler(handler)
        if lg.level == logging.NOTSET or lg.level > logging.INFO:
            lg.setLevel(logging.INFO)



__all__ = ["EXIT_SUPERNODE_FAILED", "explain_failure", "is_refusal", "run_node", "supernode_command"]
