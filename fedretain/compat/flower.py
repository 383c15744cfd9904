"""Flower internals used by fedretain, in one place (flwr 1.42; see :mod:`fedretain.compat`).

What lives here and why no public API does it:

* :func:`run_simulation`: Flower's in-process Simulation Engine entry point with a
  ServerApp ``Context`` (``flwr.simulation.run_simulation`` has no way to pass the run
  config and logs a deprecation on every call).
* Flower's SuperNode constants (heartbeat bounds, patience, error and task status codes)
  read from ``flwr.common.constant`` instead of copied by hand.
* The SuperNode launcher tweaks (:func:`cap_supernode_poll`, :func:`set_heartbeat_interval`,
  :func:`run_supernode`): flwr 1.42 hard-codes a 3 s idle sleep and a 30 s heartbeat.
  :func:`run_supernode` also reports the node id and Flower's exit code through a JSON
  status file (from Flower's structured log records), so the node supervisor needs no
  log scraping: Flower's process exit status is only 0/1 and it offers no ``--format json``.
* The warm executor's Runtime API calls (:class:`RuntimeChannel`, :func:`run_task`), the
  same calls ``flwr-clientapp`` makes. :func:`run_task` and :func:`pull_task_input` are
  adapted from Flower's ``flwr/supernode/runtime/run_clientapp.py`` (Apache-2.0, notice
  below and in ``NOTICE``).

Every name used is listed in :data:`INTERNALS`; ``tests/test_compat.py`` checks each still exists.
This module is longer than 450 lines because it keeps every Flower internal in one file that
a reviewer of a Flower upgrade reads at once.
"""
# Portions of this file (run_task, pull_task_input) are adapted from Flower 1.42.0,
# flwr/supernode/runtime/run_clientapp.py:
#
# Copyright 2025 Flower Labs GmbH. All Rights Reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
#
# Changes: a short retry backoff for not-yet-available objects, a heartbeat and a retry
# policy that never signal the (long-lived) calling process, the app call passed in.

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.common import constant as _constant

from fedretain.atomic import write_atomic
from fedretain.compat import CompatError, check_versions

check_versions()

#: Non-public Flower names used here, as (module, attribute); the compat test imports each.
INTERNALS: tuple[tuple[str, str], ...] = (
    ("flwr.common.constant", "HEARTBEAT_MIN_INTERVAL"),
    ("flwr.common.constant", "HEARTBEAT_MAX_INTERVAL"),
    ("flwr.common.constant", "HEARTBEAT_DEFAULT_INTERVAL"),
    ("flwr.common.constant", "HEARTBEAT_PATIENCE"),
    ("flwr.common.constant", "ErrorCode"),
    ("flwr.common.constant", "SubStatus"),
    ("flwr.cli.supernode.register", "try_load_public_key"),
    ("flwr.common.config", "get_fab_config"),
    ("flwr.common.serde", "context_from_proto"),
    ("flwr.common.serde", "fab_from_proto"),
    ("flwr.common.serde", "run_from_proto"),
    ("flwr.proto.node_pb2", "Node"),
    ("flwr.proto.runtime_pb2", "AcquireTaskRequest"),
    ("flwr.proto.runtime_pb2", "PullAppMessagesRequest"),
    ("flwr.proto.runtime_pb2", "PullTaskInputRequest"),
    ("flwr.proto.runtime_pb2", "SendTaskHeartbeatRequest"),
    ("flwr.simulation.run_simulation", "_run_simulation"),
    ("flwr.supercore.app_utils", "start_parent_process_monitor"),
    ("flwr.supercore.constant", "TaskType"),
    ("flwr.supercore.heartbeat", "HeartbeatSender"),
    ("flwr.supercore.heartbeat", "HEARTBEAT_DEFAULT_INTERVAL"),
    ("flwr.supercore.inflatable.inflatable_protobuf_utils", "make_confirm_message_received_fn_protobuf"),
    ("flwr.supercore.inflatable.inflatable_protobuf_utils", "make_pull_object_fn_protobuf"),
    ("flwr.supercore.inflatable.inflatable_utils", "pull_and_inflate_object_from_tree"),
    ("flwr.supercore.inflatable.inflatable_utils", "pull_objects"),
    ("flwr.supercore.interceptors", "RuntimeTokenHttpInterceptor"),
    ("flwr.supercore.interceptors", "RuntimeVersionHttpInterceptor"),
    ("flwr.supercore.logger", "FLOWER_LOGGER"),
    ("flwr.supercore.retry", "RetryInvoker"),
    ("flwr.supercore.retry", "exponential"),
    ("flwr.supercore.runtime", "RuntimeHttpClient"),
    ("flwr.supercore.task_identity", "TaskIdentity"),
    ("flwr.supercore.telemetry", "EventType"),
    ("flwr.supernode.cli.flower_supernode", "flower_supernode"),
    ("flwr.supernode.fleet_http_connection", "HEARTBEAT_DEFAULT_INTERVAL"),
    ("flwr.supernode.runtime.run_clientapp", "push_message"),
    ("flwr.supernode.runtime.run_clientapp", "push_task_output"),
    ("flwr.supernode.start_client_internal", "pull_objects"),
    ("flwr.supernode.start_client_internal", "time"),
)

