"""A merchant's node process: Flower's SuperNode plus a warm executor for the ClientApp.

``fedretain client start`` runs :func:`run_node`: it checks the silo, the consent ledger,
the node key and the CA certificate *before* anything connects, writes the node config
(``data-path``, ``consent-db``, ...) to ``node.toml``, starts ``flower-supernode`` as a
child process and supervises it until it stops or the node is told to stop.

Why a warm executor. With Flower's defaults a SuperNode runs every message in a fresh
``flwr-clientapp`` process (``--isolation subprocess``) that imports torch, pandas and
the app again, and the SuperNode sleeps 3 s whenever a pull came back empty; a round of
a tiny model then costs 15-40 s on a small machine. Flower's own ``--isolation process``
mode leaves running the ClientApp to a long-lived process that talks to the SuperNode's
Runtime API; :class:`WarmExecutor` is that process: it imports the fedretain ClientApp
once and serves task after task through the same Runtime API calls ``flwr-clientapp``
makes (``AcquireTask``, ``PullTaskInput``, ``PushMessages``, ``PushTaskOutput``). It also
only ever runs the ClientApp *installed on the merchant's machine*: a FAB that asks for
another app or another fedretain version gets an error reply instead of running code the
server shipped. The SuperNode's 3 s idle sleep is hard-coded in flwr 1.42
(``start_client_internal``); ``python -m fedretain.clients.supernode`` starts the stock
SuperNode with that one sleep capped at ``--poll-interval`` seconds and, if asked, a
shorter ``--heartbeat-interval`` than Flower's hard-coded 30 s (see ``docs/DEPLOYMENT.md``).
``executor="subprocess", poll_interval=None`` is Flower unchanged.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("fedretain.node")

EXECUTORS = ("warm", "subprocess")
DEFAULT_APP = "fedretain.clients.client_app:app"
DEFAULT_FAB_ID = "fedretain/fedretain"
DEFAULT_POLL = 0.2
SUPPORTED_FLWR = "1.42."
MIN_HEARTBEAT_S, MAX_HEARTBEAT_S = 10.0, 1800.0  # flwr.common.constant.HEARTBEAT_MIN/MAX_INTERVAL
DEFAULT_HEARTBEAT_S = 30.0  # flwr.common.constant.HEARTBEAT_DEFAULT_INTERVAL
HEARTBEAT_PATIENCE = 2  # missed heartbeats before the SuperLink drops a node (flwr.common.constant)
STOP_GRACE_S = 10.0
LOCAL_WAIT_S = 0.02
EXIT_SUPERNODE_FAILED = 3
FAST_WINDOW_S = 3.0  # after a wake-up, poll the SuperNode quickly this long


class NodeSetupError(Exception):
    """The node cannot start: missing/invalid data, ledger, key or certificate."""


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
    import shutil

    found = shutil.which(name)
    if not found:
        raise NodeSetupError(f"`{name}` not found next to {sys.executable} or on PATH: is flwr installed?")
    return found


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A free port *below* the kernel's ephemeral range.

    A listening port taken from the ephemeral range can be stolen while its server is
    down: a client that keeps reconnecting to it (a SuperNode waiting for its platform,
    the executor waiting for its SuperNode) may be given that very port as its source
    port and connect to itself, and the restarted server can no longer bind it.
    """
    import random

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
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) → (host, port), with a clear error."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise NodeSetupError(f"server address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


