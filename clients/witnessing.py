"""A node's side of ledger witnessing: every reply carries its ledgers' signed heads.

:func:`witness_mod` is a Flower mod on the node's ClientApps: after any handler (train,
evaluate, every ``query.*``, the SecAgg+ stages) it adds the ``witness`` record
(``fedretain.consent.witness_record``) to the reply: per ledger kind the latest signed
tree head, the node's public key and an RFC 9162 consistency proof from the size the
platform last witnessed (sent in the instruction's ``witness-seen`` record). The platform
checks the proof against the head it stored, so a ledger that shrank, forked or changed
key since is refused there (``fedretain.server.witness``).

The privacy-budget ledger is witnessed the same way as soon as its class offers the same
interface (``head()`` and ``consistency_proof(old, new)``). The record is built from the
ledger files only: it never reads silo events and never fails the reply; a ledger the node
cannot read is reported as ``K-error`` and the platform refuses the merchant.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedretain.clients.node import NodeConfig
from fedretain.consent import signing
from fedretain.consent.merkle import Frontier, consistency_proof, leaf_hash
from fedretain.consent.witness_record import (
    SEEN_RECORD,
    WITNESS_ACTION,
    WITNESS_RECORD,
    HeadClaim,
    SignedHead,
    encode,
)

log = logging.getLogger("fedretain.node")

_PROOF_CACHE_SIZE = 64


def _seen(msg: Message) -> dict[str, int]:
    """Tree sizes the platform last witnessed for this merchant (kind -> size), from the instruction."""
    if not msg.has_content() or SEEN_RECORD not in msg.content.config_records:
        return {}
    out: dict[str, int] = {}
    for kind, size in msg.content.config_records[SEEN_RECORD].items():
        if isinstance(size, int) and not isinstance(size, bool):
            out[str(kind)] = int(size)
    return out


@contextmanager
def _consent_ledger(config: NodeConfig) -> Iterator[Any]:
    from fedretain.consent.ledger import ConsentLedger

    if not config.consent_db.is_file():
        raise FileNotFoundError(f"no consent ledger at {config.consent_db}")
    with ConsentLedger.open(config.consent_db) as ledger:
        yield ledger


@contextmanager
def _budget_ledger(config: NodeConfig) -> Iterator[Any]:
    from fedretain.privacy.budget import BudgetLedger, ledger_path

    with BudgetLedger.open(ledger_path(config.state_dir)) as ledger:
        yield ledger


def _budget_witnessable(config: NodeConfig) -> bool:
    """The budget ledger is witnessed once it has signed heads (``head``) and the node has one."""
    try:
        from fedretain.privacy.budget import BudgetLedger, ledger_path
    except ImportError:
        return False
    return callable(getattr(BudgetLedger, "head", None)) and ledger_path(config.state_dir).is_file()


_PROOFS: OrderedDict[tuple[str, str, int, int, str], tuple[str, ...]] = OrderedDict()


def _proof(ledger: Any, path: Path, kind: str, old: int, head: SignedHead) -> tuple[str, ...]:
    """A consistency proof, cached per process: it is a pure function of the first ``head.size``
    leaves, which ``head.root`` pins, so a node answering several messages computes it once."""
    key = (str(path), kind, old, head.size, head.root)
    if key in _PROOFS:
        _PROOFS.move_to_end(key)
        return _PROOFS[key]
    fast = _consent_proof(ledger, old, head.size) if kind == "consent" else None
    proof = fast if fast is not None else tuple(str(p) for p in ledger.consistency_proof(old, head.size))
    _PROOFS[key] = proof
    while len(_PROOFS) > _PROOF_CACHE_SIZE:
        _PROOFS.popitem(last=False)
    return proof


def _consent_proof(ledger: Any, old: int, new: int) -> tuple[str, ...] | None:
    """RFC 9162 consistency proof from the signed head's frontier at ``old`` and the leaves after it.

    Every node a proof takes from the first ``old`` leaves is one of the perfect subtrees of
    ``old`` — the frontier the ledger stored with its head of that size — so only the records
    appended since are read (``ConsentLedger.consistency_proof`` hashes every leaf). None when
    no head of size ``old`` is stored (then the full computation is used).
    """
    row = ledger.connection.execute("SELECT frontier FROM heads WHERE size = ? ORDER BY head_id DESC LIMIT 1",
                                    (old,)).fetchone()
    if row is None:
        return None
    try:
        frontier = Frontier.from_bytes(old, bytes(row[0]))
    except ValueError:
        return None
    starts: dict[tuple[int, int], bytes] = {}
    at = 0
    for h in range(old.bit_length() - 1, -1, -1):
        if old >> h & 1:
            starts[(at, at + (1 << h))] = frontier.nodes[len(starts)]
            at += 1 << h
    texts = ledger.connection.execute("SELECT canonical FROM records WHERE seq > ? AND seq <= ? ORDER BY seq",
                                      (old, new)).fetchall()
    if len(texts) != new - old:
        return None
    leaves = [leaf_hash(t if isinstance(t, bytes) else t.encode("utf-8")) for (t,) in texts]

    try:
        return tuple(p.hex() for p in consistency_proof(_FrontierLeaves(starts, old, leaves), old, new))
    except ValueError:
        return None


class _FrontierLeaves(Sequence[bytes]):
    """Leaf hashes as ``merkle.consistency_proof`` reads them (length and ``[lo:hi]`` slices only).

    A slice that is one of the old size's perfect subtrees yields its stored root as a
    one-element list (the Merkle root of one hash is that hash); a slice of appended leaves
    yields those leaves. Any other slice would need old leaves: ValueError (not expected).
    """

    def __init__(self, subtrees: dict[tuple[int, int], bytes], old: int, appended: list[bytes]) -> None:
        self.subtrees, self.old, self.appended = subtrees, old, appended

    def __len__(self) -> int:
        return self.old + len(self.appended)

    def __getitem__(self, index: Any) -> Any:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise ValueError("only contiguous slices of the leaves are available")
        lo, hi, _ = index.indices(len(self))
        if (lo, hi) in self.subtrees:
            return [self.subtrees[(lo, hi)]]
        if lo < self.old:
            raise ValueError(f"leaves [{lo}, {hi}) are not a perfect subtree of the first {self.old}")
        return self.appended[lo - self.old : hi - self.old]


def _public_key_pem(ledger: Any) -> str:
    pem = getattr(ledger, "public_key_pem", None)
    if isinstance(pem, str) and pem:
        return pem
    return signing.public_key_pem(ledger.public_key)


def claim(config: NodeConfig, kind: str, seen: int | None) -> HeadClaim:
    """The node's head for ``kind`` and a proof from ``seen`` (when the platform gave one it can prove)."""
    try:
        with _OPENERS[kind](config) as ledger:
            head = SignedHead.of(kind, ledger.head())
            pem = _public_key_pem(ledger)
            if seen is None or not 0 <= seen <= head.size:  # nothing asked, or a shrunk ledger: no proof
                return HeadClaim(head, pem)
            proof = _proof(ledger, _path_of(config, kind), kind, seen, head) if 0 < seen < head.size else ()
            return HeadClaim(head, pem, seen, proof)
    except Exception as exc:  # noqa: BLE001 - reported, never raised: the platform refuses a merchant without a head
        log.warning("witness: cannot read the %s ledger's head: %s", kind, exc)
        return HeadClaim(None, error=f"{type(exc).__name__}: {exc}")


