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
import signal
import subprocess
import time
import tomllib
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from fedretain.clients.supernode import flower_env, flower_script, port_open

CONNECTION = "fedretain"
STATE_FILE = "platform.json"
DEFAULT_PORT = 9443
STOP_GRACE_S = 10.0
CLI_TIMEOUT_S = 120.0

_SERVER_KEYS = {"host", "port", "state-dir", "project-dir", "ready-timeout", "database"}
_TLS_KEYS = {"ca-cert", "server-cert", "server-key"}
_AUTH_KEYS = {"enabled", "node-keys"}
_RUN_PATH_KEYS = {"out-dir", "data-dir"}


class PlatformError(Exception):
    """The platform cannot start, or an operation on it failed; the message says why."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- config ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlatformConfig:
    """A server config file, with every path resolved against the file's folder."""

    source: Path | None
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    state_dir: Path = Path("platform-state")
    project_dir: Path | None = None
    ready_timeout: float = 60.0
    database: str = "memory"
    ca_cert: Path | None = None
    server_cert: Path | None = None
    server_key: Path | None = None
    auth: bool = True
    node_keys: Path | None = None
    run: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "PlatformConfig":
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PlatformError(f"server config {path} does not exist") from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise PlatformError(f"server config {path}: {exc}") from None
        return cls.from_dict(data, path.resolve().parent, path)

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: Path, source: Path | None = None) -> "PlatformConfig":
        where = str(source or "server config")
        unknown = set(data) - {"server", "tls", "auth", "run"}
        if unknown:
            raise PlatformError(f"{where}: unknown section(s) {', '.join(sorted(unknown))} "
                                f"(expected [server], [tls], [auth], [run])")
        server, tls_, auth, run = (dict(data.get(k, {})) for k in ("server", "tls", "auth", "run"))
        if "insecure" in server:
            raise PlatformError(f"{where}: insecure mode is not a config setting; pass --insecure explicitly")
        for name, sec, allowed in (("server", server, _SERVER_KEYS), ("tls", tls_, _TLS_KEYS),
                                   ("auth", auth, _AUTH_KEYS)):
            bad = set(sec) - allowed
            if bad:
                raise PlatformError(f"{where}: unknown key(s) in [{name}]: {', '.join(sorted(bad))} "
                                    f"(allowed: {', '.join(sorted(allowed))})")

        def path(sec: dict[str, Any], key: str, section: str) -> Path | None:
            value = sec.get(key)
            if value in (None, ""):
                return None
            if not isinstance(value, str):
                raise PlatformError(f"{where}: [{section}] {key} must be a path string, got {value!r}")
            p = Path(value).expanduser()
            return p if p.is_absolute() else (base / p).resolve()

        port = server.get("port", DEFAULT_PORT)
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise PlatformError(f"{where}: [server] port must be an integer in 1..65535, got {port!r}")
        enabled = auth.get("enabled", True)
        if not isinstance(enabled, bool):
            raise PlatformError(f"{where}: [auth] enabled must be true or false, got {enabled!r}")
        for key in _RUN_PATH_KEYS:
            if isinstance(run.get(key), str) and run[key]:
                p = Path(run[key]).expanduser()
                run[key] = str(p if p.is_absolute() else (base / p).resolve())
        return cls(
            source=source, host=str(server.get("host", "127.0.0.1")), port=port,
            state_dir=path(server, "state-dir", "server") or (base / "platform-state").resolve(),
            project_dir=path(server, "project-dir", "server"),
            ready_timeout=float(server.get("ready-timeout", 60.0)),
            database=_database(server.get("database", "memory"), base, where),
            ca_cert=path(tls_, "ca-cert", "tls"), server_cert=path(tls_, "server-cert", "tls"),
            server_key=path(tls_, "server-key", "tls"), auth=enabled,
            node_keys=path(auth, "node-keys", "auth"), run=run,
        )

    @property
    def cli_address(self) -> str:
        """Where the local ``flwr`` CLI dials the SuperLink (a wildcard bind → loopback)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


def _database(value: Any, base: Path, where: str) -> str:
    """``memory`` (Flower's in-memory state) or the path of a SQLite file for the SuperLink."""
    if not isinstance(value, str) or not value:
        raise PlatformError(f"{where}: [server] database must be \"memory\" or a file path, got {value!r}")
    if value == "memory":
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def project_dir(configured: Path | None = None) -> Path:
    """The fedretain source root that ``flwr run`` packages (pyproject.toml with [tool.flwr.app])."""
    import fedretain

    candidates = [configured] if configured else [Path(fedretain.__file__).resolve().parent.parent]
    for cand in candidates:
        pyproject = Path(cand) / "pyproject.toml"
        if pyproject.is_file():
            try:
                data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
            except tomllib.TOMLDecodeError as exc:
                raise PlatformError(f"{pyproject}: {exc}") from None
            if "app" in data.get("tool", {}).get("flwr", {}):
                return Path(cand)
            raise PlatformError(f"{pyproject} has no [tool.flwr.app] section: not the fedretain source root")
    raise PlatformError(
        f"cannot find the fedretain source root (pyproject.toml with [tool.flwr.app]) at {candidates[0]}; "
        f"install fedretain from source (pip install -e) or set [server] project-dir"
    )


def app_config_defaults(project: Path) -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of the project: the run-config keys ``flwr run`` accepts."""
    data = tomllib.loads((project / "pyproject.toml").read_text(encoding="utf-8"))
    return dict(data["tool"]["flwr"]["app"].get("config", {}))


def build_run_config(config: PlatformConfig, project: Path, *, resume: bool | None = None,
                     run_id: str | None = None) -> dict[str, Any]:
    """The run config to submit: ``[run]`` checked against the app's keys and RunSettings."""
    from fedretain.server.settings import RunSettings

    run = dict(config.run)
    allowed = app_config_defaults(project)
    if resume:
        if "resume" not in allowed:
            raise PlatformError(f"the fedretain app at {project} cannot resume runs: its [tool.flwr.app.config] "
                                f"has no `resume` key")
        run["resume"] = True
    elif "resume" in allowed:
        run["resume"] = False
    if run_id and "run-id" in allowed:
        run["run-id"] = run_id
    unknown = sorted(set(run) - set(allowed))
    if unknown:
        raise PlatformError(
            f"{config.source or 'server config'}: [run] key(s) {', '.join(unknown)} are not run-config keys of the "
            f"fedretain app ([tool.flwr.app.config] in {project / 'pyproject.toml'} has: {', '.join(sorted(allowed))})"
        )
    for key, value in run.items():
        default = allowed[key]
        if isinstance(default, bool) != isinstance(value, bool) or (
                isinstance(default, str) and not isinstance(value, str)):
            raise PlatformError(f"[run] {key} = {value!r} has the wrong type (expected {type(default).__name__} "
                                f"like the default {default!r})")
    try:
        RunSettings.from_run_config({**allowed, **run})
    except (ValueError, TypeError) as exc:
        raise PlatformError(f"[run]: {exc}") from None
    return run


# -- processes ---------------------------------------------------------------------------------
def proc_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (None if it does not exist)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (children first), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo.extend(children.get(p, []))
    return out


@dataclass(frozen=True)
class ProcRef:
    """A process this platform started: pid plus start time, so a reused pid is never signalled."""

    name: str
    pid: int
    start: int | None

    @classmethod
    def of(cls, name: str, pid: int) -> "ProcRef":
        return cls(name, pid, proc_start_ticks(pid))

    def alive(self) -> bool:
        ticks = proc_start_ticks(self.pid)
        if ticks is None or (self.start is not None and ticks != self.start):
            return False
        try:
            state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state != "Z"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "pid": self.pid, "start": self.start}


