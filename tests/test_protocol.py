"""The round protocol's model encoding and folded evaluation record (fedretain.protocol)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedretain.models import RetentionNet
from fedretain.protocol import EVALUATION, PARAMS, evaluation_of, evaluation_record, model_arrays, state_dict_from


def test_model_travels_as_one_array_and_comes_back_exactly():
    torch.manual_seed(3)
    model = RetentionNet(7, (5, 4))
    arrays = model_arrays(model.state_dict())
    assert list(arrays.keys()) == [PARAMS]
    assert arrays[PARAMS].numpy().size == sum(p.numel() for p in model.parameters())
    other = RetentionNet(7, (5, 4))
    other.load_state_dict(state_dict_from(arrays, other))
    for (k, a), (k2, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_keyed_state_dicts_are_still_accepted():
    model = RetentionNet(4, (3,))
    keyed = ArrayRecord(model.state_dict())
    out = state_dict_from(keyed, RetentionNet(4, (3,)))
    assert set(out) == set(model.state_dict())


@pytest.mark.parametrize("shape", [(6, (5, 4)), (7, (5,))])
def test_a_model_of_another_shape_is_refused(shape):
    arrays = model_arrays(RetentionNet(7, (5, 4)).state_dict())
    with pytest.raises(ValueError, match="model parameters: got"):
        state_dict_from(arrays, RetentionNet(shape[0], shape[1]))


def test_evaluation_rides_beside_the_one_metric_record():
    content = RecordDict({"metrics": MetricRecord({"num-examples": 10, "train_loss": 0.3})})
    assert evaluation_of(content) is None
    content[EVALUATION] = evaluation_record({"auc": 0.75, "num-examples": 40, "ece": float("nan")})
    assert isinstance(content[EVALUATION], ConfigRecord) and len(content.metric_records) == 1
    rec = evaluation_of(content)
    metrics = dict(next(iter(rec.metric_records.values())))
    assert metrics["auc"] == 0.75 and metrics["num-examples"] == 40 and math.isnan(metrics["ece"])


def test_flat_array_is_float32_in_state_dict_order():
    model = RetentionNet(3, (2,))
    flat = model_arrays(model.state_dict())[PARAMS].numpy()
    assert flat.dtype == np.float32
    expected = np.concatenate([t.detach().numpy().ravel() for t in model.state_dict().values()])
    assert np.array_equal(flat, expected)
