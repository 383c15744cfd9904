"""A node's side of model delivery: keep the run's final global model for scoring.

At the end of a run the platform sends ``query.deliver_model`` (``fedretain.protocol``) with the
final model file's bytes, its SHA-256 and the run's metadata. The node refuses a file whose hash
differs, one that is not a readable fedretain model, or one whose run id, round, features,
transform or model kind differ from what the message states; otherwise it saves the file
atomically as ``<node folder>/models/<run-id>.pt`` and points ``latest.pt`` at the same bytes
(another atomic replace), so ``fedretain score --silo SILO`` scores with it by default. It
reads no silo data and replies with an acknowledgement only (merchant id, run id, round, the
hash it verified, ``saved``).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedretain.atomic import write_atomic
from fedretain.clients.node import NodeConfig
from fedretain.models import ModelBundle
from fedretain.protocol import DELIVER_ACTION, DELIVERY_RECORD

MODELS_DIR = "models"
LATEST = "latest.pt"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class DeliveryError(RuntimeError):
    """The delivered model is refused (nothing is saved)."""


def models_dir(config: NodeConfig) -> Path:
    return config.state_dir / MODELS_DIR


def latest_model(state_dir: str | Path) -> Path:
    """Where the latest delivered model of a node lives (``fedretain score``'s default)."""
    return Path(state_dir) / MODELS_DIR / LATEST


def verify(cfg: ConfigRecord, scratch: Path) -> tuple[bytes, str, str, int]:
    """The file's bytes, its hash, run id and round once every check passes; DeliveryError otherwise."""
    data = cfg.get("model-file")
    if not isinstance(data, bytes) or not data:
        raise DeliveryError("the delivery carries no model file")
    digest = hashlib.sha256(data).hexdigest()
    stated = str(cfg.get("model-sha256", ""))
    if digest != stated:
        raise DeliveryError(f"model file hash {digest} differs from the stated {stated!r}: refused, nothing saved")
    run_id = str(cfg.get("run-id", ""))
    if not _RUN_ID.match(run_id):
        raise DeliveryError(f"run id {run_id!r} is not a valid file name: refused")
    fd, tmp = tempfile.mkstemp(dir=scratch, suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        try:
            bundle = ModelBundle.load(tmp)
        except (ValueError, FileNotFoundError) as exc:
            raise DeliveryError(f"delivered model of run {run_id} is not usable: {exc}") from None
    finally:
        os.unlink(tmp)
    rnd = int(cfg.get("server-round", 0))
    checks = {
        "run id": (str(bundle.meta.get("run_id", "")), run_id),
        "round": (int(bundle.meta.get("round", 0) or 0), rnd),
        "features": (list(bundle.feature_names), list(cfg.get("features", []))),
        "transform": (bundle.standardizer.source, str(cfg.get("transform", ""))),
        "model kind": (bundle.kind, str(cfg.get("model-kind", ""))),
    }
    wrong = [f"{name} {got!r} (stated {want!r})" for name, (got, want) in checks.items() if got != want]
    if wrong:
        raise DeliveryError(f"delivered model of run {run_id} does not match its metadata: {'; '.join(wrong)}")
    return data, digest, run_id, rnd


def save_delivery(config: NodeConfig, cfg: ConfigRecord) -> tuple[Path, str, str, int]:
    """Verify and save a delivered model; returns (path, sha256, run id, round)."""
    folder = models_dir(config)
    folder.mkdir(parents=True, exist_ok=True)
    data, digest, run_id, rnd = verify(cfg, folder)
    path = folder / f"{run_id}.pt"
    write_atomic(path, data)
    write_atomic(folder / LATEST, data)
    return path, digest, run_id, rnd


def deliver_model(msg: Message, context: Context) -> Message:
    """``query.deliver_model``: save the run's final model; reply with an acknowledgement only."""
    from fedretain.clients.witnessing import merchant_id

    config = NodeConfig.from_flower(dict(context.node_config), dict(context.run_config))
    _, digest, run_id, rnd = save_delivery(config, msg.content["model"])
    ack = ConfigRecord({"merchant-id": merchant_id(config), "run-id": run_id, "round": rnd,
                        "model-sha256": digest, "saved": True})
    return Message(RecordDict({DELIVERY_RECORD: ack}), reply_to=msg)


def install(app: ClientApp) -> None:
    """Register the delivery handler on a ClientApp."""
    app.query(DELIVER_ACTION)(deliver_model)