def can_bind(host: str, port: int) -> bool:
    """Could the SuperLink listen on ``host:port`` now? (Bound as uvicorn does, with SO_REUSEADDR.)"""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host or "0.0.0.0", port))
        except OSError:
            return False
    return True


def port_owner(port: int) -> str:
    """`` (by pid N: command)`` for the process listening on TCP ``port``, from /proc ('' if unknown)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == "0A":  # 0A: LISTEN
                inodes.add(f[9])
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                    return f" (by pid {proc.name}: {cmd[:120]})"
        except OSError:
            continue
    return ""


def _signal(pids: list[int], sig: int) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop_tree(ref: ProcRef, grace: float = STOP_GRACE_S, *, crash: bool = False) -> bool:
    """SIGTERM ``ref`` and its descendants, SIGKILL whatever is left after ``grace`` s.

    ``crash=True`` sends SIGKILL to the whole tree at once (what a power cut does: nothing
    gets to save anything), for fault-injection. Returns once nothing of the tree runs.
    """
    if not ref.alive():
        return False
    tree = [ref.pid, *descendants(ref.pid)]

    def running() -> list[int]:
        return [p for p in tree if proc_start_ticks(p) is not None and _not_zombie(p)]

    if crash:
        _signal(tree, signal.SIGKILL)
    else:
        _signal([ref.pid], signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and running():
            time.sleep(0.1)
            if not ref.alive():  # the root is gone: now its children, which it did not stop
                _signal([p for p in tree[1:] if _not_zombie(p)], signal.SIGTERM)
        _signal(running(), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while running() and time.monotonic() < deadline:
        time.sleep(0.05)
    return True


def _not_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# -- the platform ------------------------------------------------------------------------------
class Platform:
    """Start, inspect and stop one platform (SuperLink + the fedretain run) from its state folder."""

    def __init__(self, config: PlatformConfig, *, insecure: bool = False) -> None:
        self.config = config
        self.insecure = insecure
        self.state = Path(config.state_dir)
        self.flwr_home = self.state / "flwr-home"
        self.log_dir = self.state / "logs"
        self.state_file = self.state / STATE_FILE

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
        return subprocess.run([flower_script("flwr"), *args], env=self.env(), capture_output=True, text=True,
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
        from fedretain.server import tls

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
        from fedretain.server import tls

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
        cmd = [flower_script("flower-superlink"), "--host", cfg.host, "--port", str(cfg.port),
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
              echo: Callable[[str], None] = print) -> dict[str, Any]:
        """Start the SuperLink, register node keys, submit the run; return the saved state."""
        if self.running():
            raise PlatformError(f"a platform from {self.state} is already running (see `fedretain server status`; "
                                f"stop it with `fedretain server stop`)")
        project = project_dir(self.config.project_dir)
        previous = self.read_state() or {}
        if resume and not run_id:
            run_id = (previous.get("runs") or [{}])[-1].get("run_id")
        run_id = run_id or self.config.run.get("run-id") or uuid.uuid4().hex[:12]
        notes = self.check()
        run_config = build_run_config(self.config, project, resume=resume, run_id=run_id)
        if self.insecure:
            echo("WARNING: --insecure: the SuperLink serves plain HTTP and does not authenticate nodes; "
                 "use only for local experiments")
        for note in notes:
            echo(note)
        if not can_bind(self.config.host, self.config.port):
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
            submitted = self.submit(project, run_config)
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
        """Register one merchant public key; an already registered key is fine."""
        from fedretain.server import tls

        fp = tls.public_key_fingerprint(tls.load_node_public_key(key))
        res = self.flwr("supernode", "register", str(key), CONNECTION, "--name", key.stem, "--format", "json")
        try:
            out = json.loads(res.stdout)
        except json.JSONDecodeError:
            out = {"success": False, "error-message": (res.stderr or res.stdout).strip()[-300:]}
        if out.get("success"):
            return f"registered node key {key.name} ({fp}) as SuperNode {out.get('node-id')}"
        message = str(out.get("error-message", out))
        if "already" in message.lower():
            return f"node key {key.name} ({fp}) was already registered"
        raise PlatformError(f"registering node key {key}: {message}")

    def submit(self, project: Path, run_config: dict[str, Any]) -> dict[str, Any]:
        """``flwr run`` the fedretain app with ``run_config`` (written to a TOML file first)."""
        import tomli_w

        cfg_path = self.state / "run-config.toml"
        cfg_path.write_text(tomli_w.dumps(run_config), encoding="utf-8")
        out = self.flwr_json("run", str(project), CONNECTION, "--run-config", str(cfg_path), timeout=300)
        run_id = run_config.get("run-id") or _record_run_id(Path(str(run_config.get("out-dir", ""))))
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
        tmp = path.with_suffix(".tmp")
        tmp.write_text(res.stdout, encoding="utf-8")
        os.replace(tmp, path)
        return path

    # -- status / wait / stop --------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Processes, connected nodes, the current run and its progress (from run.json)."""
        state = self.read_state()
        if state is None:
            return {"running": False, "state_dir": str(self.state), "message": "no platform was started here"}
        link = self.running()
        out: dict[str, Any] = {
            "running": link is not None, "state_dir": str(self.state), "address": state.get("address"),
            "insecure": state.get("insecure"), "auth": state.get("auth"),
            "processes": [{**p.as_dict(), "alive": p.alive()} for p in self.processes(state)],
            "nodes": None, "flower_run": None, "run": None,
        }
        runs = state.get("runs") or []
        if link is not None:
            try:
                out["nodes"] = self.flwr_json("supernode", "ls", CONNECTION, timeout=60).get("nodes", [])
            except PlatformError as exc:
                out["nodes_error"] = str(exc)
            if runs:
                try:
                    found = self.flwr_json("ls", CONNECTION, "--run-id", runs[-1]["flower_run_id"], timeout=60)
                    out["flower_run"] = (found.get("runs") or [None])[0]
                except PlatformError as exc:
                    out["flower_run_error"] = str(exc)
                log = self.fetch_run_log(runs[-1]["flower_run_id"])
                out["server_log"] = str(log) if log else None
        if runs:
            out["run"] = {**runs[-1], **run_progress(Path(runs[-1]["out_dir"]))}
        return out

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


