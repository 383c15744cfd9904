"""Signed heads: the checkpoint a node signs over its ledger's size and RFC 9162 Merkle root."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import signing
from .merkle import Frontier
from .store import FORMAT

__all__ = ["LedgerHead", "checkpoint_text", "write_head"]


def checkpoint_text(controller: str, size: int, root_hex: str, timestamp: str) -> bytes:
    """The exact bytes a signed head signs (one field per line, no trailing newline)."""
    return f"{FORMAT}\n{controller}\n{size}\n{root_hex}\n{timestamp}".encode()


@dataclass(frozen=True)
class LedgerHead:
    """A signed checkpoint: the ledger's size and RFC 9162 root at a moment, signed by the node."""

    size: int
    root_hex: str
    signature: str  # hex Ed25519 signature over checkpoint_text(...)
    timestamp: str
    controller: str
    key_fingerprint: str

    def checkpoint(self) -> bytes:
        return checkpoint_text(self.controller, self.size, self.root_hex, self.timestamp)

    def verify(self, public_key: Ed25519PublicKey) -> bool:
        """Is this head signed by ``public_key``? (For servers holding the node's public key.)"""
        return signing.verify_hex_signature(public_key, self.signature, self.checkpoint())

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "root_hex": self.root_hex, "signature": self.signature,
                "timestamp": self.timestamp, "controller": self.controller,
                "key_fingerprint": self.key_fingerprint}


def write_head(conn: sqlite3.Connection, key: Ed25519PrivateKey, controller: str, frontier: Frontier,
                timestamp: str) -> LedgerHead:
    """Sign ``frontier``'s root as the ledger's new head and store it (inside the caller's transaction)."""
    root_hex = frontier.root().hex()
    sig = signing.sign(key, checkpoint_text(controller, frontier.size, root_hex, timestamp)).hex()
    fp = signing.fingerprint(key)
    conn.execute("INSERT INTO heads (size, root_hex, timestamp, signature_hex, key_fingerprint, frontier) "
                 "VALUES (?,?,?,?,?,?)", (frontier.size, root_hex, timestamp, sig, fp, frontier.to_bytes()))
    return LedgerHead(frontier.size, root_hex, sig, timestamp, controller, fp)

