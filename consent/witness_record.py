"""The wire format of ledger witnessing: the ``witness`` record a node puts in every reply.

Certificate-transparency style: each reply carries, per ledger kind (``consent``, and the
privacy-budget ledger ``budget`` once it has signed heads), the ledger's latest signed
tree head and an RFC 9162 consistency proof from the size the platform says it last
witnessed (the ``witness-seen`` record of the instruction). Everything here is public by
declaration: a merchant id, signed heads (size, Merkle root, signature, timestamp), the
node's public key and Merkle-node hashes — no user id and nothing derived from one user.

Kept free of Flower and of server code, so the node, the platform and the officer's check
share one definition. Keys of the ``witness`` record (``K`` = a ledger kind):

* ``merchant-id`` (str), ``kinds`` (list of str: the kinds present);
* ``K-format``, ``K-controller``, ``K-size``, ``K-root``, ``K-signature``, ``K-timestamp``,
  ``K-key-fingerprint``, ``K-public-key`` (the signed head and the PEM of its key);
* ``K-proof-from`` (int, ``-1`` = no proof asked for) and ``K-proof`` (list of hex hashes);
* ``K-error`` (str) instead of the head fields when the node could not read the ledger.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from . import signing

__all__ = [
    "HEAD_FIELDS",
    "KINDS",
    "SEEN_RECORD",
    "WITNESS_ACTION",
    "WITNESS_RECORD",
    "HeadClaim",
    "SignedHead",
    "WitnessFormatError",
    "WitnessReport",
    "decode",
    "encode",
    "record_keys",
]

WITNESS_RECORD = "witness"  # reply record
SEEN_RECORD = "witness-seen"  # instruction record: kind -> tree size the platform last witnessed
WITNESS_ACTION = "witness"  # ``query.witness``: a reply with the witness record only (who is this node?)
KINDS = ("consent", "budget")
HEAD_FIELDS = ("format", "controller", "size", "root", "signature", "timestamp", "key-fingerprint", "public-key",
               "proof-from", "proof")
NO_PROOF = -1


class WitnessFormatError(ValueError):
    """A witness record is missing or malformed; the message names the key."""


@dataclass(frozen=True)
class SignedHead:
    """A signed tree head of one ledger, as the platform records it (all public)."""

    kind: str
    format: str  # first line of the signed checkpoint (e.g. fedretain-consent-ledger/v1)
    controller: str
    size: int
    root: str  # hex RFC 9162 root
    signature: str  # hex Ed25519 signature over checkpoint()
    timestamp: str
    key_fingerprint: str

    def checkpoint(self) -> bytes:
        """The signed bytes: same layout as ``consent.ledger.checkpoint_text``."""
        return f"{self.format}\n{self.controller}\n{self.size}\n{self.root}\n{self.timestamp}".encode()

    def verify(self, public_key: Ed25519PublicKey) -> bool:
        return signing.verify_hex_signature(public_key, self.signature, self.checkpoint())

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "format": self.format, "controller": self.controller, "size": self.size,
                "root": self.root, "signature": self.signature, "timestamp": self.timestamp,
                "key_fingerprint": self.key_fingerprint}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], kind: str = "consent") -> SignedHead:
        """From :meth:`to_dict` output (``root_hex`` accepted for ``root``, as ``LedgerHead.to_dict`` writes)."""
        try:
            return cls(kind=str(d.get("kind", kind)), format=str(d.get("format", "")),
                       controller=str(d.get("controller", "")), size=int(d["size"]),
                       root=str(d.get("root", d.get("root_hex", ""))), signature=str(d.get("signature", "")),
                       timestamp=str(d.get("timestamp", "")), key_fingerprint=str(d.get("key_fingerprint", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise WitnessFormatError(f"witnessed head {dict(d)!r}: {exc}") from None

    @classmethod
    def of(cls, kind: str, head: Any) -> SignedHead:
        """From a ledger's head object (``LedgerHead`` or the same interface): size, root_hex, signature,
        timestamp, controller, key_fingerprint and ``checkpoint()`` (the exact signed bytes)."""
        signed = bytes(head.checkpoint())
        fmt = signed.split(b"\n", 1)[0].decode()
        out = cls(kind, fmt, str(head.controller), int(head.size), str(head.root_hex), str(head.signature),
                  str(head.timestamp), str(head.key_fingerprint))
        if out.checkpoint() != signed:
            raise WitnessFormatError(f"the {kind} ledger signs its heads in a layout the witness does not know")
        return out


@dataclass(frozen=True)
class HeadClaim:
    """What a node claims for one ledger kind: its head, its key, and a consistency proof."""

    head: SignedHead | None
    public_key_pem: str = ""
    proof_from: int = NO_PROOF
    proof: tuple[str, ...] = ()
    error: str = ""  # the node could not produce a head (then ``head`` is None)


@dataclass
class WitnessReport:
    """A decoded witness record: the merchant and one claim per kind present."""

    merchant_id: str
    claims: dict[str, HeadClaim] = field(default_factory=dict)


def encode(merchant_id: str, claims: Mapping[str, HeadClaim]) -> dict[str, Any]:
    """The ``witness`` record's values (str/int/list only: a Flower ``ConfigRecord`` takes them as is)."""
    out: dict[str, Any] = {"merchant-id": str(merchant_id), "kinds": [k for k in claims]}
    for kind, c in claims.items():
        if c.head is None:
            out[f"{kind}-error"] = c.error or "no signed head"
            continue
        h = c.head
        out.update({f"{kind}-format": h.format, f"{kind}-controller": h.controller, f"{kind}-size": int(h.size),
                    f"{kind}-root": h.root, f"{kind}-signature": h.signature, f"{kind}-timestamp": h.timestamp,
                    f"{kind}-key-fingerprint": h.key_fingerprint, f"{kind}-public-key": c.public_key_pem,
                    f"{kind}-proof-from": int(c.proof_from), f"{kind}-proof": [str(p) for p in c.proof]})
    return out