# -- settings, checks, node config ------------------------------------------------------------
@dataclass(frozen=True)
class NodeSettings:
    """How one merchant node connects and where its data, ledger, keys and state live."""

    server: str
    data: Path
    consent_db: Path | None = None
    auth_key: Path | None = None
    root_cert: Path | None = None
    insecure: bool = False
    state_dir: Path | None = None
    signing_key: Path | None = None
    runtime_port: int = 0
    executor: str = "warm"
    poll_interval: float | None = DEFAULT_POLL
    heartbeat_interval: float | None = None  # None: Flower's 30 s
    max_wait_time: float | None = None
    app: str = DEFAULT_APP
    extra_node_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        split_address(self.server)
        if self.executor not in EXECUTORS:
            raise NodeSetupError(f"executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        if self.poll_interval is not None and not 0.01 <= self.poll_interval <= 3:
            raise NodeSetupError(f"poll interval must be in [0.01, 3] s, got {self.poll_interval}")
        if self.heartbeat_interval is not None and not MIN_HEARTBEAT_S <= self.heartbeat_interval <= MAX_HEARTBEAT_S:
            raise NodeSetupError(f"heartbeat interval must be in [{MIN_HEARTBEAT_S:g}, {MAX_HEARTBEAT_S:g}] s "
                                 f"(the platform refuses others), got {self.heartbeat_interval}")
        if self.insecure and self.auth_key is not None:
            raise NodeSetupError("--insecure cannot be combined with --key: node authentication needs TLS")
        if self.insecure and self.root_cert is not None:
            raise NodeSetupError("--insecure cannot be combined with --root-cert")

    @property
    def state(self) -> Path:
        return (self.state_dir or Path(self.data) / ".node").resolve()

    @property
    def flwr_home(self) -> Path:
        return self.state / "flwr-home"

    @property
    def log_dir(self) -> Path:
        return self.state / "logs"

    def node_config(self) -> dict[str, Any]:
        """Flower node_config read by :meth:`fedretain.clients.node.NodeConfig.from_flower`."""
        cfg: dict[str, Any] = {
            "data-path": str(Path(self.data).resolve()),
            "consent-db": str(Path(self.consent_db).resolve()) if self.consent_db else "",
            "state-dir": str(self.state),
        }
        if self.signing_key:
            cfg["node-key"] = str(Path(self.signing_key).resolve())
        for key, value in self.extra_node_config.items():
            if key in cfg:
                raise NodeSetupError(f"node config key {key!r} is set by fedretain itself")
            cfg[key] = value
        return cfg


@dataclass(frozen=True)
class Preflight:
    """What the checks found (logged at start; no secrets)."""

    merchant_id: str
    n_events: int
    n_users: int
    ledger_size: int
    ledger_head: str
    key_fingerprint: str | None


def preflight(settings: NodeSettings) -> Preflight:
    """Fail before connecting if the silo, the ledger, the key or the CA certificate is unusable."""
    from fedretain.clients.node import NodeConfig
    from fedretain.ingest import IngestError, load_silo
    from fedretain.server import tls

    silo_path = Path(settings.data)
    if not silo_path.is_dir():
        raise NodeSetupError(f"data: silo folder {silo_path} does not exist")
    try:
        silo = load_silo(silo_path)
    except IngestError as exc:
        raise NodeSetupError(f"data: {exc}") from None
    if len(silo.events) == 0:
        raise NodeSetupError(f"data: silo {silo_path} has no accepted events (see `fedretain data check {silo_path}`)")
    cfg = NodeConfig.for_silo(silo_path, settings.consent_db, settings.signing_key, settings.state)
    size, head = _check_ledger(cfg.consent_db, cfg.state_dir)
    fp = None
    if settings.auth_key is not None:
        try:
            fp = tls.public_key_fingerprint(tls.load_node_private_key(settings.auth_key))
        except tls.TLSError as exc:
            raise NodeSetupError(f"node key: {exc}") from None
    if settings.root_cert is not None:
        try:
            tls.check_root_cert(settings.root_cert)
        except tls.TLSError as exc:
            raise NodeSetupError(f"root certificate: {exc}") from None
    return Preflight(
        merchant_id=str(silo.merchant.get("merchant_id", silo_path.name)),
        n_events=int(len(silo.events)), n_users=int(silo.events["user_id"].nunique()),
        ledger_size=size, ledger_head=head, key_fingerprint=fp,
    )


def _check_ledger(path: Path, state_dir: Path | None = None) -> tuple[int, str]:
    """Open and verify the consent ledger (signatures and hash chain) under the node's pinned key; fail closed."""
    from fedretain.consent.identity import require_pin
    from fedretain.consent.ledger import ConsentLedger

    if not Path(path).is_file():
        raise NodeSetupError(
            f"consent ledger: {path} does not exist (create it with `fedretain consent init` and import the "
            f"merchant's consent records, or pass --consent-db)"
        )
    try:
        pin = require_pin(state_dir, path) if state_dir is not None else None
        with ConsentLedger.open(path, pinned=pin) as ledger:
            result = ledger.verify()
            head = ledger.head()
    except Exception as exc:  # a corrupt file, a missing key, a schema mismatch: all mean "do not use"
        raise NodeSetupError(f"consent ledger: cannot open {path}: {type(exc).__name__}: {exc}") from None
    if not result.ok:
        raise NodeSetupError(
            f"consent ledger: {path} failed verification at record {result.first_bad_seq}: {result.reason}"
        )
    return int(head.size), str(head.root_hex)


def probe_server(settings: NodeSettings, timeout: float = 5.0) -> str:
    """Check how the platform answers before the SuperNode dials it; raise on a refusal.

    Flower's SuperNode retries a refused TLS handshake forever with only "Connection
    attempt failed" in its log; this makes the same kind of connection once and turns
    a refusal into a clear error. An unreachable platform is not an error (nodes may
    start first and wait); the returned note says so.
    """
    import ssl

    import httpx

    host, port = split_address(settings.server)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        return f"the platform at {settings.server} is not reachable yet ({exc.strerror or exc}); waiting for it"
    if settings.insecure:
        sock.close()
        try:
            httpx.post(f"http://{settings.server}/v1/fleet/pull-messages", content=b"", timeout=timeout)
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.ConnectError) as exc:
            raise NodeSetupError(
                f"the platform at {settings.server} refused the plain-text connection ({exc}): it serves TLS only. "
                f"Start the node with --root-cert CA (and --key) instead of --insecure"
            ) from None
        except httpx.HTTPError as exc:
            return f"plain-text connection to {settings.server}: {exc}"
        return f"the platform at {settings.server} answers plain HTTP"
    if settings.root_cert is not None:
        ctx = ssl.create_default_context(cafile=str(settings.root_cert))
    else:
        ctx = ssl.create_default_context()
    try:
        with ctx.wrap_socket(sock, server_hostname=host) as tls_sock:
            version = tls_sock.version()
    except ssl.SSLCertVerificationError as exc:
        raise NodeSetupError(
            f"the platform's TLS certificate at {settings.server} does not verify "
            f"({exc.verify_message}): check --root-cert and that the certificate names {host}"
        ) from None
    except (ssl.SSLError, OSError) as exc:
        raise NodeSetupError(
            f"TLS handshake with {settings.server} failed ({exc}): the platform may not serve TLS there"
        ) from None
    finally:
        sock.close()
    return f"TLS to {settings.server} verified ({version})"


