"""A node's side of model delivery: keep the run's final global model for scoring.

At the end of a run the platform sends ``query.deliver_model`` (``fedretain.protocol``) with the
final model file's bytes, its SHA-256 and the run's metadata. The node refuses a file whose hash
differs, one that is not a readable fedretain model, or one whose run id, round, features,
transform or model kind differ from what the message states; otherwise it saves the file
atomically as ``<node folder>/models/<run-id>.pt`` and points ``latest.pt`` at the same bytes
(another atomic replace), so ``fedretain score --silo SILO`` scores with it by default. It
replies with an acknowledgement only (merchant id, run id, round, the hash it verified, ``saved``).

Once the model is saved the node also answers, for itself, what joining gained it
(``fedretain.joining``: local-only vs the delivered model vs the model fine-tuned on its own
users, held-out log loss with an interval) on its consented users under the run's purpose,
records that use in its consent ledger, writes ``<run-id>.joining.json`` beside the model and
keeps a one-line summary that ``fedretain client start`` prints. None of it is sent; if it
fails (too few users, consent refused) the delivery still stands and the log says why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedretain.atomic import write_atomic
from fedretain.clients.node import NodeConfig
from fedretain.models import ModelBundle
from fedretain.protocol import DELIVER_ACTION, DELIVERY_RECORD

MODELS_DIR = "models"
LATEST = "latest.pt"
JOINING_SUFFIX = ".joining.json"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SUMMARIES: dict[str, str] = {}  # run id -> the console line of its value of joining (this process only)
log = logging.getLogger(__name__)


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


def value_of_joining(config: NodeConfig, cfg: ConfigRecord, path: Path, run_id: str, rnd: int) -> dict[str, Any] | None:
    """Local-only vs delivered vs fine-tuned on this node's held-out users; saved beside the model, never sent.

    None when the node has no consented training or held-out users for the run's purpose."""
    from fedretain.clients.node import MerchantNode
    from fedretain.clients.replies import record_usage
    from fedretain.joining import compare
    from fedretain.train import TrainConfig

    bundle = ModelBundle.load(path)
    names = [c for c in bundle.feature_names if not c.startswith("has_")]
    node = MerchantNode(config)
    prep = node.prepare(str(cfg.get("purpose", "")), names, float(cfg.get("horizon-days", 30.0)),
                        str(cfg.get("cutoff", "")) or None)
    if prep.n_train == 0 or len(prep.x_test) == 0:
        return None
    record_usage(node, prep, ConfigRecord({"run-id": run_id, "server-round": rnd, "features": names}), "joining")
    tr = bundle.standardizer.transform
    train = TrainConfig(epochs=1, batch_size=int(cfg.get("batch-size", 128)),
                        learning_rate=float(cfg.get("learning-rate", 0.01)))
    epochs = max(1, int(cfg.get("rounds", 1)) * int(cfg.get("local-epochs", 1)))
    result = compare(node.merchant_id, bundle.build_model(), tr(prep.x_train), prep.y_train, tr(prep.x_test),
                     prep.y_test, train, local_epochs=epochs)
    out = {"run_id": run_id, "round": rnd, **result.as_dict()}
    write_atomic(path.with_name(f"{run_id}{JOINING_SUFFIX}"), json.dumps(out, indent=2, default=float).encode())
    _SUMMARIES[run_id] = summary_line(out)
    return out


def summary_line(r: dict[str, Any]) -> str:
    """``client start``'s end-of-run line: the gain of joining over training alone, with its interval."""
    ll = r["log_loss"]
    verdict = "joining helps" if r["gain"] > 0 else "training alone did as well or better"
    if not r.get("decidable", True):
        verdict += " (undecidable: no returning customer among the held-out ones)"
    elif r["gain_low"] > 0:
        verdict += " (significant at 95 %)"
    return (f"value of joining, on {r['n_test']} held-out customers (computed here, not sent): log loss "
            f"alone {ll['local']:.4f}, federated {ll['global']:.4f}, personalised {ll['personalised']:.4f}; "
            f"gain {r['gain']:+.4f} [{r['gain_low']:+.4f}, {r['gain_high']:+.4f}] with the {r['best_shared']} "
            f"model: {verdict}")


def delivery_line(run_id: str, digest: str) -> str:
    """The console line for a delivered model, with the value of joining when it was computed."""
    head = f"final model of run {run_id} received (sha256 {digest[:16]}), saved for `fedretain score`"
    return head + (f"; {_SUMMARIES[run_id]}" if run_id in _SUMMARIES else "")


def deliver_model(msg: Message, context: Context) -> Message:
    """``query.deliver_model``: save the run's final model; reply with an acknowledgement only."""
    from fedretain.clients.witnessing import merchant_id

    config = NodeConfig.from_flower(dict(context.node_config), dict(context.run_config))
    path, digest, run_id, rnd = save_delivery(config, msg.content["model"])
    try:
        value_of_joining(config, msg.content["model"], path, run_id, rnd)
    except Exception as exc:  # noqa: BLE001 - the model is delivered whatever this local comparison does
        log.warning("value of joining for run %s not computed: %s", run_id, exc)
    ack = ConfigRecord({"merchant-id": merchant_id(config), "run-id": run_id, "round": rnd,
                        "model-sha256": digest, "saved": True})
    return Message(RecordDict({DELIVERY_RECORD: ack}), reply_to=msg)


def install(app: ClientApp) -> None:
    """Register the delivery handler on a ClientApp."""
    app.query(DELIVER_ACTION)(deliver_model)
