"""The witness applied to every exchange: a Flower ``Grid`` that checks each reply's ledger heads.

:func:`witnessed` wraps the ServerApp's grid. On the way out each instruction gets a
``witness-seen`` record with the tree sizes the platform last witnessed for the merchant
behind its destination node (so the node can prove consistency from exactly there); a node
the platform has not identified yet in this server process is first asked ``query.witness``
(one small exchange per node and process: node ids change across restarts, merchants do
not). On the way back each reply is judged by :class:`fedretain.server.witness.WitnessStore`;
a refused reply is replaced by an error reply ("witness refused merchant ...") so every
caller — the round loop, the SecAgg+ workflow, the standardisation query — leaves it out
like a failed node, and the refusal is written to the run record as an alert.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.serverapp import Grid

from fedretain.compat.flower import error_in_place_of
from fedretain.consent.witness_record import (
    SEEN_RECORD,
    WITNESS_ACTION,
    WITNESS_RECORD,
    WitnessFormatError,
    decode,
)
from fedretain.server.polling import poll_interval
from fedretain.server.run_record import RunRecord
from fedretain.server.witness import WitnessStore, judge, witness_db_path

log = logging.getLogger("fedretain.server.witness")

WITNESS_REFUSED = 4901  # error code of a reply the witness replaced
_POLL_S = 0.1
FLUSH_S = 5.0  # while an exchange still has replies pending


class Witness:
    """Per server process: which node speaks for which merchant, and the judgement of replies."""

    def __init__(self, store: WitnessStore, run_id: str, out_dir: str | Path) -> None:
        self.store, self.run_id, self.out_dir = store, run_id, Path(out_dir)
        self.merchant_of: dict[int, str] = {}
        self._impostors: set[int] = set()  # claimed a merchant whose pinned key they do not hold
        self._recorded: set[tuple[str, str, int, str]] = set()  # heads in the run record (its object below)
        self._record_seen: RunRecord | None = None
        self._unsaved: RunRecord | None = None  # heads added to it, file not yet rewritten (see check/flush)
        self._flushed = 0.0

    def seen_record(self, node_id: int) -> ConfigRecord | None:
        merchant = self.merchant_of.get(node_id)
        if merchant is None:
            return None
        return ConfigRecord({} if node_id in self._impostors else self.store.seen(merchant))

    def learn(self, reply: Message) -> None:
        """Map the node behind a ``query.witness`` reply to its merchant (nothing is accepted yet).

        The merchant's witnessed sizes are sent to that node only if its heads are signed by the
        merchant's pinned key; a node that merely claims the id gets none (and is refused later).
        """
        if reply.has_error() or WITNESS_RECORD not in reply.content.config_records:
            return
        try:
            report = decode(reply.content.config_records[WITNESS_RECORD])
        except WitnessFormatError:
            return
        node_id = int(reply.metadata.src_node_id)
        self.merchant_of[node_id] = report.merchant_id
        merchant = report.merchant_id
        if any(judge(merchant, kind, claim, self.store.pin(merchant, kind), None)
               for kind, claim in report.claims.items()):
            self._impostors.add(node_id)
        else:
            self._impostors.discard(node_id)

    def _record(self) -> RunRecord | None:
        """The active run record; the first time (or after a resume) the heads it lists are noted once,
        instead of listing them again for every reply (quadratic in a large federation)."""
        record = RunRecord.active(self.out_dir)
        if record is not None and record is not self._record_seen:
            self._record_seen = record
            self._recorded |= {(h.get("merchant"), h.get("kind"), h.get("size"), h.get("root"))
                               for h in record.data.get("witness", {}).get("heads", [])}
        return record

    def flush(self, every: float = 0.0) -> None:
        """Write the run record once for the heads that :meth:`check` added with ``save=False``;
        with ``every``, only if the last write is that many seconds old (the run loop saves the record
        after every exchange anyway, and the witness store has each head committed already)."""
        if self._unsaved is None or time.monotonic() - self._flushed < every:
            return
        record, self._unsaved = self._unsaved, None
        record.save()
        self._flushed = time.monotonic()

    def check(self, reply: Message, server_round: int = 0, save: bool = True) -> Message:
        """The reply itself if its ledgers extend what was witnessed, else an error reply naming why.

        Each head is committed to the witness store before this returns; with ``save=False`` the run
        record's copy of new heads is written by the caller's :meth:`flush` (once per pull of replies).
        """
        if reply.has_error():
            return reply
        node_id = int(reply.metadata.src_node_id)
        merchant = self.merchant_of.get(node_id, f"node-{node_id}")
        try:
            if WITNESS_RECORD not in reply.content.config_records:
                raise WitnessFormatError("the reply carries no witness record (signed ledger heads)")
            report = decode(reply.content.config_records[WITNESS_RECORD])
            merchant = report.merchant_id
            self.merchant_of[node_id] = merchant
            refused, accepted = self.store.witness(merchant, report.claims, self.run_id)
        except WitnessFormatError as exc:
            refused, accepted = {"witness": str(exc)}, []
        record = self._record()
        for head in accepted:  # each distinct head once per run, with the round it was first seen in
            key = (merchant, head.kind, head.size, head.root)
            if record is None or key in self._recorded:  # (a resumed run's record lists its heads already)
                continue
            self._recorded.add(key)
            record.witnessed({"merchant": merchant, "round": server_round, "node_id": node_id, **head.to_dict()},
                             save=False)
            self._unsaved = record
        if save:
            self.flush()
        if not refused:
            return reply
        reason = "; ".join(f"{kind}: {why}" for kind, why in sorted(refused.items()))
        log.error("ALERT witness refused merchant %s (node %d): %s", merchant, node_id, reason)
        if record is not None:
            record.alert("witness", merchant=merchant, node_id=node_id, round=server_round,
                         message_type=reply.metadata.message_type, ledgers=sorted(refused), reason=reason)
        return error_in_place_of(reply, Error(WITNESS_REFUSED, f"witness refused merchant {merchant}: {reason}"))


def _round_of(msg: Message) -> int:
    """The server round an instruction belongs to (``server-round`` in any of its configs, else the
    group id Flower's workflows set to the round, as in SecAgg+ stages), else 0."""
    for rec in msg.content.config_records.values():
        value = rec.get("server-round")
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    group = msg.metadata.group_id
    return int(group) if group.isdigit() else 0


class WitnessedGrid(Grid):
    """A ``Grid`` that stamps instructions with ``witness-seen`` and judges every reply (see module doc)."""

    def __init__(self, inner: Grid, witness: Witness, identify_timeout: float) -> None:
        self.inner, self.witness, self.identify_timeout = inner, witness, identify_timeout
        self._round: dict[str, int] = {}

    # -- plain delegation ------------------------------------------------------------------
    def set_run(self, run: Any) -> None:  # flwr's Run (not a public name in 1.42)
        self.inner.set_run(run)

    @property
    def run(self) -> Any:
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def __getattr__(self, name: str) -> Any:  # e.g. get_nodes() of a concrete grid
        return getattr(self.inner, name)

    # -- witnessed exchange ------------------------------------------------------------------
    def _identify(self, node_ids: set[int]) -> None:
        unknown = sorted(n for n in node_ids if n not in self.witness.merchant_of)
        if not unknown:
            return
        asks = [Message(RecordDict({}), dst_node_id=n, message_type=f"query.{WITNESS_ACTION}") for n in unknown]
        pending = set(self.inner.push_messages(asks))  # polled as below, not at Flower's fixed 0.1 s
        end = time.monotonic() + self.identify_timeout
        while pending:
            for reply in self.inner.pull_messages(pending):
                pending.discard(reply.metadata.reply_to_message_id)
                self.witness.learn(reply)
            if not pending or time.monotonic() >= end:
                break
            time.sleep(poll_interval(len(pending), _POLL_S, end - time.monotonic()))

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self._identify({int(m.metadata.dst_node_id) for m in messages})
        for m in messages:
            seen = self.witness.seen_record(int(m.metadata.dst_node_id))
            if seen is not None:  # a copy: instructions of one exchange often share one RecordDict
                m.content = RecordDict({**dict(m.content), SEEN_RECORD: seen})
        ids = list(self.inner.push_messages(messages))
        for m in messages:
            if m.metadata.message_id:
                self._round[m.metadata.message_id] = _round_of(m)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = []
        try:
            for reply in self.inner.pull_messages(message_ids):
                rnd = self._round.pop(reply.metadata.reply_to_message_id, 0)
                out.append(self.witness.check(reply, rnd, save=False))
        finally:  # the run record rewritten at most every FLUSH_S while replies come in, not once per reply
            self.witness.flush(FLUSH_S if self._round else 0.0)
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        pending = set(self.push_messages(messages))
        end = time.monotonic() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while pending:
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending -= {r.metadata.reply_to_message_id for r in got}
            if not pending or (timeout is not None and time.monotonic() >= end):
                break
            time.sleep(poll_interval(len(pending), _POLL_S, end - time.monotonic() if timeout is not None else None))
        return replies


def witnessed(grid: Grid, settings: Any) -> WitnessedGrid:
    """Wrap a ServerApp's grid with the platform's witness (``settings``: a ``RunSettings``)."""
    if isinstance(grid, WitnessedGrid):
        return grid
    path = witness_db_path(settings.out_dir, str(settings.extra.get("witness-db", "") or ""))
    witness = Witness(WitnessStore(path), settings.run_id, settings.out_dir)
    return WitnessedGrid(grid, witness, float(settings.round_timeout))
