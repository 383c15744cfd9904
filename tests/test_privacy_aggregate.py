"""Aggregate mode without Flower: plan, node contribution, node-side refusals, server step."""

from __future__ import annotations

import dataclasses
import sqlite3

import numpy as np
import pytest
import torch

from fedretain.models import RetentionLoss, RetentionNet
from fedretain.privacy.accountant import DpEvent, PrivacyError, independent_epsilon
from fedretain.privacy.aggregate import (
    AggregatePlan,
    ServerDPSGD,
    contribute,
    node_contribution,
    plan_aggregate,
)
from fedretain.privacy.budget import BudgetExceeded, BudgetLedger, ledger_path
from fedretain.privacy.dp_trainer import secure_generator

PURPOSE = "retention_modeling"


def _xy(n=400, d=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32) * 2
    y = np.stack([(rng.random(n) < 0.3).astype(np.float32), np.abs(rng.normal(size=n)).astype(np.float32) * 3], 1)
    return x, y


def _dump(path):
    with sqlite3.connect(path) as conn:
        return list(conn.iterdump())


@pytest.fixture(scope="module")
def plan():
    return plan_aggregate(3.0, 0.0, n_total=4000, expected_batch=400, rounds=20, max_grad_norm=1.0)


def test_plan_spends_at_most_the_target_and_round_trips(plan):
    assert plan.sample_rate == pytest.approx(0.1) and plan.delta < 1 / 4000
    eps = independent_epsilon([DpEvent(plan.noise_multiplier, plan.sample_rate, plan.rounds)], plan.delta)
    assert 2.95 <= eps <= 3.0
    assert AggregatePlan.from_config(plan.to_config()) == plan
    # one record moves the securely summed vector by at most C + S·Δ·√D
    assert plan.sensitivity(1000) == pytest.approx(1.0 + plan.scale * (16 / 2**22) * np.sqrt(1000))
    with pytest.raises(PrivacyError, match="lacks"):
        AggregatePlan.from_config({})


def test_contribution_is_the_clipped_sum_scaled_and_clamped():
    x, y = _xy(50)
    full = dataclasses.replace(plan_aggregate(3.0, 0.0, 50, 50, 5, max_grad_norm=0.5), scale=0.01)
    assert full.sample_rate == 1.0  # everyone is sampled: compare with the exact clipped sum
    model = RetentionNet(x.shape[1], (8,))
    got = node_contribution(model, x, y, full, secure_generator(0))
    ref = RetentionNet(x.shape[1], (8,))
    ref.load_state_dict(model.state_dict())
    total = [torch.zeros_like(p) for p in ref.parameters()]
    for i in range(len(x)):  # per-example gradients the slow, obvious way
        ref.zero_grad()
        RetentionLoss()(ref(torch.as_tensor(x[i:i + 1])), torch.as_tensor(y[i:i + 1])).backward()
        g = [p.grad.clone() for p in ref.parameters()]
        norm = torch.sqrt(sum((t ** 2).sum() for t in g))
        for t, gi in zip(total, g):
            t += gi * min(1.0, 0.5 / (norm.item() + 1e-6))
    for a, t in zip(got, total):
        np.testing.assert_allclose(a, np.clip(t.numpy() / 0.01, -8, 8), rtol=1e-4, atol=1e-4)
    assert max(np.abs(a).max() for a in got) == 8.0  # the tiny scale made some coordinates clamp


def test_node_refuses_a_plan_with_too_little_noise_and_writes_nothing(tmp_path, plan):
    path = ledger_path(tmp_path)
    with BudgetLedger.open(path, create=True) as ledger:
        ledger.set_budget(PURPOSE, 10.0)
    before = _dump(path)
    weak = dataclasses.replace(plan, noise_multiplier=plan.noise_multiplier / 2)
    x, y = _xy()
    with pytest.raises(PrivacyError, match="spends ε="):
        contribute(path, "r", PURPOSE, 1, weak, RetentionNet(x.shape[1]), x, y)
    assert _dump(path) == before


