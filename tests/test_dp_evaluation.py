"""The held-out evaluation release (fedretain.dp_evaluation) and the public input transforms
(fedretain.transforms): what replaces exact metrics and exchanged standardisation moments."""

from __future__ import annotations

import numpy as np
import pytest

from fedretain.dp_evaluation import (
    DEFAULT_EVAL_DELTA,
    N_BINS,
    calibrated,
    dp_release,
    exact_release,
    histograms,
    pooled_metrics,
    release_id,
)
from fedretain.metrics import roc_auc
from fedretain.privacy.accountant import PrivacyError

PURPOSE = "retention_modeling"


def _scores(n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(float)
    logit = rng.normal(-1.0, 1.2, n) + 1.2 * y
    return y, 1.0 / (1.0 + np.exp(-logit))


@pytest.fixture()
def ledger(tmp_path):
    from fedretain.privacy.budget import BudgetLedger

    path = tmp_path / "privacy.db"
    with BudgetLedger.open(path, create=True) as led:
        led.set_budget(PURPOSE, 1.0)
    return path


def test_every_user_is_in_exactly_one_cell():
    y, p = _scores(1000)
    pos, neg = histograms(y, p)
    assert len(pos) == len(neg) == N_BINS and pos.sum() == y.sum() and neg.sum() == len(y) - y.sum()
    assert histograms([1.0], [0.0])[0].sum() == 1 and histograms([0.0], [1.0])[1].sum() == 1  # the ends


def test_pooled_exact_histograms_give_the_auc_up_to_ties_within_bins():
    parts = [_scores(3000, seed) for seed in range(3)]
    y = np.concatenate([a for a, _ in parts])
    p = np.concatenate([b for _, b in parts])
    out = pooled_metrics([(r.pos, r.neg, r.sd) for r in (exact_release(a, b) for a, b in parts)])
    assert out["num-examples"] == len(y) and out["base_rate"] == pytest.approx(y.mean())
    assert abs(out["auc"] - roc_auc(y, p)) < 0.01
    assert out["auc-low"] < out["auc"] < out["auc-high"] and out["auc-high"] - out["auc-low"] < 0.05
    assert 0.3 < out["log_loss"] < 1.0 and 0 < out["brier"] < 0.3


def test_interval_covers_the_exact_auc_under_the_declared_noise():
    y, p = _scores(2500, seed=4)
    exact = roc_auc(y, p)
    pos, neg = histograms(y, p)
    sd = calibrated(0.3, DEFAULT_EVAL_DELTA).scale
    rng = np.random.default_rng(9)
    covered = 0
    for _ in range(40):
        releases = [(pos / 2 + rng.normal(0, sd, N_BINS), neg / 2 + rng.normal(0, sd, N_BINS), sd) for _ in range(2)]
        out = pooled_metrics(releases, draws=100, seed=int(rng.integers(1 << 30)))
        covered += out["auc-low"] - 0.01 <= exact <= out["auc-high"] + 0.01  # 0.01: tie bias of the bins
    assert covered >= 34  # ≈95% nominal


def test_release_is_noisy_charged_once_and_refused_over_budget(ledger):
    from fedretain.privacy.budget import BudgetLedger

    y, p = _scores(800)
    r = dp_release(ledger, "run-1", PURPOSE, 3, y, p, 0.3)
    assert r.sd == pytest.approx(calibrated(0.3, DEFAULT_EVAL_DELTA).scale) and r.sd > 5
    assert not np.allclose(r.pos, histograms(y, p)[0])
    with BudgetLedger.open(ledger) as led:
        plan = led.run(release_id("run-1", 3), PURPOSE)
        assert plan.mode == "evaluate" and plan.epsilon == 0.3 and len(led.spends(release_id("run-1", 3), PURPOSE)) == 1
        before = led.committed(PURPOSE)
    with pytest.raises(PrivacyError, match="already released"):
        dp_release(ledger, "run-1", PURPOSE, 3, y, p, 0.3)
    with pytest.raises(PrivacyError, match="refused"):
        dp_release(ledger, "run-2", PURPOSE, 1, y, p, 0.9)  # 0.3 + 0.9 > 1
    with BudgetLedger.open(ledger) as led:
        assert led.committed(PURPOSE) == before and led.run(release_id("run-2", 1), PURPOSE) is None


def test_release_without_ledger_or_with_unreachable_epsilon_fails_closed(tmp_path, ledger):
    y, p = _scores(100)
    with pytest.raises(PrivacyError, match="ledger not found"):
        dp_release(tmp_path / "none.db", "r", PURPOSE, 1, y, p, 0.3)
    with pytest.raises(PrivacyError, match="eval-epsilon"):
        dp_release(ledger, "r", PURPOSE, 1, y, p, 0.01)


# -- public transforms ----------------------------------------------------------------------------
def test_every_feature_has_a_public_range_and_maps_into_it():
    from fedretain.features import DEFAULT_FEATURES, feature_columns
    from fedretain.transforms import TRANSFORM_ID, column_range, public_standardizer

    scaler = public_standardizer(DEFAULT_FEATURES)
    cols = feature_columns(DEFAULT_FEATURES)
    assert scaler.source == TRANSFORM_ID and len(scaler.mean) == len(cols)
    lo = np.array([column_range(c).lower for c in cols])
    hi = np.array([column_range(c).upper for c in cols])
    x = np.vstack([lo - 100, hi + 100, (lo + hi) / 2])
    out = scaler.transform(x)
    assert np.array_equal(out[0], scaler.transform(lo[None])[0])
    assert np.array_equal(out[1], scaler.transform(hi[None])[0])
    assert np.all(np.abs(out) <= 1.0 / np.min(scaler.std) * np.max(hi - lo))  # clipped: bounded whatever the input


def test_a_column_without_a_declared_range_is_refused():
    from fedretain.transforms import TransformError, public_bounds

    with pytest.raises(TransformError, match="no declared public range"):
        public_bounds(["recency_days", "shoe_size"])


def test_bundles_keep_the_transform_and_old_bundles_still_load(tmp_path):
    import torch

    from fedretain.models import ModelBundle, RetentionNet, Standardizer
    from fedretain.transforms import public_standardizer

    names = ["recency_days", "frequency"]
    scaler = public_standardizer(names)
    net = RetentionNet(3, (4,))
    path = ModelBundle(net.state_dict(), names + ["has_purchase_history"], scaler, (4,)).save(tmp_path / "m.pt")
    back = ModelBundle.load(path).standardizer
    assert back.source == scaler.source and np.array_equal(back.upper, scaler.upper)
    old = {"format": "fedretain-model/1", "state_dict": net.state_dict(), "feature_names": ["a", "b", "c"],
           "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "hidden": [4], "meta": {}}
    torch.save(old, tmp_path / "old.pt")
    legacy = ModelBundle.load(tmp_path / "old.pt").standardizer
    assert legacy.lower is None and legacy.transform(np.array([[5.0, 0, 0]]))[0, 0] == 5.0
    assert isinstance(legacy, Standardizer)


def test_a_negative_noisy_class_total_publishes_no_metric_and_says_why():
    """Noise can push a small node's class total below 0: no AUC of noise, a reason in the record instead."""
    from fedretain.dp_evaluation import pooled_metrics

    pos = np.full(12, -2.0)
    neg = np.full(12, 10.0)
    out = pooled_metrics([(pos, neg, 20.0)])
    assert "auc" not in out and out["auc-status"].startswith("suppressed")
    assert out["hist-noise-sd"] == 20.0
