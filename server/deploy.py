"""The platform side of a deployment: SuperLink, node registration and run submission.

``fedretain server start`` reads a server config (TOML), checks it (run settings, TLS
files, node keys) before anything starts, then

1. starts ``flower-superlink`` in its own session with TLS, ``--enable-supernode-auth``
   and ``--disable-runtime-dependency-installation``; its FLWR_HOME, database and logs
   live in the server's state folder, telemetry and the update check are off;
2. registers every merchant public key (``*.pub``) of the node-keys folder with
   ``flwr supernode register``;
3. submits the fedretain app with ``flwr run <source root> fedretain --run-config FILE``
   (the connection ``fedretain`` lives in ``FLWR_HOME/config.toml``; nothing ever uses
   the CLI's default ``local`` connection, which would start a stray SuperLink);
4. writes ``platform.json`` (pids with their start times, address, run ids) so that
   ``server status`` and ``server stop`` find what was started; the ServerApp's log is
   saved to ``logs/run-<id>.log`` by ``status`` and ``stop`` (``flwr log --show``).

``stop`` sends SIGTERM to everything it started and its descendants (the SuperLink's
``flower-superexec`` runs in a session of its own), then SIGKILL after a grace period.
Private keys are passed to Flower as paths and never read into logs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedretain.atomic import write_atomic
from fedretain.procs import (
    MissingTool,
    ProcRef,
    flower_env,
    flower_script,
    port_open,
    port_owner,
    stop_tree,
    strip_ansi,
    wait_port_free,
)
from fedretain.server.platform_config import (
    DEFAULT_PORT,
    PlatformConfig,
    PlatformError,
    build_run_config,
    project_dir,
)
from fedretain.server.platform_keys import CONNECTION, key_name, node_merchant, register_args
from fedretain.server.run_progress import format_round, record_run_id, run_progress

STATE_FILE = "platform.json"
STOP_GRACE_S = 10.0
CLI_TIMEOUT_S = 120.0
PORT_RELEASE_WAIT_S = 20.0  # a crashed SuperLink's port can stay bound for a moment


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_run_log(path: Path, text: str) -> Path:
    """Write a run log atomically, without ANSI colour codes (logs are read in editors and greps)."""
    return write_atomic(path, strip_ansi(text).encode("utf-8"))


def _script(name: str) -> str:
    try:
        return flower_script(name)
    except MissingTool as exc:
        raise PlatformError(str(exc)) from None


class Platform:
    """Start, inspect and stop one platform (SuperLink + the fedretain run) from its state folder."""

    def __init__(self, config: PlatformConfig, *, insecure: bool = False) -> None:
        self.config = config
        self.insecure = insecure
        self.state = Path(config.state_dir)
        self.flwr_home = self.state / "flwr-home"
        self.log_dir = self.state / "logs"
        self.state_file = self.state / STATE_FILE
        self.cli_in_process = False  # run `flwr` commands in this process (see fedretain.compat.flower_cli)

    # -- helpers ---------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        return flower_env(self.flwr_home)

    def write_connection(self) -> Path:
        """``FLWR_HOME/config.toml`` with the one connection the CLI may use."""
        import tomli_w

        conn: dict[str, Any] = {"address": self.config.cli_address}
        if self.insecure:
            conn["insecure"] = True
        else:
            conn["root-certificates"] = str(self.config.ca_cert)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        path = self.flwr_home / "config.toml"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}}), encoding="utf-8")
        os.replace(tmp, path)
        return path

    def flwr(self, *args: str, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI against this platform's connection."""
        if not (self.flwr_home / "config.toml").is_file():
            self.write_connection()
        if self.cli_in_process:  # `server status`: import Flower once, not once per question
            from fedretain.compat.flower_cli import run_flwr

            res = run_flwr(args, self.env())
            return subprocess.CompletedProcess(["flwr", *args], res.returncode, res.stdout, res.stderr)
        return subprocess.run([_script("flwr"), *args], env=self.env(), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL, cwd=self.state)

    def flwr_json(self, *args: str, timeout: float = CLI_TIMEOUT_S) -> dict[str, Any]:
        res = self.flwr(*args, "--format", "json", timeout=timeout)
        try:
            out = json.loads(res.stdout)
        except json.JSONDecodeError:
            raise PlatformError(f"`flwr {' '.join(args)}` failed (exit {res.returncode}): "
                                f"{(res.stderr or res.stdout).strip()[-500:]}") from None
        if not out.get("success", False):
            raise PlatformError(f"`flwr {' '.join(args)}`: {out.get('error-message') or out}")
        return out

    def read_state(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.state_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as exc:
            raise PlatformError(f"{self.state_file}: unreadable platform state ({exc})") from None

    def write_state(self, data: dict[str, Any]) -> None:
        from fedretain.server.run_record import write_json_atomic

        write_json_atomic(self.state_file, data)

    def processes(self, state: dict[str, Any] | None = None) -> list[ProcRef]:
        state = state if state is not None else (self.read_state() or {})
        return [ProcRef(p["name"], int(p["pid"]), p.get("start")) for p in state.get("processes", [])]

    def running(self) -> ProcRef | None:
        """The live SuperLink this state folder started, if any."""
        for ref in self.processes():
            if ref.name == "superlink" and ref.alive():
                return ref
        return None

    # -- checks ----------------------------------------------------------------------------
    def check(self) -> list[str]:
        """Everything that can be checked before starting; returns notes to show (no secrets)."""
        from fedretain import tls

        cfg, notes = self.config, []
        if self.insecure:
            if cfg.auth:
                notes.append("node authentication is off: it needs TLS")
            return notes
        missing = [k for k, v in (("ca-cert", cfg.ca_cert), ("server-cert", cfg.server_cert),
                                  ("server-key", cfg.server_key)) if v is None]
        if missing:
            raise PlatformError(f"[tls] {', '.join(missing)} not set in {cfg.source or 'the server config'} "
                                f"(create development certificates with `fedretain certs init --out DIR`, "
                                f"or pass --insecure for a local experiment)")
        try:
            names = tls.check_server_tls(cfg.ca_cert, cfg.server_cert, cfg.server_key, cfg.host)
        except tls.TLSError as exc:
            raise PlatformError(f"TLS: {exc}") from None
        notes.append(f"TLS certificate for {', '.join(names)}")
        if cfg.auth:
            keys = self.node_key_files()
            notes.append(f"node authentication on; {len(keys)} registered merchant key(s) in {cfg.node_keys}")
        return notes

    def node_key_files(self) -> list[Path]:
        from fedretain import tls

        folder = self.config.node_keys
        if folder is None:
            raise PlatformError("[auth] node-keys (a folder of merchants' *.pub files) is not set; "
                                "set it, or [auth] enabled = false")
        if not folder.is_dir():
            raise PlatformError(f"[auth] node-keys folder {folder} does not exist")
        files = sorted(folder.glob("*.pub"))
        for f in files:
            try:
                tls.load_node_public_key(f)
            except tls.TLSError as exc:
                raise PlatformError(f"node key: {exc}") from None
        return files

    def superlink_command(self) -> list[str]:
        cfg = self.config
        # Flower's `flower-superlink`, started through fedretain.compat.superlink for log lines without colours
        cmd = [sys.executable, "-m", "fedretain.compat.superlink", "--host", cfg.host, "--port", str(cfg.port),
               "--disable-runtime-dependency-installation"]
        if cfg.database != "memory":
            cmd += ["--database", cfg.database]
        if self.insecure:
            return [*cmd, "--insecure"]
        cmd += ["--ssl-ca-certfile", str(cfg.ca_cert), "--ssl-certfile", str(cfg.server_cert),
                "--ssl-keyfile", str(cfg.server_key)]
        if cfg.auth:
            cmd.append("--enable-supernode-auth")
        return cmd

    # -- start -----------------------------------------------------------------------------
    def start(self, *, resume: bool = False, run_id: str | None = None,
              echo: Callable[[str], None] = print, submit: bool = True) -> dict[str, Any]:
        """Start the SuperLink, register node keys, submit the run (unless ``submit`` is False)."""
        if self.running():
            raise PlatformError(f"a platform from {self.state} is already running (see `fedretain server status`; "
                                f"stop it with `fedretain server stop`)")
        project = project_dir(self.config.project_dir)
        previous = self.read_state() or {}
        run_id = self._run_id(previous, resume, run_id)
        notes = self.check()
        run_config = build_run_config(self.config, project, resume=resume, run_id=run_id)
        if self.insecure:
            echo("WARNING: --insecure: the SuperLink serves plain HTTP and does not authenticate nodes; "
                 "use only for local experiments")
        for note in notes:
            echo(note)
        # a platform that just crashed may hold its port a few seconds more
        if not wait_port_free(self.config.host, self.config.port, PORT_RELEASE_WAIT_S, echo):
            raise PlatformError(f"port {self.config.port} on {self.config.host} is already in use"
                                f"{port_owner(self.config.port)}")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.write_connection()
        state: dict[str, Any] = {
            "format": "fedretain-platform/1", "started": _now(),
            "config": str(Path(self.config.source).resolve()) if self.config.source else "",
            "address": f"{self.config.host}:{self.config.port}", "cli_address": self.config.cli_address,
            "insecure": self.insecure, "auth": self.config.auth and not self.insecure,
            "project_dir": str(project), "processes": [], "runs": previous.get("runs", []),
        }
        link_log = self.log_dir / "superlink.log"
        with open(link_log, "ab") as log:
            proc = subprocess.Popen(self.superlink_command(), stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                    cwd=self.state, stdin=subprocess.DEVNULL, start_new_session=True)
        ref = ProcRef.of("superlink", proc.pid)
        state["processes"].append(ref.as_dict())
        self.write_state(state)
        try:
            self._wait_ready(proc, link_log)
            echo(f"SuperLink listening on {state['address']} (pid {proc.pid}); logs in {self.log_dir}")
            if state["auth"]:
                for key in self.node_key_files():
                    echo(self.register_key(key))
            if not submit:
                echo("no run submitted (--no-run); submit one with `fedretain server run --config ...`")
                return self.read_state() or state
            submitted = self.submit(project, run_config)
            state = self.read_state() or state
            state["runs"].append(submitted)
            self.write_state(state)
            echo(f"submitted run {submitted['run_id']} (Flower run {submitted['flower_run_id']}); "
                 f"record and checkpoints in {submitted['out_dir']}")
        except BaseException:
            self.stop(echo=lambda _m: None)
            raise
        return state

    def _wait_ready(self, proc: subprocess.Popen, log_path: Path) -> None:
        deadline = time.monotonic() + self.config.ready_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-8:]
                raise PlatformError(f"flower-superlink exited with status {proc.returncode}:\n  " + "\n  ".join(tail))
            if port_open(self.config.cli_address.rsplit(":", 1)[0].strip("[]"), self.config.port, 0.3):
                res = self.flwr("ls", CONNECTION, "--format", "json", timeout=60)
                if res.returncode == 0:
                    return
            time.sleep(0.3)
        raise PlatformError(f"the SuperLink did not answer within {self.config.ready_timeout:.0f} s "
                            f"(see {log_path})")

    def register_key(self, key: Path) -> str:
        """Register one merchant public key; an already registered key is fine.

        ``key`` is resolved against the caller's working directory: ``flwr`` runs in the
        state folder, where a relative path would name another (usually missing) file.
        The node id is remembered with the key's name in ``platform.json`` so that
        ``server status`` can say which merchant each node is.
        """
        from fedretain import tls

        key = Path(key).expanduser().resolve()
        try:
            fp = tls.fingerprint_file(key)
        except tls.TLSError as exc:
            raise PlatformError(f"node key: {exc}") from None
        res = self.flwr(*register_args(key))
        try:
            out = json.loads(res.stdout)
        except json.JSONDecodeError:
            out = {"success": False, "error-message": (res.stderr or res.stdout).strip()[-300:]}
        if out.get("success"):
            self._remember_node(str(out.get("node-id")), key, fp)
            return f"registered node key {key.name} ({fp}) as SuperNode {out.get('node-id')}"
        message = str(out.get("error-message", out))
        if "already" in message.lower():
            return f"node key {key.name} ({fp}) was already registered"
        raise PlatformError(f"registering node key {key}: {message}")

    def _remember_node(self, node_id: str, key: Path, fingerprint: str) -> None:
        state = self.read_state()
        if state is None:
            return
        state.setdefault("node_keys", {})[node_id] = {"name": key_name(key), "file": str(key),
                                                      "fingerprint": fingerprint}
        self.write_state(state)

    def _run_id(self, state: dict[str, Any], resume: bool, run_id: str | None) -> str:
        """The given id; else, to resume, the last submitted run's; else the config's; else a fresh one."""
        if resume and not run_id:
            run_id = (state.get("runs") or [{}])[-1].get("run_id")
        return run_id or self.config.run.get("run-id") or uuid.uuid4().hex[:12]

    def submit_run(self, *, resume: bool = False, run_id: str | None = None,
                   echo: Callable[[str], None] = print) -> dict[str, Any]:
        """Submit a training run to this already running platform (``fedretain server run``)."""
        if self.running() is None:
            raise PlatformError(f"no platform is running from {self.state}; start it with "
                                f"`fedretain server start --config ... --no-run` first")
        project = project_dir(self.config.project_dir)
        state = self.read_state() or {}
        run_id = self._run_id(state, resume, run_id)
        run_config = build_run_config(self.config, project, resume=resume, run_id=run_id)
        submitted = self.submit(project, run_config)
        state = self.read_state() or state
        state.setdefault("runs", []).append(submitted)
        self.write_state(state)
        echo(f"submitted run {submitted['run_id']} (Flower run {submitted['flower_run_id']}); "
             f"record and checkpoints in {submitted['out_dir']}")
        return submitted

    def submit(self, project: Path, run_config: dict[str, Any]) -> dict[str, Any]:
        """``flwr run`` the fedretain app with ``run_config`` (written to a TOML file first)."""
        import tomli_w

        cfg_path = self.state / "run-config.toml"
        cfg_path.write_text(tomli_w.dumps(run_config), encoding="utf-8")
        out = self.flwr_json("run", str(project), CONNECTION, "--run-config", str(cfg_path), timeout=300)
        run_id = run_config.get("run-id") or record_run_id(Path(str(run_config.get("out-dir", ""))))
        return {
            "run_id": str(run_id or "(chosen by the ServerApp: see run.json)"), "flower_run_id": str(out["run-id"]),
            "out_dir": str(run_config.get("out-dir", "")), "resume": bool(run_config.get("resume", False)),
            "submitted": _now(), "fab": f"{out.get('fab-id')}=={out.get('fab-version')} ({out.get('fab-hash')})",
        }

    def fetch_run_log(self, flower_run_id: str) -> Path | None:
        """Save the ServerApp's log (``flwr log --show``) to ``logs/run-<id>.log``.

        Fetched on demand (status, stop, end of a run) rather than streamed: the SuperLink
        serves a log stream by polling its database twice a second, which on a small
        machine costs as much CPU as two more merchant nodes.
        """
        path = self.log_dir / f"run-{flower_run_id}.log"
        try:
            res = self.flwr("log", flower_run_id, CONNECTION, "--show", timeout=60)
        except subprocess.TimeoutExpired:
            return None
        if res.returncode != 0 or not res.stdout.strip():
            return None
        return write_run_log(path, res.stdout)

    # -- status / wait / stop --------------------------------------------------------------
    def status(self, progress: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
        """Processes, connected nodes (with the merchant each is), the current run and its progress."""
        from fedretain.server.platform_status import platform_status

        return platform_status(self, progress)

    def wait(self, *, timeout: float | None = None, echo: Callable[[str], None] = print,
             poll: float = 1.0) -> str:
        """Follow the current run until its record says completed/failed (or the SuperLink dies)."""
        state = self.read_state() or {}
        runs = state.get("runs") or []
        if not runs:
            raise PlatformError("no run was submitted")
        out_dir = Path(runs[-1]["out_dir"])
        deadline = None if timeout is None else time.monotonic() + timeout
        shown = 0
        started = _now()
        while True:
            prog = run_progress(out_dir)
            rounds = prog.get("rounds_done", [])
            for r in rounds[shown:]:
                echo(format_round(r, prog.get("rounds_total")))
            shown = len(rounds)
            status = prog.get("status")
            if status in ("completed", "failed") and prog.get("updated", "") >= runs[-1].get("submitted", started):
                if status == "failed":
                    echo(f"run failed: {prog.get('error')}")
                return status
            if self.running() is None:
                return "platform-stopped"
            if deadline is not None and time.monotonic() > deadline:
                return "timeout"
            time.sleep(poll)

    def stop(self, *, grace: float = STOP_GRACE_S, echo: Callable[[str], None] = print) -> bool:
        """Stop every process this state folder started (and their descendants)."""
        state = self.read_state()
        if state is None:
            echo(f"nothing to stop: no platform state in {self.state}")
            return False
        stopped = False
        runs = state.get("runs") or []
        if runs and self.running() is not None:
            self.fetch_run_log(runs[-1]["flower_run_id"])  # keep the ServerApp's log before it goes
        for ref in reversed(self.processes(state)):
            if stop_tree(ref, grace):
                echo(f"stopped {ref.name} (pid {ref.pid})")
                stopped = True
        state["processes"] = []
        state["stopped"] = _now()
        self.write_state(state)
        if not stopped:
            echo("nothing was running")
        return stopped


__all__ = [
    "node_merchant", "register_args", "write_run_log", "key_name",
    "CONNECTION", "DEFAULT_PORT", "Platform", "PlatformConfig", "PlatformError", "format_round", "run_progress",
]