# -- Flower's constants ------------------------------------------------------------------------------
HEARTBEAT_MIN_S = float(_constant.HEARTBEAT_MIN_INTERVAL)
HEARTBEAT_MAX_S = float(_constant.HEARTBEAT_MAX_INTERVAL)
HEARTBEAT_DEFAULT_S = float(_constant.HEARTBEAT_DEFAULT_INTERVAL)
HEARTBEAT_PATIENCE = int(_constant.HEARTBEAT_PATIENCE)  # missed heartbeats before the SuperLink drops a node
RECEIVING_MARKER = "Receiving:"  # what the SuperNode logs when a message arrives (a latency hint only)
LOCAL_WAIT_S = 0.02


# -- simulation --------------------------------------------------------------------------------------
def run_simulation(*, num_supernodes: int, client_app: Any, server_app: Any, backend_config: dict[str, Any],
                   server_app_context: Any) -> None:
    """Flower's in-process Simulation Engine with the given ServerApp context (its run config)."""
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    _run_simulation(num_supernodes=num_supernodes, exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                    client_app=client_app, server_app=server_app, backend_config=backend_config,
                    server_app_context=server_app_context)


def flwr_register_accepts(public_key: Path) -> bool:
    """Does ``flwr supernode register`` load this public key file (its own loader, for tests)?"""
    from flwr.cli.supernode.register import try_load_public_key

    return bool(try_load_public_key(Path(public_key)))


def set_task_identity(run_id: int, node_id: int, task_id: str = "") -> None:
    """Flower needs a task identity to build messages outside a running app (tests, tools)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id = run_id, node_id
    TaskIdentity.task_id = task_id  # type: ignore[assignment]  # declared int, Flower stores the API's str


def error_in_place_of(reply: Any, error: Any) -> Any:
    """``reply`` with its metadata kept (sender, reply-to, run, type) but ``error`` instead of its content.

    Flower's public constructors build an error reply only from the instruction (``reply_to=``), with
    fresh metadata; a server-side grid that refuses a node's reply must hand the strategy that same
    reply as failed, so this uses ``Message(metadata=, error=)``, the form Flower keeps for itself.
    """
    from flwr.app import Message

    return Message(metadata=reply.metadata, error=error)  # type: ignore[call-overload]  # internal form


# -- the SuperNode launcher ---------------------------------------------------------------------------
class CappedSleep:
    """Stands in for the ``time`` module inside ``start_client_internal`` only."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        # >= 1 s: the idle wait between pulls from the SuperLink (a network request each);
        # shorter: waits on the SuperNode's own in-memory state, cheap to check often.
        time.sleep(min(seconds, self.cap) if seconds >= 1 else min(seconds, LOCAL_WAIT_S))


def cap_supernode_poll(seconds: float) -> None:
    """Cap the SuperNode fleet loop's waits at ``seconds``.

    Two hard-coded waits in ``flwr.supernode.start_client_internal``: the ``time.sleep(3)``
    after an empty pull (capped at ``seconds``; the ``0.5`` s polls of its own in-memory
    state while a reply is computed drop to 20 ms), and the 1 s, 2 s, 4 s ... backoff of
    ``pull_objects`` when the server has registered a message but not finished uploading it.
    """
    import flwr.supernode.start_client_internal as sci
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    if isinstance(getattr(sci, "time", None), CappedSleep):  # set before in this process: restore first
        restore_supernode_poll()
    if getattr(sci, "time", None) is not time or getattr(sci, "pull_objects", None) is not pull_objects:
        raise CompatError("flwr.supernode.start_client_internal no longer uses the module-level `time` and "
                          "`pull_objects` this patch replaces")
    patched: Any = sci  # the module's globals, replaced on purpose
    patched.time = CappedSleep(seconds)
    patched.pull_objects = functools.partial(pull_objects, initial_backoff=min(seconds, 0.1),
                                             backoff_cap=max(seconds, 0.5))


_heartbeat_set: float | None = None  # what set_heartbeat_interval last set (None: Flower's default)


def restore_supernode_poll() -> None:
    """Undo :func:`cap_supernode_poll` (Flower's own waits again)."""
    import flwr.supernode.start_client_internal as sci
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    patched: Any = sci
    patched.time = time
    patched.pull_objects = pull_objects


