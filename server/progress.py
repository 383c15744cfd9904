"""Observers of a run's progress (a rich progress bar in the CLI, logs elsewhere).

The ServerApp runs inside Flower (a thread in simulation, a process in deployment), so
it reports through this small registry instead of printing: the CLI registers an
observer when it runs the simulation in-process.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from fedretain.server.run_record import RunRecord

log = logging.getLogger("fedretain.server")


class RunObserver(Protocol):
    def on_start(self, run_id: str, total_rounds: int, first_round: int) -> None: ...
    def on_round_trained(self, entry: dict[str, Any]) -> None:
        """Round ``entry["round"]``'s global model exists (aggregated, checkpointed), not yet evaluated."""

    def on_round(self, entry: dict[str, Any]) -> None:
        """Round ``entry["round"]`` is complete: trained and evaluated (``entry["evaluate"]``)."""

    def on_end(self, status: str, record: dict[str, Any]) -> None: ...


_OBSERVERS: list[RunObserver] = []


def add_observer(obs: RunObserver) -> None:
    _OBSERVERS.append(obs)


def remove_observer(obs: RunObserver) -> None:
    if obs in _OBSERVERS:
        _OBSERVERS.remove(obs)


def notify(event: str, *args: Any) -> None:
    for obs in list(_OBSERVERS):
        handler = getattr(obs, event, None)
        if handler is None:  # observers implement only the events they care about
            continue
        try:
            handler(*args)
        except Exception:  # an observer must never break a run
            log.exception("run observer failed on %s", event)


@contextmanager
def tracked_run(record: RunRecord, total_rounds: int, first_round: int, final_model: Path) -> Iterator[None]:
    """Tell observers a run starts; on leaving, finish ``record`` as completed, or as failed
    with the error (which propagates), and tell them how it ended."""
    notify("on_start", record.data["run_id"], total_rounds, first_round)
    try:
        yield
    except Exception as exc:
        record.finish("failed", error=f"{type(exc).__name__}: {exc}")
        notify("on_end", "failed", record.data)
        raise
    record.finish("completed", final_model=str(final_model))
    notify("on_end", "completed", record.data)


class MerchantsDone:
    """Observer counting merchants done per round (trained without error, evaluated) for large runs.

    ``done_per_round`` maps round → merchants whose train reply arrived without error;
    with ``echo`` each round prints one line ``round r: k/N merchants trained``, which is
    what a 1,000-merchant simulation shows instead of one line per node.
    """

    def __init__(self, total: int, echo: bool = False) -> None:
        self.total, self.echo = total, echo
        self.done_per_round: dict[int, int] = {}
        self.failed_per_round: dict[int, int] = {}

    def on_round_trained(self, entry: dict[str, Any]) -> None:
        nodes = [n for n in entry.get("nodes", []) if n.get("phase") == "train"]
        rnd = int(entry["round"])
        self.done_per_round[rnd] = sum(1 for n in nodes if not n.get("error"))
        self.failed_per_round[rnd] = sum(1 for n in nodes if n.get("error"))
        if self.echo:
            print(f"round {rnd}: {self.done_per_round[rnd]}/{self.total} merchants trained"
                  f" ({self.failed_per_round[rnd]} failed)", flush=True)
