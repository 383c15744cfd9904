"""The node's privacy-budget ledger: reservation before training, refusal, persistence."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
import torch

from fedretain.models import RetentionNet
from fedretain.privacy.accountant import Accountant, DpEvent, PrivacyError
from fedretain.privacy.budget import BudgetExceeded, BudgetLedger, RunPlan, ledger_path
from fedretain.privacy.dp_trainer import DPConfig, DPTrainer
from fedretain.train import TrainConfig

PURPOSE = "retention_modeling"


def _data(n=640, d=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = np.stack([(rng.random(n) < 1 / (1 + np.exp(-x[:, 0]))).astype(np.float32),
                  np.abs(rng.normal(size=n)).astype(np.float32)], axis=1)
    return x, y


def _dump(path) -> list[str]:
    """Every row of every table: what 'the ledger is unchanged' means."""
    with sqlite3.connect(path) as conn:
        return list(conn.iterdump())


def _trainer(path, run_id, rnd=1, eps=3.0, rounds=1):
    return DPTrainer(TrainConfig(epochs=1, batch_size=64, learning_rate=0.01),
                     DPConfig(target_epsilon=eps, total_rounds=rounds, noise_seed=1), path, run_id, PURPOSE, rnd)


def _plan(run_id, eps=3.0, **kw):
    base = dict(run_id=run_id, purpose=PURPOSE, mode="local", accountant="rdp", epsilon=eps, delta=1e-5,
                noise_multiplier=1.0, sample_rate=0.1, planned_steps=10, n_records=100)
    return RunPlan(**{**base, **kw})


def test_lifetime_4_allows_one_run_at_3_and_refuses_the_second_unchanged(tmp_path):
    path = ledger_path(tmp_path)
    with BudgetLedger.open(path, create=True) as ledger:
        ledger.set_budget(PURPOSE, 4.0)
    x, y = _data()
    model = RetentionNet(x.shape[1])
    first = _trainer(path, "run-1").fit(model, x, y)
    assert 2.9 <= first.extra_metrics["epsilon"] <= 3.0

    before_ledger = _dump(path)
    before_model = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BudgetExceeded, match="only ε=1 of the lifetime budget ε=4 remains"):
        _trainer(path, "run-2").fit(model, x, y)
    assert _dump(path) == before_ledger  # the refused run wrote nothing
    assert all(torch.equal(before_model[k], v) for k, v in model.state_dict().items())  # and trained nothing

    with BudgetLedger.open(path) as ledger:
        [row] = ledger.status()
        assert row["committed_epsilon"] == 3.0 and row["remaining_epsilon"] == 1.0
        assert [r["run_id"] for r in row["runs"]] == ["run-1"]
        assert row["runs"][0]["spent_epsilon"] == pytest.approx(first.extra_metrics["epsilon"])


def test_no_budget_or_no_ledger_fails_closed(tmp_path):
    x, y = _data(100)
    with pytest.raises(PrivacyError, match="privacy ledger not found"):
        _trainer(ledger_path(tmp_path), "r").fit(RetentionNet(x.shape[1]), x, y)
    with BudgetLedger.open(ledger_path(tmp_path), create=True):
        pass
    before = _dump(ledger_path(tmp_path))
    with pytest.raises(BudgetExceeded, match="no lifetime privacy budget"):
        _trainer(ledger_path(tmp_path), "r").fit(RetentionNet(x.shape[1]), x, y)
    assert _dump(ledger_path(tmp_path)) == before


def test_accountant_survives_a_node_restart_and_extra_rounds_are_refused(tmp_path):
    path = ledger_path(tmp_path)
    with BudgetLedger.open(path, create=True) as ledger:
        ledger.set_budget(PURPOSE, 10.0)
    x, y = _data()
    model = RetentionNet(x.shape[1])
    eps = [_trainer(path, "run", rnd, rounds=2).fit(model, x, y).extra_metrics["epsilon"] for rnd in (1, 2)]
    # each round opened the ledger afresh (as a restarted node would): round 2 continued round 1's history
    with BudgetLedger.open(path) as ledger:
        plan = ledger.run("run", PURPOSE)
        acc = ledger.accountant_for("run", PURPOSE)
    assert eps[0] < eps[1] <= 3.0
    assert acc.steps == plan.planned_steps
    fresh = Accountant("rdp", [DpEvent(plan.noise_multiplier, plan.sample_rate, plan.planned_steps)])
    assert eps[1] == pytest.approx(fresh.epsilon(plan.delta))
    before = _dump(path)
    with pytest.raises(BudgetExceeded, match="past the .* planned"):  # a retried / third round
        _trainer(path, "run", 3, rounds=2).fit(model, x, y)
    assert _dump(path) == before


def test_reserve_is_idempotent_per_run_and_refuses_a_changed_mechanism(tmp_path):
    with BudgetLedger.open(ledger_path(tmp_path), create=True) as ledger:
        ledger.set_budget(PURPOSE, 5.0)
        first = ledger.reserve(_plan("a"))
        assert ledger.reserve(_plan("a")) == first
        with pytest.raises(PrivacyError, match="different DP mechanism"):
            ledger.reserve(_plan("a", noise_multiplier=0.5))
        assert ledger.committed(PURPOSE) == (3.0, 1e-5)


def test_one_node_cap_across_purposes_with_sub_limits(tmp_path):
    """Issue 10 point 5: retention, ltv and analytics draw from ONE node-wide cap."""
    with BudgetLedger.open(ledger_path(tmp_path), create=True) as ledger:
        ledger.set_node_cap(5.0, reason="node policy: ε=5 over the node's lifetime")
        ledger.set_budget(PURPOSE, 3.0, reason="retention sub-limit")
        ledger.reserve(_plan("a", eps=3.0))
        with pytest.raises(BudgetExceeded, match="sub-limit for purpose 'retention_modeling'"):
            ledger.reserve(_plan("b", eps=0.5))
        # another purpose training the same model has no separate budget: only what the node cap leaves
        ledger.reserve(_plan("c", purpose="ltv_modeling", eps=1.5))
        before = _dump(ledger_path(tmp_path))
        with pytest.raises(BudgetExceeded, match=r"only ε=0.5 of the lifetime budget ε=5 remains .*every purpose"):
            ledger.reserve(_plan("d", purpose="analytics", eps=1.0))
        assert _dump(ledger_path(tmp_path)) == before
        assert ledger.remaining("analytics") == (pytest.approx(0.5), None)
        assert ledger.committed() == (4.5, pytest.approx(2e-5))
        assert [r["purpose"] for r in ledger.status()] == ["ltv_modeling", PURPOSE]
        assert ledger.report()["node"]["remaining_epsilon"] == pytest.approx(0.5)


def test_node_delta_cap_is_enforced(tmp_path):
    with BudgetLedger.open(ledger_path(tmp_path), create=True) as ledger:
        ledger.set_budget(PURPOSE, 100.0, delta=1.5e-5)  # the first budget also becomes the node cap
        assert ledger.node_cap().delta == 1.5e-5
        ledger.reserve(_plan("a", eps=1.0))
        with pytest.raises(BudgetExceeded, match="past the lifetime budget δ"):
            ledger.reserve(_plan("b", eps=1.0, purpose="ltv_modeling"))


def test_raising_a_cap_is_a_signed_reasoned_event(tmp_path):
    from fedretain.consent import signing
    from fedretain.privacy.budget_store import cap_event_bytes

    with BudgetLedger.open(ledger_path(tmp_path), create=True) as ledger:
        ledger.set_node_cap(3.0, reason="initial policy")
        with pytest.raises(PrivacyError, match="needs a reason"):
            ledger.set_node_cap(8.0)
        with pytest.raises(PrivacyError, match="needs a reason"):
            ledger.set_node_cap(3.0, delta=1e-6)  # lowering δ is fine...
            ledger.set_node_cap(3.0)  # ...removing the δ limit is a raise
        ledger.set_node_cap(2.0, delta=1e-6)  # lowering needs no reason
        ledger.set_node_cap(8.0, reason="DPO approved a second model family, ticket 42")
        events = ledger.cap_events()
    assert [(e["scope"], e["kind"], e["epsilon"]) for e in events] == [
        ("node", "initial", 3.0), ("node", "lower", 3.0), ("node", "lower", 2.0), ("node", "raise", 8.0)]
    raise_ = events[-1]
    assert raise_["reason"] == "DPO approved a second model family, ticket 42" and raise_["previous_epsilon"] == 2.0
    key = signing.load_private_key(tmp_path / "node_key.pem").public_key()
    row = {"seq": 4, "purpose": "*", "epsilon": 8.0, "delta": None, "set_at": raise_["set_at"],
           "note": raise_["reason"], "previous_epsilon": 2.0, "previous_delta": None,
           "key_fingerprint": raise_["key_fingerprint"]}
    row["previous_delta"] = 1e-6
    assert signing.verify_signature(key, bytes.fromhex(raise_["signature"]), cap_event_bytes(row))
    assert not signing.verify_signature(key, bytes.fromhex(raise_["signature"]),
                                        cap_event_bytes({**row, "epsilon": 80.0}))


def test_ledger_is_append_only(tmp_path):
    with BudgetLedger.open(ledger_path(tmp_path), create=True) as ledger:
        ledger.set_budget(PURPOSE, 5.0)
        ledger.reserve(_plan("a"))
    conn = sqlite3.connect(ledger_path(tmp_path))
    for sql in ("UPDATE runs SET epsilon = 0.1", "DELETE FROM runs", "UPDATE budgets SET epsilon = 99",
                "DELETE FROM budgets"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute(sql)
    conn.close()


def test_spend_beyond_reservation_is_refused(tmp_path):
    with BudgetLedger.open(ledger_path(tmp_path), create=True) as ledger:
        ledger.set_budget(PURPOSE, 5.0)
        plan = ledger.reserve(_plan("a", eps=1.0))
        acc = Accountant("rdp", [DpEvent(plan.noise_multiplier, plan.sample_rate, 10_000)])
        with pytest.raises(BudgetExceeded, match="more than its reservation"):
            ledger.record_spend("a", PURPOSE, 1, 10_000, acc)
        assert ledger.spends("a") == []


def test_unknown_purpose_and_bad_values_are_refused(tmp_path):
    with BudgetLedger.open(ledger_path(tmp_path), create=True) as ledger:
        with pytest.raises(ValueError, match="unknown purpose"):
            ledger.set_budget("marketing", 1.0)
        with pytest.raises(PrivacyError):
            ledger.set_budget(PURPOSE, -1.0)
        with pytest.raises(PrivacyError):
            ledger.set_budget(PURPOSE, 1.0, delta=2.0)


def test_a_foreign_file_is_not_taken_for_a_ledger(tmp_path):
    bad = tmp_path / "privacy.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(PrivacyError, match="unreadable privacy ledger"):
        BudgetLedger.open(bad)


_V1_TRIGGERS = "".join(
    f"CREATE TRIGGER {t}_no_{op.lower()} BEFORE {op} ON {t} BEGIN SELECT RAISE(ABORT, 'append-only'); END;"
    for t in ("budgets", "runs", "spends") for op in ("UPDATE", "DELETE"))


def test_a_version_1_ledger_is_migrated_once_with_a_node_cap_equal_to_its_budgets(tmp_path):
    """A file written by the per-purpose ledger (no user_version, no chain) opens as version 2."""
    from fedretain.consent import signing
    from fedretain.privacy.budget_store import _V1_SCHEMA, VERSION

    signing.load_or_create_key(tmp_path / "node_key.pem")  # the node's key (made with its consent ledger)
    path = ledger_path(tmp_path)
    conn = sqlite3.connect(path)
    conn.executescript(_V1_SCHEMA + _V1_TRIGGERS)
    conn.execute("INSERT INTO meta VALUES ('format', 'fedretain-privacy-ledger/1')")
    conn.execute("INSERT INTO budgets (purpose, epsilon, delta, set_at, note) VALUES "
                 "('retention_modeling', 3.0, NULL, '2026-01-01T00:00:00+00:00', 'set at provisioning')")
    conn.execute("INSERT INTO budgets (purpose, epsilon, delta, set_at, note) VALUES "
                 "('analytics', 2.0, NULL, '2026-01-02T00:00:00+00:00', '')")
    conn.execute("INSERT INTO runs VALUES ('old-run', 'retention_modeling', 'local', 'rdp', 2.5, 1e-5, 1.1, 0.1, "
                 "10, 100, '2026-01-03T00:00:00+00:00')")
    conn.commit()
    conn.close()
    with BudgetLedger.open(path) as ledger:
        assert ledger.node_cap().epsilon == 5.0 and "migrated from per-purpose budgets" in ledger.node_cap().note
        assert ledger.run("old-run", PURPOSE).epsilon == 2.5
        assert ledger.remaining(PURPOSE) == (0.5, None)  # the old sub-limit still holds
        assert ledger.remaining("analytics") == (2.0, None)
        assert ledger.size == 4  # two budgets, one run, the node cap event: all chained and signed
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == VERSION
    with BudgetLedger.open(path) as ledger:  # a second open does not migrate again
        assert ledger.size == 4
