"""The node's pinned identity: which Ed25519 key a node's consent ledger must be signed with.

Why: a ledger carries its own public key in ``meta``; verifying a ledger against the key it
declares about itself only shows it is self-consistent, so a ledger rebuilt under another
key (same merchant id, a forged grant) would pass. The node therefore pins its key once, at
provisioning, in ``STATE_DIR/node.json`` (merchant id, fingerprint, public PEM) and trusts a
ledger only if its key is that pinned key (:func:`check_pinned`; the signatures are then
checked against the pinned key, never the declared one).

Pinning an *existing* ledger is a deliberate act (``fedretain consent pin --silo SILO``) that
prints the fingerprint it pins: nothing pins a ledger silently. This module only knows the
file layout of a node state folder; it does not import the node (``fedretain.clients``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import signing

__all__ = ["NODE_DIR", "LEDGER_FILE", "KEY_FILE", "PIN_FILE", "PIN_FORMAT", "PinError", "NodePin", "SiloPaths",
           "silo_paths", "pin_path", "load_pin", "write_pin", "require_pin", "pin_command"]

NODE_DIR = ".node"  # per-silo folder for the node's own state (ledger, keys, budget, pin)
LEDGER_FILE = "consent.db"
KEY_FILE = "node_key.pem"
PIN_FILE = "node.json"
PIN_FORMAT = "fedretain-node/v1"


class PinError(Exception):
    """The node's pinned key is missing, unreadable, or does not match a ledger; the message says what to do."""


@dataclass(frozen=True)
class SiloPaths:
    """Where a silo's node keeps its state (the default layout written by provisioning)."""

    silo: Path
    state_dir: Path
    consent_db: Path
    node_key: Path
    pin: Path


def silo_paths(silo: str | os.PathLike[str], state_dir: str | os.PathLike[str] | None = None) -> SiloPaths:
    silo = Path(silo)
    state = Path(state_dir) if state_dir else silo / NODE_DIR
    return SiloPaths(silo, state, state / LEDGER_FILE, state / KEY_FILE, state / PIN_FILE)


def pin_path(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / PIN_FILE


def pin_command(state_dir: str | os.PathLike[str]) -> str:
    """The command an operator runs to pin deliberately (names the silo when the layout is the default)."""
    state = Path(state_dir)
    if state.name == NODE_DIR:
        return f"fedretain consent pin --silo {state.parent}"
    return f"fedretain consent pin --state-dir {state}"


@dataclass(frozen=True)
class NodePin:
    """The pinned node identity read from ``node.json``."""

    merchant_id: str
    key_fingerprint: str
    public_key_pem: str
    pinned_at: str
    path: Path

    @property
    def public_key(self) -> Ed25519PublicKey:
        return signing.load_public_key(self.public_key_pem)

    def to_dict(self) -> dict[str, Any]:
        return {"format": PIN_FORMAT, "merchant_id": self.merchant_id, "key_fingerprint": self.key_fingerprint,
                "public_key_pem": self.public_key_pem, "pinned_at": self.pinned_at}


def load_pin(state_dir: str | os.PathLike[str]) -> NodePin | None:
    """The pin in ``state_dir`` (None if there is none); a damaged pin raises :class:`PinError`."""
    path = pin_path(state_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PinError(f"the node pin {path} cannot be read ({exc}); restore it from a backup or re-pin "
                       f"deliberately with `{pin_command(path.parent)}`") from None
    if not isinstance(data, dict) or data.get("format") != PIN_FORMAT:
        raise PinError(f"{path} is not a {PIN_FORMAT} node pin")
    try:
        pin = NodePin(str(data["merchant_id"]), str(data["key_fingerprint"]), str(data["public_key_pem"]),
                      str(data.get("pinned_at", "")), path)
        actual = signing.fingerprint(pin.public_key)
    except (KeyError, signing.KeyFileError) as exc:
        raise PinError(f"the node pin {path} is damaged (field {exc}); restore it from a backup") from None
    if actual != pin.key_fingerprint:
        raise PinError(f"the node pin {path} is inconsistent: its public key is {actual}, its fingerprint field "
                       f"says {pin.key_fingerprint}")
    return pin


def write_pin(state_dir: str | os.PathLike[str], merchant_id: str,
              key: Ed25519PrivateKey | Ed25519PublicKey, *, replace: bool = False) -> NodePin:
    """Pin ``key`` as the node's ledger key; atomic (temp file, fsync, rename). Never replaces a pin unless asked."""
    path = pin_path(state_dir)
    if path.exists() and not replace:
        raise PinError(f"{path} already pins this node's key; refusing to replace it")
    pin = NodePin(merchant_id, signing.fingerprint(key), signing.public_key_pem(key),
                  datetime.now(timezone.utc).isoformat(timespec="seconds"), path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        json.dump(pin.to_dict(), fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return pin


def require_pin(state_dir: str | os.PathLike[str], ledger_path: str | os.PathLike[str]) -> NodePin:
    """The node's pin, or a :class:`PinError` saying how to pin (fail closed: no pin, no trust)."""
    pin = load_pin(state_dir)
    if pin is None:
        raise PinError(
            f"consent ledger {ledger_path}: this node has no pinned key ({pin_path(state_dir)} is missing), so "
            f"nothing says which key its ledger must be signed with; refusing to use any data. Check the ledger's "
            f"key fingerprint with the merchant, then pin it deliberately: `{pin_command(state_dir)}`")
    return pin


def check_pinned(ledger_path: str | os.PathLike[str], declared_fingerprint: str, controller: str,
                 pin: NodePin) -> None:
    """Refuse a ledger whose key or merchant is not the pinned one (names the file and both fingerprints)."""
    if declared_fingerprint != pin.key_fingerprint:
        raise PinError(
            f"consent ledger {ledger_path} is signed with key {declared_fingerprint}, but this node's pinned key "
            f"({pin.path}) is {pin.key_fingerprint}: the ledger was replaced or re-keyed; refusing it. Restore "
            f"the node's own ledger from a backup")
    if controller != pin.merchant_id:
        raise PinError(f"consent ledger {ledger_path} belongs to merchant {controller!r}, but this node is pinned "
                       f"to merchant {pin.merchant_id!r} ({pin.path}); refusing it")
