"""The run record: a JSON file that says what a federated run did, round by round.

It holds the configuration, aggregated metrics per round, which merchants contributed
to which round with how many examples, and the consent lineage each merchant reported
(ledger head, users used per scope) and ε spent — never a user id. Written atomically
after every round so a crash or a restart never loses finished rounds.

The platform's witness (``fedretain.server.witness``) adds to it the signed ledger heads it
accepted (``witness.heads``: public size, root, signature — what an officer checks a ledger
file against) and an ``alerts`` list naming each merchant it refused and why.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import weakref
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf → None, numpy scalars → Python numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps_by_line(payload: Any) -> str:
    """JSON with each top-level key, and each element of a top-level list, on its own line.

    ``json.dump(..., indent=2)`` runs the pure-Python encoder (CPython uses its C encoder only
    without ``indent``), and a 1,000-merchant run record is megabytes rewritten every round:
    that was most of the ServerApp's CPU (issue 14). Encoding values with the C encoder and
    breaking lines only at the top two levels keeps the file diff- and grep-friendly."""
    def enc(v: Any) -> str:
        return json.dumps(v, allow_nan=False, ensure_ascii=False)

    if not isinstance(payload, dict):
        return enc(payload)
    lines = []
    for key, value in payload.items():
        if isinstance(value, list) and value:
            body = "[\n" + ",\n".join(f"    {enc(v)}" for v in value) + "\n  ]"
        else:
            body = enc(value)
        lines.append(f"  {enc(str(key))}: {body}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def write_json_atomic(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(dumps_by_line(_clean(payload)))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


_OPEN: weakref.WeakValueDictionary[str, RunRecord] = weakref.WeakValueDictionary()


class RunRecord:
    """Append-as-you-go record of one run, persisted to ``<out_dir>/run.json``."""

    FILENAME = "run.json"

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data
        _OPEN[str(Path(path).resolve())] = self

    @classmethod
    def active(cls, out_dir: str | os.PathLike[str]) -> RunRecord | None:
        """The record this process is writing in ``out_dir`` (so a grid wrapper such as the witness
        can add to the same object the round loop saves, instead of a second copy that would be
        overwritten)."""
        return _OPEN.get(str((Path(out_dir) / cls.FILENAME).resolve()))

    @classmethod
    def create(cls, out_dir: Path, run_id: str, config: dict[str, Any]) -> RunRecord:
        data = {
            "format": "fedretain-run/1",
            "run_id": run_id,
            "status": "running",
            "created": now_iso(),
            "updated": now_iso(),
            "config": config,
            "feature_columns": [],
            "standardization": {},
            "rounds": [],
            "merchants": {},
            "events": [],
        }
        rec = cls(Path(out_dir) / cls.FILENAME, data)
        rec.save()
        return rec

    @classmethod
    def load(cls, out_dir: Path) -> RunRecord:
        path = Path(out_dir) / cls.FILENAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read run record ({exc})") from exc
        if data.get("format") != "fedretain-run/1":
            raise ValueError(f"{path}: not a fedretain run record")
        return cls(path, data)

    @property
    def last_completed_round(self) -> int:
        done = [r["round"] for r in self.data["rounds"] if r.get("status") == "completed"]
        return max(done, default=0)

    def event(self, kind: str, **details: Any) -> None:
        """Log a notable event (resume, retry, node failure) with a timestamp."""
        self.data["events"].append({"at": now_iso(), "kind": kind, **details})
        self.save()

    def alert(self, kind: str, **details: Any) -> None:
        """Record an alert (e.g. a merchant refused by the ledger witness) in ``alerts`` and in ``events``."""
        entry = {"at": now_iso(), "kind": kind, **details}
        self.data.setdefault("alerts", []).append(entry)
        self.data["events"].append({**entry, "kind": f"alert:{kind}"})
        self.save()

    def witnessed(self, head: dict[str, Any], save: bool = True) -> None:
        """Record a signed ledger head the platform witnessed (public: merchant, kind, size, root, signature).

        ``save=False`` lets the witness add the heads of every reply one pull brought and write the
        file once for them (:meth:`save`): one rewrite per reply made the first round of a large
        federation quadratic. The witness store (SQLite) has already committed each head by then."""
        self.data.setdefault("witness", {}).setdefault("heads", []).append(head)
        if save:
            self.save()

    def add_round(self, entry: dict[str, Any]) -> None:
        self.data["rounds"] = [r for r in self.data["rounds"] if r["round"] != entry["round"]]
        self.data["rounds"].append(entry)
        self.data["rounds"].sort(key=lambda r: r["round"])
        for node in entry.get("nodes", []):
            if node.get("phase") != "train" or node.get("error"):
                continue
            m = self.data["merchants"].setdefault(
                node["merchant_id"], {"rounds": [], "train_examples": {}, "epsilon_spent": None}
            )
            if entry["round"] not in m["rounds"]:
                m["rounds"].append(entry["round"])
            m["train_examples"][str(entry["round"])] = node.get("num_examples")
            if node.get("epsilon") is not None:
                m["epsilon_spent"] = node["epsilon"]
        self.save()

    def finish(self, status: str, **extra: Any) -> None:
        self.data["status"] = status
        self.data.update(extra)
        self.save()

    def save(self) -> None:
        self.data["updated"] = now_iso()
        write_json_atomic(self.path, self.data)