def write_node_config(settings: NodeSettings) -> Path:
    """Write ``<state>/node.toml`` (Flower's ``--node-config`` file) atomically."""
    import tomli_w

    settings.state.mkdir(parents=True, exist_ok=True)
    path = settings.state / "node.toml"
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_bytes(tomli_w.dumps(settings.node_config()).encode())
    os.replace(tmp, path)
    return path


def supernode_command(settings: NodeSettings, node_toml: Path, port: int, parent_pid: int | None = None) -> list[str]:
    """The ``flower-supernode`` command line (through the poll-capping launcher if enabled)."""
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
        return [flower_script("flower-supernode"), *args]
    launcher = [sys.executable, "-m", "fedretain.clients.supernode"]
    if settings.poll_interval is not None:
        launcher += ["--poll-interval", str(settings.poll_interval)]
    if settings.heartbeat_interval is not None:
        launcher += ["--heartbeat-interval", str(settings.heartbeat_interval)]
    if parent_pid is not None:
        launcher += ["--parent-pid", str(parent_pid)]
    return [*launcher, "--", *args]


# -- the warm executor -------------------------------------------------------------------------
def _retry_invoker(max_time: float | None) -> Any:
    """Retries for Runtime API calls that never signal this process.

    Flower's ``make_simple_http_retry_invoker`` sends SIGINT to its own process on a 401,
    which ends a one-message ``flwr-clientapp``; here it would stop the whole node when a
    task's token went stale (the SuperNode was restarted). A 4xx/5xx other than 502/503/504
    is raised to the caller instead; connection errors are retried up to ``max_time``.
    """
    import httpx
    from flwr.supercore.retry import RetryInvoker, exponential

    def give_up(exc: Exception) -> bool:
        return isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code not in (502, 503, 504)

    return RetryInvoker(lambda: exponential(max_delay=2.0), (httpx.TransportError, httpx.HTTPStatusError),
                        max_tries=None, max_time=max_time, should_giveup=give_up)


