"""Local training (FedAvg/FedProx), run settings parsing, and the run record."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedretain.models import RetentionNet
from fedretain.server.settings import RunSettings
from fedretain.train import LocalTrainer, TrainConfig, evaluate, to_targets


def _data(n=400, d=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    p = 1 / (1 + np.exp(-(2 * x[:, 0] - x[:, 1])))
    y = to_targets(rng.random(n) < p, np.where(rng.random(n) < p, rng.lognormal(3, 1, n), 0.0))
    return x, y


def _distance(model, ref):
    return sum(((p - r) ** 2).sum().item() for p, r in zip(model.parameters(), ref))


def test_training_learns_and_fedprox_stays_closer_to_the_global_model():
    x, y = _data()
    torch.manual_seed(0)
    start = RetentionNet(5, (16,))
    ref = [p.detach().clone() for p in start.parameters()]
    before = evaluate(start, x, y)["auc"]
    plain, prox = RetentionNet(5, (16,)), RetentionNet(5, (16,))
    plain.load_state_dict(start.state_dict())
    prox.load_state_dict(start.state_dict())
    LocalTrainer(TrainConfig(epochs=5, learning_rate=0.02)).fit(plain, x, y, ref)
    LocalTrainer(TrainConfig(epochs=5, learning_rate=0.02, proximal_mu=5.0)).fit(prox, x, y, ref)
    assert evaluate(plain, x, y)["auc"] > max(before, 0.75)
    assert _distance(prox, ref) < 0.5 * _distance(plain, ref)


def test_training_refuses_empty_data_and_bad_config():
    with pytest.raises(ValueError, match="no training examples"):
        LocalTrainer(TrainConfig()).fit(RetentionNet(3), np.zeros((0, 3)), np.zeros((0, 2)))
    with pytest.raises(ValueError):
        TrainConfig(learning_rate=0)
    report = evaluate(RetentionNet(3), np.zeros((0, 3)), np.zeros((0, 2)))
    assert report["num_examples"] == 0 and np.isnan(report["auc"])


def test_settings_round_trip_and_validation():
    s = RunSettings(rounds=4, strategy="fedprox", proximal_mu=0.1, features=("recency_days", "frequency"))
    again = RunSettings.from_run_config({**s.to_run_config(), "data-dir": "/x"})
    assert again.rounds == 4 and again.strategy == "fedprox" and again.features == ("recency_days", "frequency")
    assert again.extra == {"data-dir": "/x"}
    with pytest.raises(ValueError, match="unknown strategy"):
        RunSettings(strategy="fedsgd")
    with pytest.raises(ValueError, match="proximal-mu"):
        RunSettings(strategy="fedprox")
    with pytest.raises(ValueError, match="unknown purpose"):
        RunSettings(purpose="marketing")
    with pytest.raises(ValueError, match="unknown feature"):
        RunSettings.from_run_config({"features": "recency_days,shoe_size"})


def test_run_record_is_json_without_nan_and_tracks_merchants(tmp_path):
    from fedretain.server.run_record import RunRecord

    rec = RunRecord.create(tmp_path, "r1", {"rounds": 2})
    rec.add_round({"round": 1, "status": "completed", "evaluate": {"auc": float("nan")},
                   "nodes": [{"phase": "train", "merchant_id": "m0", "num_examples": 10, "epsilon": 0.5, "error": None},
                             {"phase": "train", "merchant_id": "m1", "num_examples": 0, "error": "boom"}]})
    data = json.loads((tmp_path / "run.json").read_text())
    assert data["rounds"][0]["evaluate"]["auc"] is None
    assert data["merchants"] == {"m0": {"rounds": [1], "train_examples": {"1": 10}, "epsilon_spent": 0.5}}
    assert RunRecord.load(tmp_path).last_completed_round == 1
    (tmp_path / "run.json").write_text("{broken")
    with pytest.raises(ValueError, match="cannot read run record"):
        RunRecord.load(tmp_path)
