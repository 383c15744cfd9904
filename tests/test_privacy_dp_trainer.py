"""DP-SGD trainer: the fast clipping path against Opacus's per-sample gradients; what is sent."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fedretain.models import RetentionLoss, RetentionNet
from fedretain.privacy.accountant import PrivacyError
from fedretain.privacy.budget import BudgetLedger, ledger_path
from fedretain.privacy.dp_trainer import DPConfig, DPTrainer, LinearCapture, check_model, plan_run
from fedretain.train import TrainConfig

PURPOSE = "retention_modeling"


def _batch(n=64, d=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * 3
    y = torch.stack([(torch.rand(n, generator=g) < 0.4).float(), torch.rand(n, generator=g) * 4], dim=1)
    return x, y


def _opacus_clipped_sum(model, x, y, max_grad_norm):
    """Reference: Opacus's own per-sample gradients (hooks mode), clipped and summed by hand."""
    from opacus import GradSampleModule

    gsm = GradSampleModule(model, loss_reduction="sum")
    loss = RetentionLoss(reduction="sum")(gsm(x), y)
    loss.backward()
    params = [p for p in model.parameters()]
    per_sample = torch.cat([p.grad_sample.reshape(len(x), -1) for p in params], dim=1)
    norms = per_sample.norm(dim=1)
    factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    out = [torch.einsum("i,i...->...", factor, p.grad_sample) for p in params]
    gsm._close()
    return out, norms


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("max_grad_norm", [0.05, 1.0, 1e3])
def test_bk_clipped_sum_equals_opacus_per_sample_clipping(max_grad_norm):
    torch.manual_seed(0)
    x, y = _batch()
    model = RetentionNet(x.shape[1], (16, 8))
    ref_model = RetentionNet(x.shape[1], (16, 8))
    ref_model.load_state_dict(model.state_dict())
    expected, ref_norms = _opacus_clipped_sum(ref_model, x, y, max_grad_norm)

    capture = LinearCapture(model)
    norms = capture.clipped_grad_sum(RetentionLoss(reduction="none")(model(x), y), max_grad_norm)
    capture.remove()
    torch.testing.assert_close(norms, ref_norms, rtol=1e-4, atol=1e-5)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-5)
    clipped = (ref_norms > max_grad_norm).float().mean().item()
    assert (0 < clipped < 1) if max_grad_norm == 1.0 else clipped in (0.0, 1.0)


def _ledger(tmp_path, eps=50.0):
    with BudgetLedger.open(ledger_path(tmp_path), create=True) as ledger:
        ledger.set_budget(PURPOSE, eps)
    return ledger_path(tmp_path)