def decode(record: Mapping[str, Any]) -> WitnessReport:
    """Parse a ``witness`` record; :class:`WitnessFormatError` names the bad key."""

    def get(key: str, typ: type) -> Any:
        if key not in record:
            raise WitnessFormatError(f"witness record: key {key!r} missing")
        value = record[key]
        if typ is int and isinstance(value, bool) or not isinstance(value, typ):
            raise WitnessFormatError(f"witness record: key {key!r} is not {typ.__name__}")
        return value

    merchant = get("merchant-id", str)
    kinds = get("kinds", list)
    report = WitnessReport(merchant)
    for kind in kinds:
        kind = str(kind)
        if kind in report.claims or "-" in kind or not kind:
            raise WitnessFormatError(f"witness record: bad or repeated ledger kind {kind!r}")
        if f"{kind}-error" in record:
            report.claims[kind] = HeadClaim(None, error=str(record[f"{kind}-error"]))
            continue
        head = SignedHead(kind, get(f"{kind}-format", str), get(f"{kind}-controller", str), get(f"{kind}-size", int),
                          get(f"{kind}-root", str), get(f"{kind}-signature", str), get(f"{kind}-timestamp", str),
                          get(f"{kind}-key-fingerprint", str))
        proof = get(f"{kind}-proof", list)
        if not all(isinstance(p, str) for p in proof):
            raise WitnessFormatError(f"witness record: key {kind + '-proof'!r} holds non-text hashes")
        report.claims[kind] = HeadClaim(head, get(f"{kind}-public-key", str), get(f"{kind}-proof-from", int),
                                        tuple(proof))
    return report


def record_keys(kinds: Sequence[str] = KINDS) -> list[str]:
    """Every key a ``witness`` record can carry, for the egress manifest (all public by declaration)."""
    return ["merchant-id", "kinds"] + [f"{k}-{f}" for k in kinds for f in (*HEAD_FIELDS, "error")]
