"""The officer's check of a ledger file against the heads the platform witnessed.

The platform records every signed head it accepted from a merchant (``witness.heads`` in
each ``run.json``, and the ``heads`` table of its ``witness.db``). A ledger file is
consistent with that record when each witnessed head describes a prefix of the file: the
RFC 9162 root of its first ``size`` records equals the witnessed root, and the head is
signed by the ledger's key. A file that lost records (truncation, an older copy restored),
holds another history (a fork) or is signed by another key fails, naming the head.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .merkle import EMPTY_ROOT, Frontier
from .witness_record import SignedHead, WitnessFormatError

__all__ = ["AgainstResult", "check_against", "check_file", "load_witnessed_heads"]

_SQLITE_MAGIC = b"SQLite format 3\x00"


@dataclass
class AgainstResult:
    """Outcome of checking one ledger against witnessed heads."""

    merchant: str
    source: str
    checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.checked > 0 and not self.problems

    def describe(self) -> str:
        if self.ok:
            return (f"witness OK: the ledger is consistent with all {self.checked} head(s) the platform witnessed "
                    f"for {self.merchant} ({self.source})")
        if not self.checked and not self.problems:
            return f"witness FAILED: {self.source} holds no witnessed consent head for merchant {self.merchant!r}"
        return (f"witness FAILED: {len(self.problems)} of {self.checked} witnessed head(s) for {self.merchant} "
                f"({self.source}) do not match this ledger:\n" + "\n".join(f"  - {p}" for p in self.problems))

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "merchant": self.merchant, "source": self.source, "checked": self.checked,
                "problems": list(self.problems)}


def load_witnessed_heads(path: str | Path, merchant: str, kind: str = "consent") -> list[SignedHead]:
    """The heads the platform witnessed for ``merchant``'s ledger of ``kind``: from a run record
    (``run.json``) or from the platform's witness store (``witness.db``)."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            magic = fh.read(len(_SQLITE_MAGIC))
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    if magic == _SQLITE_MAGIC:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = conn.execute("SELECT size, root, signature, timestamp, controller, format, key_fingerprint "
                                "FROM heads WHERE merchant = ? AND kind = ? ORDER BY head_id",
                                (merchant, kind)).fetchall()
        except sqlite3.DatabaseError as exc:
            raise ValueError(f"{path} is not a fedretain witness store ({exc})") from None
        finally:
            conn.close()
        return [SignedHead(kind, r[5], r[4], int(r[0]), r[1], r[2], r[3], r[6]) for r in rows]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is neither a run record (JSON) nor a witness store (SQLite): {exc}") from None
    heads = data.get("witness", {}).get("heads", []) if isinstance(data, dict) else []
    out = []
    for i, h in enumerate(heads):
        if not isinstance(h, Mapping) or h.get("merchant") != merchant or h.get("kind", "consent") != kind:
            continue
        try:
            out.append(SignedHead.from_dict(h, kind))
        except WitnessFormatError as exc:
            raise ValueError(f"{path}: witness.heads[{i}]: {exc}") from None
    return out


def check_against(ledger: Any, heads: Iterable[SignedHead | Mapping[str, Any]], source: str = "",
                  public_key: Ed25519PublicKey | None = None) -> AgainstResult:
    """Is every witnessed head a signed prefix of ``ledger`` (a ``ConsentLedger``)? One pass over its leaves."""
    result = AgainstResult(ledger.controller, source or "witnessed heads")
    key = public_key if public_key is not None else ledger.public_key
    wanted = sorted({(h.size, h.root, h.signature, h.timestamp, h.format, h.controller, h.key_fingerprint): h
                     for h in (x if isinstance(x, SignedHead) else SignedHead.from_dict(x) for x in heads)}.values(),
                    key=lambda h: h.size)
    leaves = ledger.leaf_hashes()
    frontier, done = Frontier(), 0
    for head in wanted:
        result.checked += 1
        what = f"head of size {head.size} (signed {head.timestamp})"
        if head.controller != ledger.controller:
            result.problems.append(f"{what} is of controller {head.controller!r}, not {ledger.controller!r}")
            continue
        if not head.verify(key):
            result.problems.append(f"{what} is not signed by this ledger's key {ledger.key_fingerprint} "
                                   f"(it names {head.key_fingerprint}): a re-keyed or replaced ledger")
        if head.size > len(leaves):
            result.problems.append(f"{what} covers more records than this ledger's {len(leaves)}: records were "
                                   "removed after the platform witnessed them (truncation or an older copy)")
            continue
        frontier.extend(leaves[done:head.size])
        done = head.size
        root = frontier.root().hex() if frontier.size else EMPTY_ROOT.hex()
        if root != head.root:
            result.problems.append(f"{what}: the first {head.size} records of this ledger have root {root[:16]}…, "
                                   f"the platform witnessed {head.root[:16]}… (a forked or rewritten history)")
    return result


def check_file(ledger: Any, path: str | Path, public_key: Ed25519PublicKey | None = None) -> AgainstResult:
    """``check_against`` with the heads recorded for this ledger's merchant in ``path``."""
    return check_against(ledger, load_witnessed_heads(path, ledger.controller), str(path), public_key)