def test_node_accounts_each_round_and_refuses_extra_rounds(tmp_path):
    small = plan_aggregate(3.0, 0.0, n_total=4000, expected_batch=400, rounds=2, max_grad_norm=1.0)
    path = ledger_path(tmp_path)
    with BudgetLedger.open(path, create=True) as ledger:
        ledger.set_budget(PURPOSE, 3.0)
    x, y = _xy()
    eps = [contribute(path, "r", PURPOSE, rnd, small, RetentionNet(x.shape[1]), x, y)[1]["epsilon"] for rnd in (1, 2)]
    assert 0 < eps[0] < eps[1] <= 3.0
    with pytest.raises(BudgetExceeded, match="already took its 2"):
        contribute(path, "r", PURPOSE, 3, small, RetentionNet(x.shape[1]), x, y)
    with pytest.raises(BudgetExceeded, match="remains"):  # lifetime ε=3 is used up by run "r"
        contribute(path, "r2", PURPOSE, 1, small, RetentionNet(x.shape[1]), x, y)


def test_server_step_moves_the_model_and_stops_after_the_planned_rounds():
    small = plan_aggregate(3.0, 0.0, n_total=4000, expected_batch=400, rounds=2, max_grad_norm=1.0)
    model = RetentionNet(5)
    before = [p.detach().clone() for p in model.parameters()]
    server = ServerDPSGD(model, small, learning_rate=0.01, noise_seed=0)
    zeros = [np.zeros(tuple(p.shape)) for p in model.parameters()]
    e1 = server.step(zeros)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))  # noise alone moves it
    e2 = server.step(zeros)
    assert 0 < e1 < e2 <= 3.0
    with pytest.raises(BudgetExceeded):
        server.step(zeros)
    with pytest.raises(PrivacyError, match="does not match"):
        ServerDPSGD(RetentionNet(5), small, 0.01).step(zeros[:-1])


def test_a_step_from_the_secagg_mean_equals_a_step_from_the_sum():
    """The ServerApp gets SecAgg+'s mean of weight-1 vectors; × contributors must be exactly the summed step."""
    small = plan_aggregate(3.0, 0.0, n_total=4000, expected_batch=400, rounds=2, max_grad_norm=1.0)
    rng = np.random.default_rng(3)
    torch.manual_seed(0)
    a, b = RetentionNet(5, (4,)), RetentionNet(5, (4,))
    b.load_state_dict(a.state_dict())
    vectors = [[rng.normal(size=tuple(p.shape)) for p in a.parameters()] for _ in range(3)]
    summed = [sum(parts) for parts in zip(*vectors)]
    e_sum = ServerDPSGD(a, small, 0.01, noise_seed=7).step(summed)
    e_mean = ServerDPSGD(b, small, 0.01, noise_seed=7).step_mean([s / 3 for s in summed], 3)
    assert e_sum == e_mean
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)
    with pytest.raises(PrivacyError, match="no merchant"):
        ServerDPSGD(RetentionNet(5), small, 0.01).step_mean(summed, 0)


def test_aggregate_mode_trains_a_logistic_regression_on_rare_positives(tmp_path):
    """Small merchants, 5 % positives: one noisy step per round on the pooled clipped sum still learns."""
    from fedretain.metrics import roc_auc
    from fedretain.models import make_model
    from fedretain.train import predict

    rng = np.random.default_rng(0)
    n, d = 4000, 5
    x = rng.normal(size=(n, d)).astype(np.float32)
    logit = np.log(0.05 / 0.95) + 1.5 * x[:, 0] - 0.8 * x[:, 1]
    y = np.stack([(rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32), np.zeros(n, np.float32)], 1)
    shards = np.array_split(np.arange(n), 16)  # 16 merchants of 250 customers
    plan = plan_aggregate(3.0, 0.0, n_total=n, expected_batch=1000, rounds=8, max_grad_norm=5.0)
    model = make_model("logreg", d, prior_rate=0.05)
    server = ServerDPSGD(model, plan, learning_rate=0.2, noise_seed=1)
    ledgers = []
    for i in range(len(shards)):
        ledgers.append(ledger_path(tmp_path / f"m{i}"))
        with BudgetLedger.open(ledgers[-1], create=True) as ledger:
            ledger.set_budget(PURPOSE, 3.0)
    for rnd in range(1, plan.rounds + 1):
        parts = [contribute(ledgers[i], "agg", PURPOSE, rnd, plan, model, x[s], y[s], noise_seed=rnd * 1000 + i)[0]
                 for i, s in enumerate(shards)]
        server.step_mean([sum(p) / len(parts) for p in zip(*parts)], len(parts))
    assert roc_auc(y[:, 0], predict(model, x)[0]) > 0.8
