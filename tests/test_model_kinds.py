"""Federated logistic regression beside the MLP: run setting, checkpoint kind, DP-SGD, rare-positive prior."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fedretain.models import ModelBundle, RetentionLoss, Standardizer, make_model, model_kind
from fedretain.privacy.budget import BudgetLedger, ledger_path
from fedretain.privacy.dp_trainer import DPConfig, DPTrainer, LinearCapture
from fedretain.server.settings import RunSettings
from fedretain.train import LocalTrainer, TrainConfig, evaluate, predict

PURPOSE = "retention_modeling"


def _rare(n=4000, d=6, rate=0.02, seed=0):
    """Rare positives driven by the first two features (log-odds ≈ logit(rate) + 1.2 x0 + 0.6 x1)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    logit = np.log(rate / (1 - rate)) + 1.2 * x[:, 0] + 0.6 * x[:, 1]
    y0 = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    spend = y0 * np.exp(3 + 0.5 * x[:, 1] + 0.3 * rng.normal(size=n))
    return x, np.stack([y0, np.log1p(spend).astype(np.float32)], axis=1)


def test_logreg_is_one_linear_layer_and_the_setting_round_trips():
    net = make_model("logreg", 7, (64, 32))
    assert [type(m) for m in net.modules() if list(m.parameters(recurse=False))] == [nn.Linear]
    assert net.head.in_features == 7 and model_kind(net.hidden) == "logreg"
    s = RunSettings(model="logreg", hidden=(64, 32), prior_rate=0.02)
    assert s.hidden == ()  # a logistic regression has no hidden layers, whatever --hidden says
    back = RunSettings.from_run_config(s.to_run_config())
    assert (back.model, back.hidden, back.prior_rate) == ("logreg", (), 0.02)
    assert RunSettings().model == "mlp" and RunSettings().hidden == (64, 32)
    with pytest.raises(ValueError, match="unknown model 'tree'"):
        RunSettings(model="tree")
    with pytest.raises(ValueError, match="at least one hidden layer"):
        RunSettings(model="mlp", hidden=())
    with pytest.raises(ValueError, match="prior-rate"):
        RunSettings(prior_rate=1.5)


def test_checkpoint_records_the_kind_and_score_rebuilds_it(tmp_path):
    x, _ = _rare(n=50)
    net = make_model("logreg", x.shape[1])
    bundle = ModelBundle(net.state_dict(), [f"f{i}" for i in range(x.shape[1])], Standardizer.fit(x), hidden=())
    assert bundle.kind == "logreg"
    loaded = ModelBundle.load(bundle.save(tmp_path / "m.pt"))
    assert loaded.kind == "logreg" and loaded.hidden == ()
    assert torch.load(tmp_path / "m.pt", weights_only=True)["model"] == "logreg"
    np.testing.assert_allclose(predict(loaded.build_model(), x)[0], predict(net, x)[0])
    mlp = ModelBundle(make_model("mlp", 3, (4,)).state_dict(), ["a", "b", "c"], Standardizer.fit(x[:, :3]),
                      hidden=(4,))
    assert ModelBundle.load(mlp.save(tmp_path / "mlp.pt")).kind == "mlp"
    # a checkpoint naming a kind this version does not know is refused with the file named
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload["model"] = "forest"
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad\.pt.*unknown model 'forest'"):
        ModelBundle.load(tmp_path / "bad.pt")


def test_prior_rate_starts_calibrated_and_training_beats_a_cold_start():
    x, y = _rare()
    warm = make_model("logreg", x.shape[1], prior_rate=0.02)
    assert abs(predict(warm, x)[0].mean() - 0.02) < 0.01
    cold = make_model("logreg", x.shape[1])
    torch.manual_seed(0)
    warm.head.weight.data.copy_(cold.head.weight.data)
    cfg = TrainConfig(epochs=2, batch_size=256, learning_rate=0.005)  # logreg: SGD at 0.005 × SGD_LR_SCALE
    LocalTrainer(cfg).fit(warm, x, y)
    LocalTrainer(cfg).fit(cold, x, y)
    ew, ec = evaluate(warm, x, y), evaluate(cold, x, y)
    assert ew["log_loss"] < 0.6 * ec["log_loss"]  # a cold start is still walking its bias down from p = 0.5
    assert ew["auc"] > 0.7
    with pytest.raises(ValueError, match="prior-rate"):
        make_model("mlp", 3, prior_rate=2.0)