class FabRefused(Exception):
    """The run's FAB is not the ClientApp installed on this node."""


class WarmExecutor:
    """Serves a SuperNode's ClientApp tasks in this process, importing the app only once.

    It speaks the SuperNode Runtime API exactly as ``flwr-clientapp`` does (its helper
    functions are reused), so the SuperNode, the SuperLink and the messages are Flower's;
    only the per-message process start is gone. ``context.state`` round-trips through the
    SuperNode as with ``flwr-clientapp``.
    """

    def __init__(self, runtime_address: str, *, app_ref: str = DEFAULT_APP, fab_id: str = DEFAULT_FAB_ID,
                 fab_version: str | None = None, poll_interval: float = 1.0, wake: threading.Event | None = None,
                 fast_poll: float = 0.05) -> None:
        self.runtime_address = runtime_address
        self.app_ref = app_ref
        self.fab_id = fab_id
        self.fab_version = fab_version
        self.poll_interval = poll_interval
        self.wake = wake
        self.fast_poll = fast_poll
        self.app: Any = None
        self.tasks_done = 0
        self.tasks_failed = 0
        self._fab_ok: dict[str, str | None] = {}  # fab hash -> refusal reason (None: accepted)

    def load(self) -> None:
        """Import the ClientApp (torch, pandas, ... once for the life of the node)."""
        import importlib

        from flwr.clientapp.client_app import ClientApp

        module, _, attr = self.app_ref.partition(":")
        app: Any = importlib.import_module(module)
        for part in attr.split("."):
            app = getattr(app, part)
        if not isinstance(app, ClientApp):
            raise NodeSetupError(f"{self.app_ref} is not a flwr ClientApp")
        self.app = app

    def _client(self, token: str | None, max_time: float | None = None):
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supercore.runtime import RuntimeHttpClient

        interceptors: list[Any] = [RuntimeVersionHttpInterceptor(
            component_name="flwr-clientapp" if token else "SuperExec")]
        if token:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        retry = _retry_invoker(max_time)
        return RuntimeHttpClient.from_server_address(
            server_address=self.runtime_address, insecure=True, root_certificates=None,
            interceptors=interceptors, retry_invoker=retry,
        )

    def serve(self, keep_going: Callable[[], bool]) -> None:
        """Acquire and run tasks until ``keep_going()`` is false.

        Asks the SuperNode for a task every ``poll_interval`` seconds, and every
        ``fast_poll`` seconds for a moment after ``wake`` is set (the supervisor sets it
        when the SuperNode logs that it is receiving a message), so an idle node costs
        little and a message is picked up within milliseconds.
        """
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        if self.app is None:
            self.load()
        client = self._client(None, max_time=2.0)  # never block for long on a SuperNode that died
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
        fast_until = time.monotonic() + FAST_WINDOW_S
        try:
            while keep_going():
                try:
                    res = client.AcquireTask(request)
                except Exception as exc:  # noqa: BLE001 - the SuperNode is restarting or gone
                    if keep_going():
                        log.warning("cannot reach the SuperNode's Runtime API: %s", exc)
                        time.sleep(1.0)
                    continue
                if res.HasField("task") and res.token:
                    self.run_task(res.token)
                elif time.monotonic() < fast_until:
                    time.sleep(self.fast_poll)
                elif self.wake is None:
                    time.sleep(self.poll_interval)
                elif self.wake.wait(self.poll_interval):
                    self.wake.clear()
                    fast_until = time.monotonic() + FAST_WINDOW_S
        finally:
            client.close()

    def _check_fab(self, run: Any, fab: Any) -> None:
        """Refuse FABs that are not this node's installed app (fails closed)."""
        reason = self._fab_ok.get(fab.hash_str, "unchecked")
        if reason == "unchecked":
            from flwr.common.config import get_fab_config

            reason = None
            try:
                comp = get_fab_config(fab.content)["tool"]["flwr"]["app"]["components"]["clientapp"]
            except Exception as exc:  # malformed FAB
                comp, reason = None, f"cannot read the FAB's pyproject.toml: {exc}"
            if reason is None and run.fab_id != self.fab_id:
                reason = f"this node only runs {self.fab_id}, the run asks for {run.fab_id}"
            elif reason is None and comp != self.app_ref:
                reason = f"the run's ClientApp is {comp!r}; this node only runs {self.app_ref!r}"
            elif reason is None and self.fab_version and run.fab_version != self.fab_version:
                reason = (f"the run is fedretain {run.fab_version} but this node has {self.fab_version} installed; "
                          f"install the same version on both sides")
            self._fab_ok[fab.hash_str] = reason
        if reason:
            raise FabRefused(reason)

    def run_task(self, token: str) -> bool:
        """Pull one message, run the ClientApp on it, push the reply and the task status."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        client = self._client(token, max_time=30.0)

        def heartbeat() -> bool:  # like flwr-clientapp's, but never signals this (long-lived) process
            try:
                return bool(client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success)
            except Exception:  # noqa: BLE001 - a missed heartbeat is retried by HeartbeatSender
                return False

        beat = HeartbeatSender(heartbeat)
        beat.start()
        message = context = reply = None
        status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        started = t_pulled = t_ran = time.perf_counter()
        try:
            message, context, run, fab = pull_task_input(client, self.fast_poll)
            t_pulled = time.perf_counter()
            self._check_fab(run, fab)
            reply = self.app(message=message, context=context)
            t_ran = time.perf_counter()
            status, details = SubStatus.COMPLETED, ""
        except Exception as exc:  # noqa: BLE001 - reported to the server as an error reply
            code = ErrorCode.INVALID_FAB if isinstance(exc, FabRefused) else ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            details = f"{type(exc)}:<'{exc}'>"
            if isinstance(exc, FabRefused):
                log.error("refused the run's app: %s", exc)
            else:
                log.error("ClientApp raised an exception", exc_info=exc)
            if message is not None:
                reply = Message(Error(code=code, reason=details), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception as exc:  # noqa: BLE001
                log.error("failed to push the reply to the SuperNode: %s", exc)
                status = SubStatus.FAILED
            push_task_output(client=client, context=context, sub_status=status, details=details)
            beat.stop()
            client.close()
        ok = status == SubStatus.COMPLETED
        self.tasks_done += ok
        self.tasks_failed += not ok
        mtype = message.metadata.message_type if message is not None else "?"
        end = time.perf_counter()
        log.info("%s %s in %.2f s (pull %.2f s, app %.2f s, push %.2f s)", mtype, "done" if ok else "FAILED",
                 end - started, t_pulled - started, t_ran - t_pulled, end - t_ran)
        return ok


def pull_task_input(client: Any, backoff: float) -> tuple[Any, Any, Any, Any]:
    """``flwr-clientapp``'s ``pull_task_input`` with a short retry backoff.

    The SuperNode creates the task before it has pulled the message's objects from the
    SuperLink; Flower's default backoff for a not-yet-available object is 1 s, then 2 s
    (made for a process that took seconds to start). A warm executor gets there within
    milliseconds, so it retries every ``backoff`` seconds (at most 0.5 s) instead.
    """
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context = context_from_proto(res.context)
    run = run_from_proto(res.run)
    fab = fab_from_proto(res.fab)
    msgs = client.PullMessages(PullAppMessagesRequest())
    if not msgs.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node = Node(node_id=context.node_id)
    tree = msgs.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message,
        initial_backoff=backoff,
        backoff_cap=0.5,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id
    return message, context, run, fab


# -- supervising the SuperNode -------------------------------------------------------------------
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
    """Copies the SuperNode's output to its log file; keeps the tail; surfaces key lines."""

    def __init__(self, stream: Any, path: Path, echo: Callable[[str], None],
                 wake: threading.Event | None = None) -> None:
        super().__init__(daemon=True, name="supernode-log")
        self.stream, self.path, self.echo, self.wake = stream, path, echo, wake
        self.tail: deque[str] = deque(maxlen=60)
        self.node_id: str | None = None

    def run(self) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(f"===== fedretain node supervisor pid {os.getpid()}: SuperNode started "
                     f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} =====\n")
            for raw in iter(self.stream.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\n")
                fh.write(line + "\n")
                fh.flush()
                self.tail.append(line)
                if self.wake is not None and "Receiving:" in line:
                    self.wake.set()
                if "SuperNode ID:" in line:
                    self.node_id = line.rsplit(":", 1)[1].strip()
                    self.echo(f"connected to the platform as SuperNode {self.node_id}")
                elif "ERROR" in line or "WARNING" in line:
                    self.echo(f"[supernode] {line.strip()}")


def terminate(proc: subprocess.Popen, grace: float = STOP_GRACE_S, group: bool = False) -> int | None:
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
                 heartbeat_interval: float = DEFAULT_HEARTBEAT_S) -> None:
        self.path, self.server, self.key = path, server, key
        self.linger_s = HEARTBEAT_PATIENCE * heartbeat_interval + 15.0  # plus a margin
        self._written = 0.0
        try:
            import json

            self.previous = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.previous = {}

    def alive(self, node_id: str) -> None:
        now = time.time()
        if now - self._written < self.WRITE_EVERY_S:
            return
        import json

        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"server": self.server, "key": self.key, "node_id": node_id, "alive_at": now}))
        os.replace(tmp, self.path)
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

        executor = WarmExecutor("", app_ref=settings.app, fab_version=version("fedretain"), wake=threading.Event())
        executor.load()  # before connecting: the node is ready the moment it is listed
    port = settings.runtime_port or free_port()
    env = flower_env(settings.flwr_home)
    if settings.poll_interval is not None:
        env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(settings.poll_interval)
    session = _Session(settings.state / "session.json", settings.server, info.key_fingerprint,
                       settings.heartbeat_interval or DEFAULT_HEARTBEAT_S)
    ever_connected, restarts = False, 0
    try:
        while not stop.is_set():
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
                if pump.node_id is not None:
                    session.alive(pump.node_id)
                stop.wait(0.2)
            if stop.is_set():
                terminate(proc)
                pump.join(2)
                break
            pump.join(2)
            ever_connected = ever_connected or pump.node_id is not None
            if pump.node_id is not None:
                restarts = 0  # it had been admitted: a fresh problem, start the backoff over
            tail = list(pump.tail)
            flwr_code = next((ln.split("Exit Code:")[1].strip() for ln in reversed(tail) if "Exit Code:" in ln),
                             proc.returncode)
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