def supernode_poll_waits() -> tuple[Any, Any]:
    """The ``time`` and ``pull_objects`` the SuperNode's fleet loop uses now (for tests)."""
    import flwr.supernode.start_client_internal as sci

    return sci.time, sci.pull_objects


def set_heartbeat_interval(seconds: float) -> None:
    """Make the SuperNode declare (and keep) a heartbeat interval of ``seconds``.

    Flower hard-codes 30 s in the fleet connection (what the node declares when it
    activates and with every heartbeat; the SuperLink drops a node after
    :data:`HEARTBEAT_PATIENCE` missed intervals) and in the heartbeat sender.
    """
    import flwr.supercore.heartbeat as hb
    import flwr.supernode.fleet_http_connection as fleet

    global _heartbeat_set
    expected = HEARTBEAT_DEFAULT_S if _heartbeat_set is None else _heartbeat_set
    for mod in (fleet, hb):
        if getattr(mod, "HEARTBEAT_DEFAULT_INTERVAL", None) != expected:
            raise CompatError(f"{mod.__name__}.HEARTBEAT_DEFAULT_INTERVAL is no longer Flower's default "
                              f"{HEARTBEAT_DEFAULT_S:g} s")
    for mod in (fleet, hb):
        patched: Any = mod
        patched.HEARTBEAT_DEFAULT_INTERVAL = float(seconds)
    _heartbeat_set = float(seconds)


def heartbeat_intervals() -> tuple[float, float]:
    """What the fleet connection declares and how often the heartbeat sender beats (for tests)."""
    import flwr.supercore.heartbeat as hb
    import flwr.supernode.fleet_http_connection as fleet

    return float(fleet.HEARTBEAT_DEFAULT_INTERVAL), float(hb.HEARTBEAT_DEFAULT_INTERVAL)


def heartbeat_sender(beat: Callable[[], bool]) -> Any:
    """Flower's ``HeartbeatSender`` (interval, jitter and retries as the SuperNode's own)."""
    from flwr.supercore.heartbeat import HeartbeatSender

    return HeartbeatSender(beat)


class SupernodeStatus(logging.Handler):
    """Writes the SuperNode's id and Flower exit code to a JSON file as Flower logs them.

    The records are matched on their *format string and arguments* (``"SuperNode ID: %s"``)
    and on ``flwr_exit``'s first line, here in the launcher process; the node supervisor
    reads ``{"node_id": ..., "exit_code": ...}`` from the file.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(logging.INFO)
        self.path = Path(path)
        self.status: dict[str, Any] = {"node_id": None, "exit_code": None}
        self._write()

    def _write(self) -> None:
        write_atomic(self.path, json.dumps(self.status).encode("utf-8"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if record.msg == "SuperNode ID: %s" and record.args:
                args = record.args if isinstance(record.args, tuple) else (record.args,)
                self.status["node_id"] = str(args[0])
            elif isinstance(record.msg, str) and record.msg.startswith("Exit Code: "):
                self.status["exit_code"] = int(record.msg.split("\n", 1)[0].split(":", 1)[1])
            else:
                return
            self._write()
        except (OSError, ValueError):
            self.handleError(record)


def read_supernode_status(path: Path) -> dict[str, Any]:
    """The launcher's status file (``{}`` before the launcher wrote it)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def run_supernode(args: list[str], *, poll_interval: float | None = None, heartbeat_interval: float | None = None,
                  parent_pid: int | None = None, status_file: Path | None = None) -> None:
    """Run Flower's ``flower-supernode`` in this process with the tweaks asked for."""
    if poll_interval is not None:
        cap_supernode_poll(poll_interval)
    if heartbeat_interval is not None:
        set_heartbeat_interval(heartbeat_interval)
    if status_file is not None:
        from flwr.supercore.logger import FLOWER_LOGGER

        FLOWER_LOGGER.addHandler(SupernodeStatus(status_file))
        if FLOWER_LOGGER.getEffectiveLevel() > logging.INFO:  # the id is logged at INFO: it must reach the handler
            FLOWER_LOGGER.setLevel(logging.INFO)
    if parent_pid is not None:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(parent_pid)  # exit with the node supervisor, even on SIGKILL
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *args]
    flower_supernode()


# -- the Runtime API (what flwr-clientapp speaks to its SuperNode) -----------------------------------
def retry_invoker(max_time: float | None) -> Any:
    """Retries for Runtime API calls that never signal this process.

    Flower's ``make_simple_http_retry_invoker`` sends SIGINT to its own process on a 401,
    which ends a one-message ``flwr-clientapp``; in a long-lived executor it would stop
    the whole node when a task's token went stale. A 4xx/5xx other than 502/503/504 is
    raised to the caller instead; connection errors are retried up to ``max_time``.
    """
    import httpx
    from flwr.supercore.retry import RetryInvoker, exponential

    def give_up(exc: Exception) -> bool:
        return isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code not in (502, 503, 504)

    return RetryInvoker(lambda: exponential(max_delay=2), (httpx.TransportError, httpx.HTTPStatusError),
                        max_tries=None, max_time=max_time, should_giveup=give_up)


