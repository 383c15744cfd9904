"""Value of joining, computed on the node: local-only vs global vs personalised, with an interval."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedretain.joining import compare, summarize
from fedretain.models import make_model
from fedretain.train import LocalTrainer, TrainConfig


def _data(n, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    logit = -1.0 + 1.5 * x[:, 0] - 1.0 * x[:, 1] + shift
    y0 = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    return x, np.stack([y0, (y0 * 2.0).astype(np.float32)], axis=1)


def test_a_small_merchant_gains_from_a_model_trained_on_many():
    cfg = TrainConfig(epochs=1, batch_size=64, learning_rate=0.01)
    big_x, big_y = _data(6000, 0)  # the federation's data: the same behaviour, much more of it
    global_model = make_model("logreg", 5)
    LocalTrainer(TrainConfig(epochs=5, batch_size=64, learning_rate=0.01)).fit(global_model, big_x, big_y)
    x, y = _data(40, 1)  # a small merchant: 40 training users
    xt, yt = _data(400, 2)
    r = compare("small", global_model, x, y, xt, yt, cfg, local_epochs=10)
    assert set(r.log_loss) == {"local", "global", "personalised"} and r.n_train == 40 and r.n_test == 400
    assert r.joining_helps and r.gain_low > 0  # significantly better than training alone
    assert r.gain == pytest.approx(r.log_loss["local"] - r.log_loss[r.best_shared])
    assert all(0.5 < a <= 1 for a in r.auc.values())
    s = summarize([r])
    assert s["share_merchants_joining_helps"] == 1.0 and s["share_customers_joining_helps"] == 1.0


def test_a_merchant_unlike_the_federation_can_see_local_win_and_one_class_tests_have_no_auc():
    cfg = TrainConfig(epochs=1, batch_size=64, learning_rate=0.01)
    global_model = make_model("logreg", 5)
    bx, by = _data(3000, 0)
    LocalTrainer(cfg).fit(global_model, bx, by)
    x, y = _data(3000, 3, shift=3.0)  # a shop whose customers come back far more often
    xt, yt = _data(500, 4, shift=3.0)
    r = compare("different", global_model, x, y, xt, yt, cfg, local_epochs=5)
    assert r.best_shared == "personalised" and r.log_loss["personalised"] < r.log_loss["global"]
    one_class = yt.copy()
    one_class[:, 0] = 0
    r2 = compare("none-back", global_model, x[:50], y[:50], xt[:20], one_class[:20], cfg, local_epochs=2)
    assert all(math.isnan(a) for a in r2.auc.values()) and math.isfinite(r2.gain)
    s = summarize([r, r2])
    assert s["merchants"] == 2 and 0 <= s["share_customers_joining_helps"] <= 1
    with pytest.raises(ValueError, match="needs training and held-out users"):
        compare("empty", global_model, x[:0], y[:0], xt, yt, cfg, local_epochs=1)


def test_local_only_starts_at_its_own_rate_and_no_positive_sellers_are_undecidable():
    """A seller alone knows only its own repeat rate (not the marketplace's); a held-out set without a
    returning customer cannot decide, and the summary says so beside the overall shares."""
    from fedretain.joining import own_rate

    cfg = TrainConfig(epochs=1, batch_size=64, learning_rate=0.01)
    bx, by = _data(3000, 0)
    global_model = make_model("logreg", 5)
    LocalTrainer(cfg).fit(global_model, bx, by)
    x, y = _data(60, 5)
    y[:, 0] = 0  # no returning customer among its 60 training users
    assert own_rate(y) == pytest.approx(0.5 / 61)
    xt, yt = _data(30, 6)
    none_back = yt.copy()
    none_back[:, 0] = 0
    r0 = compare("tiny", global_model, x, y, xt, none_back, cfg, local_epochs=5)
    r1 = compare("tiny-2", global_model, x, y, xt, yt, cfg, local_epochs=5)
    assert r0.test_positives == 0 and not r0.decidable and r1.decidable and r1.test_positives == int(yt[:, 0].sum())
    # the local model predicts the seller's own ~1 % rate: with nobody back it wins; with some back it loses
    assert r0.gain < 0 < r1.gain
    s = summarize([r0, r1])
    assert s["share_merchants_undecidable"] == 0.5 and s["share_customers_undecidable"] == pytest.approx(0.5)
    assert s["share_customers_joining_helps_decidable"] == 1.0 and s["share_customers_joining_helps"] == 0.5
    assert r0.as_dict()["decidable"] is False