def test_bk_clipping_covers_logistic_regression():
    """The fast clipped-gradient sum is exact for the one-layer model too (closed form per example)."""
    x, y = _rare(n=64)
    net = make_model("logreg", x.shape[1])
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    capture = LinearCapture(net)
    norms = capture.clipped_grad_sum(RetentionLoss(reduction="none")(net(xt), yt), 0.5)
    capture.remove()
    out = net(xt).detach()
    g = torch.stack([torch.sigmoid(out[:, 0]) - yt[:, 0], 0.2 * 2 * (out[:, 1] - yt[:, 1])], dim=1)  # dloss/dout
    per_norm = (g.pow(2).sum(1) * (xt.pow(2).sum(1) + 1)).sqrt()
    torch.testing.assert_close(norms, per_norm, rtol=1e-4, atol=1e-5)
    factor = (0.5 / (per_norm + 1e-6)).clamp(max=1.0)
    torch.testing.assert_close(net.head.weight.grad, (g * factor[:, None]).T @ xt, rtol=1e-4, atol=1e-5)


def test_logreg_trains_with_sgd_and_the_mlp_with_adam():
    """FedAvg of local Adam runs is biased on heterogeneous merchants; the convex model uses plain SGD."""
    from fedretain.train import SGD_LR_SCALE, make_optimizer

    opt = make_optimizer(make_model("logreg", 4), 0.01)
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["lr"] == pytest.approx(0.01 * SGD_LR_SCALE)
    assert type(make_optimizer(make_model("mlp", 4, (8,)), 0.01)) is torch.optim.Adam


def test_dp_sgd_trains_a_logistic_regression_and_spends_the_budget(tmp_path):
    with BudgetLedger.open(ledger_path(tmp_path), create=True) as ledger:
        ledger.set_budget(PURPOSE, 10.0)
    x, y = _rare(n=3000, rate=0.05)
    net = make_model("logreg", x.shape[1], prior_rate=0.05)
    res = DPTrainer(TrainConfig(epochs=2, batch_size=256, learning_rate=0.05),
                    DPConfig(3.0, max_grad_norm=10.0, total_rounds=1, noise_seed=1),
                    ledger_path(tmp_path), "lr-run", PURPOSE, 1).fit(net, x, y)
    assert 2.9 < res.extra_metrics["epsilon"] <= 3.0 and math.isnan(res.loss)
    assert evaluate(net, x, y)["auc"] > 0.75


@pytest.mark.parametrize("kind,expected", [("logreg", torch.optim.SGD), ("mlp", torch.optim.Adam)])
def test_dp_sgd_steps_with_the_same_optimizer_as_plain_training(tmp_path, monkeypatch, kind, expected):
    """Local DP-SGD of a logistic regression is noisy *SGD*: the FedAvg-of-Adam bias would come back with DP."""
    import fedretain.privacy.dp_trainer as dp_trainer
    from fedretain.train import make_optimizer

    built: list[torch.optim.Optimizer] = []

    def recording(model, lr):  # the real optimizer factory, recording what DP-SGD wraps
        built.append(make_optimizer(model, lr))
        return built[-1]

    monkeypatch.setattr(dp_trainer, "make_optimizer", recording)
    with BudgetLedger.open(ledger_path(tmp_path), create=True) as ledger:
        ledger.set_budget(PURPOSE, 10.0)
    x, y = _rare(n=600, rate=0.1)
    net = make_model(kind, x.shape[1], (8,), prior_rate=0.1)
    DPTrainer(TrainConfig(epochs=1, batch_size=200, learning_rate=0.01), DPConfig(3.0, total_rounds=1, noise_seed=2),
              ledger_path(tmp_path), "opt-run", PURPOSE, 1).fit(net, x, y)
    assert [type(o) for o in built] == [expected]
    assert built[0].param_groups[0]["lr"] == pytest.approx(make_optimizer(net, 0.01).param_groups[0]["lr"])