class RuntimeChannel:
    """A connection to a SuperNode's Runtime API (``token``: one task's; None: the executor's own)."""

    def __init__(self, address: str, token: str | None = None, max_time: float | None = None) -> None:
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supercore.runtime import RuntimeHttpClient

        interceptors: list[Any] = [RuntimeVersionHttpInterceptor(
            component_name="flwr-clientapp" if token else "SuperExec")]
        if token:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        self.client = RuntimeHttpClient.from_server_address(
            server_address=address, insecure=True, root_certificates=None,
            interceptors=interceptors, retry_invoker=retry_invoker(max_time),
        )

    def acquire_task(self) -> str | None:
        """The token of a ClientApp task waiting on the SuperNode, or None."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        res = self.client.AcquireTask(AcquireTaskRequest(supported_task_types=[str(TaskType.CLIENT_APP)]))
        return str(res.token) if res.HasField("task") and res.token else None

    def close(self) -> None:
        self.client.close()


def fab_clientapp(fab: Any) -> str:
    """The ``clientapp`` component a FAB's pyproject.toml names."""
    from flwr.common.config import get_fab_config

    return str(get_fab_config(fab.content)["tool"]["flwr"]["app"]["components"]["clientapp"])


@dataclass
class TaskOutcome:
    """What :func:`run_task` did: the message type, success, and where the time went."""

    message_type: str
    ok: bool
    pull_s: float
    app_s: float
    push_s: float


def run_task(address: str, token: str, handle: Callable[[Any, Any, Any, Any], Any], *,
             refused: tuple[type[BaseException], ...] = (), backoff: float = 0.05,
             log: logging.Logger | None = None) -> TaskOutcome:
    """Pull one message, call ``handle(message, context, run, fab)``, push its reply and the task status.

    Adapted from Flower's ``run_clientapp`` task loop. An exception of a type in ``refused``
    is answered with Flower's ``INVALID_FAB`` error, any other with
    ``CLIENT_APP_RAISED_EXCEPTION``; the task is always closed with its status.
    """
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    log = log or logging.getLogger("fedretain.node")
    ErrorCode, SubStatus = _constant.ErrorCode, _constant.SubStatus
    channel = RuntimeChannel(address, token, max_time=30.0)
    client = channel.client

    def heartbeat() -> bool:  # like flwr-clientapp's, but never signals this (long-lived) process
        try:
            return bool(client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success)
        except Exception:  # noqa: BLE001 - a missed heartbeat is retried by HeartbeatSender
            return False

    beat = heartbeat_sender(heartbeat)
    beat.start()
    message = context = reply = None
    status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    started = t_pulled = t_ran = time.perf_counter()
    try:
        message, context, run, fab = pull_task_input(client, backoff)
        t_pulled = time.perf_counter()
        reply = handle(message, context, run, fab)
        t_ran = time.perf_counter()
        status, details = SubStatus.COMPLETED, ""
    except Exception as exc:  # noqa: BLE001 - reported to the server as an error reply
        code = ErrorCode.INVALID_FAB if isinstance(exc, refused) else ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        details = f"{type(exc)}:<'{exc}'>"
        if isinstance(exc, refused):
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
        channel.close()
    end = time.perf_counter()
    return TaskOutcome(message_type=message.metadata.message_type if message is not None else "?",
                       ok=status == SubStatus.COMPLETED, pull_s=t_pulled - started, app_s=t_ran - t_pulled,
                       push_s=end - t_ran)


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

    res = client.PullTaskInput(PullTaskInputRequest())
    set_task_identity(res.run.run_id, res.context.node_id, res.task_id)
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


__all__ = [
    "CappedSleep", "HEARTBEAT_DEFAULT_S", "HEARTBEAT_MAX_S", "HEARTBEAT_MIN_S", "HEARTBEAT_PATIENCE", "INTERNALS",
    "RECEIVING_MARKER", "RuntimeChannel", "SupernodeStatus", "TaskOutcome", "cap_supernode_poll", "fab_clientapp",
    "flwr_register_accepts", "heartbeat_intervals", "heartbeat_sender", "pull_task_input", "read_supernode_status",
    "restore_supernode_poll", "retry_invoker", "run_simulation", "run_supernode", "run_task",
    "set_heartbeat_interval", "set_task_identity", "supernode_poll_waits",
]
