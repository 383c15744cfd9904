"""Metrics against scikit-learn, the model's Opacus compatibility, and checkpoint round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedretain.metrics import expected_calibration_error, log_loss, roc_auc, spearman
from fedretain.models import ModelBundle, RetentionLoss, RetentionNet, Standardizer


def test_auc_and_log_loss_match_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.random(500) + 0.3 * y, 2)  # rounding makes ties
    assert roc_auc(y, s) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)
    p = np.clip(rng.random(500), 0.01, 0.99)
    assert log_loss(y, p) == pytest.approx(sk.log_loss(y, p), rel=1e-9)
    assert np.isnan(roc_auc(np.ones(5), np.arange(5)))


def test_calibration_and_rank_metrics():
    y = np.array([0, 0, 1, 1])
    assert expected_calibration_error(y, np.array([0.0, 0.0, 1.0, 1.0])) == pytest.approx(0.0)
    assert expected_calibration_error(y, np.array([1.0, 1.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert spearman(np.arange(10), np.arange(10) ** 2) == pytest.approx(1.0)


def test_model_is_opacus_compatible_and_loss_per_sample():
    from opacus.validators import ModuleValidator

    model = RetentionNet(12)
    assert ModuleValidator.validate(model, strict=False) == []
    out = model(torch.randn(7, 12))
    assert out.shape == (7, 2)
    target = torch.stack([torch.ones(7), torch.zeros(7)], 1)
    per = RetentionLoss(reduction="none")(out, target)
    assert per.shape == (7,)
    assert RetentionLoss()(out, target).item() == pytest.approx(per.mean().item(), rel=1e-6)


def test_standardizer_from_federated_moments_equals_pooled_fit():
    rng = np.random.default_rng(1)
    parts = [rng.normal(i, 1 + i, size=(50 * (i + 1), 3)) for i in range(3)]
    pooled = Standardizer.fit(np.concatenate(parts))
    fed = Standardizer.from_moments(sum(len(p) for p in parts), sum(p.sum(0) for p in parts),
                                    sum((p**2).sum(0) for p in parts))
    np.testing.assert_allclose(fed.mean, pooled.mean)
    np.testing.assert_allclose(fed.std, pooled.std)


def test_checkpoint_round_trip_and_corrupt_file(tmp_path):
    model = RetentionNet(4, (8,))
    bundle = ModelBundle(model.state_dict(), ["a", "b", "c", "d"], Standardizer(np.zeros(4), np.ones(4)), (8,),
                         {"round": 3})
    path = bundle.save(tmp_path / "m.pt")
    again = ModelBundle.load(path)
    assert again.feature_names == ["a", "b", "c", "d"] and again.meta["round"] == 3
    x = torch.randn(5, 4)
    torch.testing.assert_close(again.build_model()(x), model.eval()(x))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        ModelBundle.load(bad)
    with pytest.raises(FileNotFoundError):
        ModelBundle.load(tmp_path / "missing.pt")
