"""What a merchant node and the platform exchange in a training round, in one place.

Two choices here exist for round latency in a real deployment, where Flower moves
every record and every array of a message as a separate object over gRPC:

* the model travels as **one flat float32 array** (``params``) instead of one array
  per tensor, so a message carries one array object, not six;
* a train message may ask the node to **evaluate the global model it received**
  before training on it (``evaluate-received``); the node replies with those held-out
  metrics in an ``evaluation`` record beside its update (in DP modes: the noisy score
  histograms of ``fedretain.dp_evaluation``, and only for the final model). The evaluation of round r's
  model therefore rides in round r+1's train exchange, and a run needs N+1 exchanges
  for N rounds instead of 2N.

Receivers also accept a state dict keyed by tensor name (checkpoints, older peers).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeGuard

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

PARAMS = "params"
EVALUATE_RECEIVED = "evaluate-received"
EVALUATION = "evaluation"
# End of a run: the platform sends each participating node the final model file (``query.deliver_model``:
# a ``model`` config record with the file's bytes, its SHA-256 and the run's metadata); the node
# verifies and saves it, and replies with an acknowledgement record only (clients/delivery.py).
DELIVER_ACTION = "deliver_model"
DELIVERY_RECORD = "delivery"
DELIVERY_ACK_KEYS = ("merchant-id", "run-id", "round", "model-sha256", "saved")


def model_arrays(state_dict: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """The model as one flat float32 array, in ``state_dict`` order."""
    flat = np.concatenate([t.detach().cpu().reshape(-1).numpy().astype(np.float32, copy=False)
                           for t in state_dict.values()]) if state_dict else np.zeros(0, np.float32)
    return ArrayRecord({PARAMS: Array(flat)})


def state_dict_from(arrays: ArrayRecord, template: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Tensors for ``template`` from a flat ``params`` array or a state dict keyed by name.

    Raises ``ValueError`` when the sizes do not match the template (a model of another
    shape, a truncated message) instead of loading something half-filled.
    """
    names = list(arrays.keys())
    if names != [PARAMS]:
        return arrays.to_torch_state_dict()
    shapes = {k: v.shape for k, v in template.state_dict().items()}
    flat = np.asarray(arrays[PARAMS].numpy(), dtype=np.float32).reshape(-1)
    expected = int(sum(int(np.prod(s)) for s in shapes.values()))
    if flat.size != expected:
        raise ValueError(f"model parameters: got {flat.size} values, this model has {expected}")
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name, shape in shapes.items():
        n = int(np.prod(shape))
        out[name] = torch.from_numpy(flat[offset:offset + n].copy()).reshape(shape)
        offset += n
    return out


def evaluation_record(metrics: Mapping[str, Any]) -> ConfigRecord:
    """Held-out metrics of the received model, carried beside a train reply's own metrics.

    A ConfigRecord, because Flower's strategies require exactly one MetricRecord in a
    train reply (the one they aggregate)."""
    return ConfigRecord({k: (int(v) if isinstance(v, (bool, np.bool_)) else v) for k, v in metrics.items()})


def evaluation_of(content: RecordDict) -> RecordDict | None:
    """The reply's evaluation as a one-MetricRecord RecordDict (what metric aggregation takes)."""
    if EVALUATION not in content.config_records:
        return None
    rec = content.config_records[EVALUATION]
    return RecordDict({"metrics": MetricRecord({k: v for k, v in rec.items() if _is_metric(v)})})


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_metric(v: Any) -> TypeGuard[int | float | list[int] | list[float]]:
    """What a MetricRecord holds: a number, or a non-empty list of numbers (no text, bytes or flags)."""
    return _is_number(v) or (isinstance(v, list) and bool(v) and all(_is_number(x) for x in v))