def _path_of(config: NodeConfig, kind: str) -> Path:
    if kind == "consent":
        return config.consent_db
    from fedretain.privacy.budget import ledger_path

    return ledger_path(config.state_dir)


_OPENERS: dict[str, Callable[[NodeConfig], Any]] = {"consent": _consent_ledger, "budget": _budget_ledger}


def merchant_id(config: NodeConfig) -> str:
    """The merchant id from ``merchant.json`` (what the silo declares; no events are read)."""
    from fedretain.ingest import read_merchant

    return str(read_merchant(config.data_path / "merchant.json")["merchant_id"])


def witness_values(config: NodeConfig, seen: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The ``witness`` record's values for this node (see ``fedretain.consent.witness_record``)."""
    seen = dict(seen or {})
    kinds = ["consent"] + (["budget"] if _budget_witnessable(config) or "budget" in seen else [])
    try:
        merchant = merchant_id(config)
    except Exception:  # noqa: BLE001 - the platform identifies the merchant by the ledger's controller then
        merchant = ""
    claims = {kind: claim(config, kind, seen.get(kind)) for kind in kinds}
    if not merchant:
        merchant = next((c.head.controller for c in claims.values() if c.head is not None), config.data_path.name)
    return encode(merchant, claims)


def witness_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower mod: add the ``witness`` record to every successful reply of this node."""
    reply = call_next(msg, context)
    if reply.has_error() or not reply.has_content():
        return reply
    try:
        config = NodeConfig.from_flower(dict(context.node_config), dict(context.run_config))
    except Exception as exc:  # noqa: BLE001 - no data configured: the handler has failed already
        log.warning("witness: no node configuration (%s)", exc)
        return reply
    reply.content[WITNESS_RECORD] = ConfigRecord(witness_values(config, _seen(msg)))
    return reply


def witness_query(msg: Message, context: Context) -> Message:
    """``query.witness``: nothing but the witness record (which the mod adds) — tells the platform who answers."""
    return Message(RecordDict({}), reply_to=msg)


def install(app: ClientApp) -> None:
    """Register ``query.witness`` on ``app`` (the app must be built with ``mods=[witness_mod]``)."""
    app.query(WITNESS_ACTION)(witness_query)
