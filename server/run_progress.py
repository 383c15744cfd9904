"""What a run's record (``run.json``) says about its progress, for ``server status``/``wait`` and the demo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def record_run_id(out_dir: Path) -> str | None:
    try:
        return json.loads((out_dir / "run.json").read_text(encoding="utf-8")).get("run_id")
    except (OSError, json.JSONDecodeError):
        return None


def run_progress(out_dir: Path) -> dict[str, Any]:
    """What ``run.json`` in ``out_dir`` says about a run (empty if there is none yet)."""
    path = Path(out_dir) / "run.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    done = [r for r in data.get("rounds", []) if r.get("status") == "completed"]
    merchant_nodes = {str(n["merchant_id"]): {"node_id": str(n.get("node_id"))}
                      for r in data.get("rounds", []) for n in r.get("nodes", [])
                      if n.get("merchant_id") and n.get("node_id") is not None}
    return {
        "status": data.get("status"), "updated": data.get("updated", ""), "error": data.get("error"),
        "rounds_total": data.get("config", {}).get("rounds"), "rounds_done": done,
        "last_round": done[-1]["round"] if done else 0,
        "merchants": {k: v.get("rounds") for k, v in data.get("merchants", {}).items()},
        "events": [e.get("kind") for e in data.get("events", [])],
        "merchant_nodes": merchant_nodes,
    }


def format_round(entry: dict[str, Any], total: int | None) -> str:
    """One line per finished round: who trained and the headline metrics."""
    merchants = sorted({n.get("merchant_id", "?") for n in entry.get("nodes", [])
                        if n.get("phase") == "train" and not n.get("error")})
    failed = sorted({str(n.get("merchant_id") or n.get("node_id")) for n in entry.get("nodes", []) if n.get("error")})
    metrics = {**{k: v for k, v in entry.get("train", {}).items() if k == "train_loss"},
               **{f"eval_{k}": v for k, v in entry.get("evaluate", {}).items() if k in ("auc", "loss", "accuracy")}}
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float)))
    line = f"round {entry['round']}/{total or '?'}: {len(merchants)} merchant(s) ({', '.join(merchants)})"
    if failed:
        line += f"; no answer from {', '.join(failed)}"
    return line + (f"; {shown}" if shown else "")



__all__ = ["format_round", "record_run_id", "run_progress"]