def _record_run_id(out_dir: Path) -> str | None:
    try:
        return json.loads((out_dir / "run.json").read_text(encoding="utf-8")).get("run_id")
    except (OSError, json.JSONDecodeError):
        return None


def run_progress(out_dir: Path) -> dict[str, Any]:
    """What ``run.json`` in ``out_dir`` says about a run (empty if there is none yet)."""
    path = Path(out_dir) / "run.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    done = [r for r in data.get("rounds", []) if r.get("status") == "completed"]
    return {
        "status": data.get("status"), "updated": data.get("updated", ""), "error": data.get("error"),
        "rounds_total": data.get("config", {}).get("rounds"), "rounds_done": done,
        "last_round": done[-1]["round"] if done else 0,
        "merchants": {k: v.get("rounds") for k, v in data.get("merchants", {}).items()},
        "events": [e.get("kind") for e in data.get("events", [])],
    }


def format_round(entry: dict[str, Any], total: int | None) -> str:
    """One line per finished round: who trained and the headline metrics."""
    merchants = sorted({n.get("merchant_id", "?") for n in entry.get("nodes", [])
                        if n.get("phase") == "train" and not n.get("error")})
    failed = sorted({str(n.get("merchant_id") or n.get("node_id")) for n in entry.get("nodes", []) if n.get("error")})
    metrics = {**{k: v for k, v in entry.get("train", {}).items() if k == "train_loss"},
               **{f"eval_{k}": v for k, v in entry.get("evaluate", {}).items() if k in ("auc", "loss", "accuracy")}}
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float)))
    line = f"round {entry['round']}/{total or '?'}: {len(merchants)} merchant(s) ({', '.join(merchants)})"
    if failed:
        line += f"; no answer from {', '.join(failed)}"
    return line + (f"; {shown}" if shown else "")


def stop_signal_handlers(on_stop: Callable[[], None]) -> dict[int, Any]:
    """Install SIGTERM/SIGINT handlers that run ``on_stop`` (returns the old handlers)."""
    def handler(signum: int, _frame: Any) -> None:
        on_stop()
        raise SystemExit(128 + signum)

    return {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}


__all__ = [
    "CONNECTION", "PlatformConfig", "PlatformError", "Platform", "ProcRef", "build_run_config", "descendants",
    "format_round", "project_dir", "run_progress", "stop_tree",
]
