"""End of a run: every participating merchant node receives the final global model.

The server sends the final model *file* (the ``model.pt`` it checkpointed, byte for byte) with
its SHA-256 and the run's metadata in a ``query.deliver_model`` message; the node checks the
hash and the metadata, saves the file atomically into its node folder and replies with an
acknowledgement only (``fedretain.protocol.DELIVERY_ACK_KEYS``, declared public in
``fedretain.egress``). The run record's ``delivery`` section lists every participating node,
whether it acknowledged, and the hash it acknowledged — the same hash as the last round's
``model_sha256``, so a merchant can check that the model it scores with is the run's model.

A node that does not acknowledge does not fail the run (the model exists and is recorded);
the record says which merchant has no copy. The record also carries the run's public recipe
(cutoff, batch size, learning rate, epochs, rounds), with which the node computes — for itself,
never sent — what joining gained it over training alone (``fedretain.joining``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedretain.models import ModelBundle
from fedretain.protocol import DELIVER_ACTION, DELIVERY_RECORD
from fedretain.server.checkpoints import sha256_file
from fedretain.server.run_record import RunRecord, now_iso
from fedretain.server.settings import RunSettings

log = logging.getLogger("fedretain.server")


def participants(record: RunRecord) -> dict[int, str]:
    """Node id -> merchant id of every node that trained successfully in some round of this run."""
    out: dict[int, str] = {}
    for entry in record.data.get("rounds", []):
        for node in entry.get("nodes", []):
            if node.get("phase") == "train" and not node.get("error") and node.get("node_id") is not None:
                out[int(node["node_id"])] = str(node.get("merchant_id", f"node-{node['node_id']}"))
    return out


def delivery_config(model_file: Path, digest: str, settings: RunSettings) -> ConfigRecord:
    """The ``model`` record: the file's bytes, its hash, and what the node checks the bundle against."""
    bundle = ModelBundle.load(model_file)
    return ConfigRecord({
        "model-file": model_file.read_bytes(), "model-sha256": digest,
        "run-id": settings.run_id, "server-round": int(bundle.meta.get("round", 0) or 0),
        "features": list(bundle.feature_names), "transform": str(bundle.standardizer.source),
        "model-kind": bundle.kind, "hidden": [int(h) for h in bundle.hidden],
        "purpose": settings.purpose, "horizon-days": float(settings.horizon_days), "dp-mode": settings.dp_mode,
        # the run's public recipe: the node compares the model with one it trains alone (clients/delivery.py)
        "cutoff": settings.cutoff, "batch-size": int(settings.batch_size),
        "learning-rate": float(settings.learning_rate), "local-epochs": int(settings.local_epochs),
        "rounds": int(settings.rounds),
    })


def deliver_final_model(grid: Grid, record: RunRecord, model_file: Path, settings: RunSettings,
                        send_and_receive: Callable[[Grid, list[Message], float], list[Message]]) -> dict[str, Any]:
    """Send ``model_file`` to every participating node that is connected; record who acknowledged it.

    ``send_and_receive`` is the round loop's exchange (``federation.send_and_receive``)."""
    digest = sha256_file(model_file)
    config = delivery_config(model_file, digest, settings)
    nodes = participants(record)
    connected = set(grid.get_node_ids())
    messages = [Message(RecordDict({"model": config}), dst_node_id=n, message_type=f"query.{DELIVER_ACTION}")
                for n in sorted(nodes) if n in connected]
    replies = {int(r.metadata.src_node_id): r for r in send_and_receive(grid, messages, settings.round_timeout)}
    rows: list[dict[str, Any]] = []
    for node_id, merchant in sorted(nodes.items()):
        row: dict[str, Any] = {"node_id": node_id, "merchant_id": merchant, "acknowledged": False,
                               "model_sha256": None, "error": None}
        reply = replies.get(node_id)
        if node_id not in connected:
            row["error"] = "node not connected at the end of the run"
        elif reply is None:
            row["error"] = f"no acknowledgement within {settings.round_timeout:.0f} s"
        elif reply.has_error():
            row["error"] = str(reply.error.reason)
        else:
            ack = dict(reply.content.config_records.get(DELIVERY_RECORD, {}))
            got = str(ack.get("model-sha256", ""))
            row["merchant_id"] = str(ack.get("merchant-id", merchant))
            if got == digest and bool(ack.get("saved", False)):
                row.update(acknowledged=True, model_sha256=got)
            else:
                row["error"] = f"acknowledged hash {got!r} differs from the model's {digest}"
        if row["error"]:
            log.warning("model delivery to merchant %s (node %d) failed: %s", row["merchant_id"], node_id,
                        row["error"])
        rows.append(row)
    section = {"model_sha256": digest, "round": int(config["server-round"]), "model": str(model_file),
               "delivered": now_iso(), "nodes": rows}
    record.data["delivery"] = section
    record.event("model_delivered", acknowledged=sum(r["acknowledged"] for r in rows), participants=len(rows))
    return section