# -- ``python -m fedretain.clients.supernode``: the stock SuperNode with a shorter idle poll --------
class _CappedSleep:
    """Stands in for the ``time`` module inside ``start_client_internal`` only."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        # >= 1 s: the idle wait between pulls from the SuperLink (a network request each);
        # shorter: waits on the SuperNode's own in-memory state, cheap to check often.
        time.sleep(min(seconds, self.cap) if seconds >= 1 else min(seconds, LOCAL_WAIT_S))


def cap_supernode_poll(seconds: float) -> bool:
    """Cap the SuperNode fleet loop's waits at ``seconds``.

    Two hard-coded waits in ``flwr.supernode.start_client_internal`` (flwr 1.42): the
    ``time.sleep(3)`` after an empty pull (capped at ``seconds``; the ``0.5`` s polls of
    its own in-memory state while a reply is being computed drop to 20 ms), and the
    1 s, 2 s, 4 s ... backoff of ``pull_objects`` when the server has registered a message
    but not finished uploading its content. Only for the flwr version this was read
    against; otherwise Flower is left unchanged and False is returned.
    """
    import functools

    import flwr.supernode.start_client_internal as sci
    from flwr.supercore.inflatable.inflatable_utils import pull_objects
    from flwr.supercore.version import package_version

    if (not str(package_version).startswith(SUPPORTED_FLWR) or getattr(sci, "time", None) is not time
            or getattr(sci, "pull_objects", None) is not pull_objects):
        return False
    sci.time = _CappedSleep(seconds)  # type: ignore[attr-defined]
    sci.pull_objects = functools.partial(pull_objects, initial_backoff=min(seconds, 0.1),  # type: ignore
                                         backoff_cap=max(seconds, 0.5))
    return True


def set_heartbeat_interval(seconds: float) -> bool:
    """Make the SuperNode declare (and keep) a heartbeat interval of ``seconds``.

    flwr 1.42 hard-codes 30 s in the fleet connection (what the node declares when it
    activates and with every heartbeat; the SuperLink drops a node after 2 missed
    intervals) and in the heartbeat sender (how often it sends). A shorter interval lets
    the platform notice a dead node sooner, so a round waits less for it; the SuperLink
    accepts 10 s to 30 min. Only for the flwr version this was read against; otherwise
    Flower is left unchanged and False is returned.
    """
    import flwr.supercore.heartbeat as hb
    import flwr.supernode.fleet_http_connection as fleet
    from flwr.supercore.version import package_version

    if (not str(package_version).startswith(SUPPORTED_FLWR)
            or getattr(fleet, "HEARTBEAT_DEFAULT_INTERVAL", None) != DEFAULT_HEARTBEAT_S
            or getattr(hb, "HEARTBEAT_DEFAULT_INTERVAL", None) != DEFAULT_HEARTBEAT_S):
        return False
    fleet.HEARTBEAT_DEFAULT_INTERVAL = float(seconds)  # type: ignore[attr-defined]
    hb.HEARTBEAT_DEFAULT_INTERVAL = float(seconds)  # type: ignore[attr-defined]
    return True


def _main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fedretain.clients.supernode",
                                     description="flower-supernode with a shorter idle poll interval")
    parser.add_argument("--poll-interval", type=float, default=None)
    parser.add_argument("--heartbeat-interval", type=float, default=None)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    if args.poll_interval is not None and not cap_supernode_poll(args.poll_interval):
        print("fedretain: unknown flwr version; SuperNode poll interval left at Flower's default", file=sys.stderr)
    if args.heartbeat_interval is not None and not set_heartbeat_interval(args.heartbeat_interval):
        print("fedretain: unknown flwr version; SuperNode heartbeat interval left at Flower's default",
              file=sys.stderr)
    if args.parent_pid is not None:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(args.parent_pid)  # exit with the node supervisor, even on SIGKILL
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    _main()
