"""The warm executor: a merchant node's ClientApp served in one long-lived process.

With Flower's defaults a SuperNode runs every message in a fresh ``flwr-clientapp``
process that imports torch, pandas and the app again; a round of a tiny model then costs
15-40 s on a small machine. Flower's ``--isolation process`` mode leaves running the
ClientApp to a long-lived process that talks to the SuperNode's Runtime API;
:class:`WarmExecutor` is that process. It imports the fedretain ClientApp once and serves
task after task through the same Runtime API calls ``flwr-clientapp`` makes (in
:mod:`fedretain.compat.flower`). It only ever runs the ClientApp *installed on the
merchant's machine*: a FAB that asks for another app or another fedretain version gets an
error reply instead of running code the server shipped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from fedretain.clients.node_settings import DEFAULT_APP, DEFAULT_FAB_ID, NodeSetupError
from fedretain.compat import flower

log = logging.getLogger("fedretain.node")

FAST_WINDOW_S = 3.0  # after a wake-up, poll the SuperNode quickly this long


class FabRefused(Exception):
    """The run's FAB is not the ClientApp installed on this node."""


class WarmExecutor:
    """Serves a SuperNode's ClientApp tasks in this process, importing the app only once.

    It speaks the SuperNode Runtime API exactly as ``flwr-clientapp`` does, so the
    SuperNode, the SuperLink and the messages are Flower's; only the per-message process
    start is gone. ``context.state`` round-trips through the SuperNode as with ``flwr-clientapp``.
    """

    def __init__(self, runtime_address: str, *, app_ref: str = DEFAULT_APP, fab_id: str = DEFAULT_FAB_ID,
                 fab_version: str | None = None, poll_interval: float = 1.0, wake: threading.Event | None = None,
                 fast_poll: float = 0.05, progress: Callable[[str], None] | None = None) -> None:
        self.runtime_address = runtime_address
        self.app_ref = app_ref
        self.fab_id = fab_id
        self.fab_version = fab_version
        self.poll_interval = poll_interval
        self.wake = wake
        self.fast_poll = fast_poll
        self.progress = progress  # one console line per reply (round, examples used, ε spent)
        self.app: Any = None
        self.tasks_done = 0
        self.tasks_failed = 0
        self._fab_ok: dict[str, str | None] = {}  # fab hash -> refusal reason (None: accepted)

    def load(self) -> None:
        """Import the ClientApp (torch, pandas, ... once for the life of the node)."""
        import importlib

        import torch
        from flwr.clientapp import ClientApp

        torch.set_num_threads(1)  # one thread per node process is faster on small CPUs (docs/DEPLOYMENT.md)
        module, _, attr = self.app_ref.partition(":")
        app: Any = importlib.import_module(module)
        for part in attr.split("."):
            app = getattr(app, part)
        if not isinstance(app, ClientApp):
            raise NodeSetupError(f"{self.app_ref} is not a flwr ClientApp")
        self.app = app

    def serve(self, keep_going: Callable[[], bool]) -> None:
        """Acquire and run tasks until ``keep_going()`` is false.

        Asks the SuperNode for a task every ``poll_interval`` seconds, and every
        ``fast_poll`` seconds for a moment after ``wake`` is set (the supervisor sets it
        when the SuperNode logs that it is receiving a message), so an idle node costs
        little and a message is picked up within milliseconds.
        """
        if self.app is None:
            self.load()
        channel = flower.RuntimeChannel(self.runtime_address, max_time=2.0)  # never block long on a dead SuperNode
        fast_until = time.monotonic() + FAST_WINDOW_S
        try:
            while keep_going():
                try:
                    token = channel.acquire_task()
                except Exception as exc:  # noqa: BLE001 - the SuperNode is restarting or gone
                    if keep_going():
                        log.warning("cannot reach the SuperNode's Runtime API: %s", exc)
                        time.sleep(1.0)
                    continue
                if token:
                    self.run_task(token)
                elif time.monotonic() < fast_until:
                    time.sleep(self.fast_poll)
                elif self.wake is None:
                    time.sleep(self.poll_interval)
                elif self.wake.wait(self.poll_interval):
                    self.wake.clear()
                    fast_until = time.monotonic() + FAST_WINDOW_S
        finally:
            channel.close()

    def _check_fab(self, run: Any, fab: Any) -> None:
        """Refuse FABs that are not this node's installed app (fails closed)."""
        reason = self._fab_ok.get(fab.hash_str, "unchecked")
        if reason == "unchecked":
            reason = None
            try:
                comp: str | None = flower.fab_clientapp(fab)
            except Exception as exc:  # noqa: BLE001 - a malformed FAB
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

    def _handle(self, message: Any, context: Any, run: Any, fab: Any) -> Any:
        self._check_fab(run, fab)
        reply = self.app(message=message, context=context)
        if self.progress is not None:
            from fedretain.clients.round_progress import describe_reply

            line = describe_reply(message, reply)
            if line:
                self.progress(line)
        return reply

    def run_task(self, token: str) -> bool:
        """Pull one message, run the ClientApp on it, push the reply and the task status."""
        out = flower.run_task(self.runtime_address, token, self._handle, refused=(FabRefused,),
                              backoff=self.fast_poll, log=log)
        self.tasks_done += out.ok
        self.tasks_failed += not out.ok
        log.info("%s %s in %.2f s (pull %.2f s, app %.2f s, push %.2f s)", out.message_type,
                 "done" if out.ok else "FAILED", out.pull_s + out.app_s + out.push_s, out.pull_s, out.app_s,
                 out.push_s)
        return out.ok


__all__ = ["FAST_WINDOW_S", "FabRefused", "WarmExecutor"]
