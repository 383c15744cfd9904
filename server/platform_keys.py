"""Which merchant a platform node is: the names of registered node-auth keys.

``flwr supernode ls`` lists bare node ids (its owner is ``none`` without Flower's account
plugin), so ``server status`` keeps, per node id, the registered key's name and
fingerprint, and adds the merchant id each node reported in the run record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CONNECTION = "fedretain"


def register_args(key: Path) -> list[str]:
    """``flwr supernode register`` arguments for one key file (an absolute path: flwr runs in the state folder)."""
    key = Path(key).expanduser().resolve()
    return ["supernode", "register", str(key), CONNECTION, "--name", key.name.removesuffix(".pub"), "--format", "json"]


def key_name(key: Path) -> str:
    """The merchant name shown for a key: the ``.pub`` file's comment if it names one, else the file stem."""
    try:
        parts = Path(key).read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        parts = []
    comment = parts[2] if len(parts) > 2 else ""
    generic = ("", "fedretain-node", "fedretain-platform-node-auth")
    return Path(key).name.removesuffix(".pub") if comment in generic else comment


def node_merchant(node: dict[str, Any], node_keys: dict[str, Any], merchants: dict[str, Any]) -> str:
    """Which merchant a SuperLink node is: its registered key's name, else the merchant id it reported."""
    node_id = str(node.get("node-id"))
    known = node_keys.get(node_id) or {}
    reported = sorted(m for m, info in merchants.items() if str((info or {}).get("node_id")) == node_id)
    parts = []
    if known.get("name"):
        parts.append(f"key {known['name']} ({known.get('fingerprint', '')})")
    if reported:
        parts.append(f"merchant {', '.join(reported)}")
    owner = node.get("owner-name")
    if not parts and owner and owner != "none":
        parts.append(str(owner))
    return "; ".join(parts) or "unknown key (registered outside `fedretain server`)"


__all__ = ["key_name", "node_merchant", "register_args"]
