"""How per-node metrics become a round's metrics (fedretain.server.federation.weighted_mean)."""

from __future__ import annotations

import pytest
from flwr.app import MetricRecord, RecordDict

from fedretain.server.federation import weighted_mean


def _node(**metrics) -> RecordDict:
    return RecordDict({"metrics": MetricRecord(metrics)})


def test_quality_metrics_are_example_weighted_and_counts_are_summed():
    out = weighted_mean([
        _node(**{"num-examples": 100, "auc": 0.8, "users-used": 120, "scope-social": 30}),
        _node(**{"num-examples": 300, "auc": 0.6, "users-used": 350, "scope-social": 0}),
    ], "num-examples")
    assert out["auc"] == pytest.approx((100 * 0.8 + 300 * 0.6) / 400)
    assert out["num-examples"] == 400 and out["users-used"] == 470 and out["scope-social"] == 30


def test_nan_metric_of_one_node_is_left_out_not_propagated():
    out = weighted_mean([_node(**{"num-examples": 50, "auc": float("nan")}),
                         _node(**{"num-examples": 150, "auc": 0.7})], "num-examples")
    assert out["auc"] == pytest.approx(0.7)


def test_unweighted_mean_under_central_dp_still_sums_examples():
    out = weighted_mean([_node(**{"dp-weight": 1, "num-examples": 10, "train_loss": 1.0}),
                         _node(**{"dp-weight": 1, "num-examples": 990, "train_loss": 3.0})], "dp-weight")
    assert out["train_loss"] == pytest.approx(2.0) and out["num-examples"] == 1000 and out["dp-weight"] == 2