def _xy(n=640, d=5, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = np.stack([(rng.random(n) < 1 / (1 + np.exp(-2 * x[:, 0]))).astype(np.float32),
                  np.abs(rng.normal(size=n)).astype(np.float32)], axis=1)
    return x, y


@pytest.mark.parametrize("clipping", ["bk", "ghost"])
def test_fit_updates_the_plain_model_and_reports_the_spend(tmp_path, clipping):
    path = _ledger(tmp_path)
    x, y = _xy()
    model = RetentionNet(x.shape[1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(epochs=1, batch_size=64, learning_rate=0.01)  # same plan as the other tests: cached σ
    result = DPTrainer(cfg, DPConfig(3.0, total_rounds=1, clipping=clipping, noise_seed=3), path, "r1", PURPOSE,
                       1).fit(model, x, y)
    assert type(model) is RetentionNet and list(model.state_dict()) == list(before)  # no Opacus wrapper leaks out
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert math.isnan(result.loss)  # a raw-data statistic is not released
    assert result.steps == 10 and result.num_examples == len(x)
    m = result.extra_metrics
    assert set(m) == {"epsilon", "delta", "noise-multiplier", "dp-steps"}
    assert 2.9 < m["epsilon"] <= 3.0 and m["delta"] < 1 / len(x) and m["dp-steps"] == 10 and m["noise-multiplier"] > 0.5


def test_noise_is_fresh_each_run_unless_seeded(tmp_path):
    path = _ledger(tmp_path)
    x, y = _xy()
    cfg = TrainConfig(epochs=1, batch_size=64, learning_rate=0.01)
    states = []
    for i, seed in enumerate([None, None, 5, 5]):
        torch.manual_seed(0)  # identical start and identical global torch RNG: only our generator differs
        model = RetentionNet(x.shape[1])
        DPTrainer(cfg, DPConfig(3.0, noise_seed=seed), path, f"run{i}", PURPOSE, 1).fit(model, x, y)
        states.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.equal(states[0], states[1])  # os.urandom-seeded: not reproducible by anyone
    assert torch.equal(states[2], states[3])  # benchmarks can seed explicitly


def test_models_opacus_cannot_clip_are_refused():
    bn = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    with pytest.raises(PrivacyError, match="not DP-SGD compatible"):
        check_model(bn.train(), "ghost")
    conv = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(PrivacyError, match="nn.Linear layers only"):
        check_model(conv.train(), "bk")
    check_model(RetentionNet(4).train(), "bk")


def test_bad_dp_settings_are_refused():
    for kwargs in ({"target_epsilon": 0}, {"target_epsilon": float("inf")}, {"max_grad_norm": 0},
                   {"total_rounds": 0}, {"clipping": "hooks"}, {"accountant": "gdp"}, {"target_delta": 1.0}):
        with pytest.raises(PrivacyError):
            DPConfig(**kwargs)
    with pytest.raises(PrivacyError, match="not below 1/n"):
        plan_run("r", PURPOSE, 100, TrainConfig(), DPConfig(target_delta=0.05))


def test_dp_optimizer_adds_noise_of_std_sigma_c_over_batch():
    """Our one-call noise draw keeps Opacus's distribution: i.i.d. N(0, (σC)²) per coordinate, ÷ batch."""
    from fedretain.privacy.dp_trainer import dp_optimizer, secure_generator

    model = RetentionNet(33, (64, 32))
    opt = dp_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=2.0, max_grad_norm=3.0,
                       expected_batch_size=10, generator=secure_generator(0))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    assert opt.pre_step()
    noise = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert noise.numel() == sum(p.numel() for p in model.parameters())
    assert noise.std().item() == pytest.approx(2.0 * 3.0 / 10, rel=0.05)
    assert abs(noise.mean().item()) < 0.05
    head_bias = model.head.bias.grad
    assert not torch.equal(head_bias, model.trunk[0].bias.grad[:2])  # distinct draws per parameter
    opt.zero_grad()
    with pytest.raises(ValueError):  # Opacus's guard: a summed gradient cannot be noised twice
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.accumulate()
        opt.add_noise()
        opt.add_noise()


def test_a_run_over_the_person_cap_is_refused_with_nothing_reserved_or_trained(tmp_path):
    from fedretain.privacy.person import PersonCapExceeded, person_epsilon

    path = _ledger(tmp_path)
    x, y = _xy()
    model = RetentionNet(x.shape[1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(epochs=1, batch_size=64, learning_rate=0.01)
    dp = DPConfig(3.0, max_merchants_per_person=2, person_epsilon_cap=3.5, noise_seed=3)
    k2 = person_epsilon(plan_run("capped", PURPOSE, len(x), cfg, dp), 2)
    assert k2 > 3.5  # a person at two merchants gets more than the cap from this run
    with pytest.raises(PersonCapExceeded, match="person-epsilon-cap=3.5"):
        DPTrainer(cfg, dp, path, "capped", PURPOSE, 1).fit(model, x, y)
    with BudgetLedger.open(path) as ledger:
        assert ledger.run("capped", PURPOSE) is None and ledger.runs() == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the same run under a cap it fits is reserved and trained
    ok = DPConfig(3.0, max_merchants_per_person=2, person_epsilon_cap=k2 + 0.01, noise_seed=3)
    DPTrainer(cfg, ok, path, "capped", PURPOSE, 1).fit(model, x, y)
    with BudgetLedger.open(path) as ledger:
        assert ledger.run("capped", PURPOSE) is not None


def test_person_level_settings_are_validated():
    with pytest.raises(PrivacyError, match="max-merchants-per-person"):
        DPConfig(3.0, max_merchants_per_person=0)
    with pytest.raises(PrivacyError, match="person-epsilon-cap"):
        DPConfig(3.0, person_epsilon_cap=-1.0)
