"""Model choice on the merchants' validation users, federated (``--model auto``, ``--refit``; issue 12)."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from fedretain.server.settings import RunSettings


def _prep(synth_silos):
    from fedretain.clients.node import MerchantNode, NodeConfig

    node = MerchantNode(NodeConfig.for_silo(synth_silos[0]))
    return node, node.prepare("retention_modeling", list(RunSettings().features))


def test_selection_view_never_shows_the_test_users(synth_silos):
    from fedretain.clients.node import data_view

    node, prep = _prep(synth_silos)
    sel = data_view(prep, node.merchant_id, "selection", 0.25)
    final = data_view(prep, node.merchant_id, "train-minus-validation", 0.25)
    assert data_view(prep, node.merchant_id, "", 0.25) is prep  # refit / no selection: every non-test user
    test = set(prep.test_users)
    assert not (set(sel.train_users) | set(sel.test_users)) & test  # candidates never see the test users
    assert not set(sel.train_users) & set(sel.test_users)
    assert set(sel.train_users) | set(sel.test_users) == set(prep.train_users)
    assert abs(len(sel.test_users) / prep.n_train - 0.25) < 0.05 and len(sel.x_test) == len(sel.test_users)
    # without refit the final model trains on the candidates' users and is tested on the test users
    assert list(final.train_users) == list(sel.train_users) and list(final.test_users) == list(prep.test_users)
    again = data_view(prep, node.merchant_id, "selection", 0.25)
    assert list(again.test_users) == list(sel.test_users)  # the same validation users every round
    with pytest.raises(ValueError, match="unknown data-view"):
        data_view(prep, node.merchant_id, "test", 0.25)


def test_best_candidate_is_the_highest_pooled_validation_auc():
    from fedretain.server.selection import best_of, candidates

    s = RunSettings(model="auto", selection_learning_rates=(0.01, 0.03))
    grid = candidates(s)
    assert [(c["model"], c["learning_rate"]) for c in grid] == [("logreg", 0.01), ("logreg", 0.03), ("mlp", 0.01),
                                                                ("mlp", 0.03)]
    assert grid[0]["hidden"] == [] and grid[2]["hidden"] == [64, 32]
    results = [{**c, "validation": {"auc": a, "log_loss": 0.5}} for c, a in zip(grid, (0.70, 0.71, 0.74, math.nan))]
    assert best_of(results)["model"] == "mlp" and best_of(results)["learning_rate"] == 0.01
    tie = [{**c, "validation": {"auc": 0.7, "log_loss": ll}} for c, ll in zip(grid, (0.52, 0.50, 0.50, 0.6))]
    assert (best_of(tie)["model"], best_of(tie)["learning_rate"]) == ("logreg", 0.03)  # then the simpler model


def test_model_auto_is_refused_where_it_would_spend_budget():
    with pytest.raises(ValueError, match="model auto .* DP mode"):
        RunSettings(model="auto", dp_mode="local")
    with pytest.raises(ValueError, match="refit applies after model selection"):
        RunSettings(model="mlp", refit=True)
    with pytest.raises(ValueError, match="validation-fraction .* strictly between 0 and 1"):
        RunSettings(model="auto", validation_fraction=1.0)
    s = RunSettings.from_run_config({"model": "auto", "refit": "true", "selection-learning-rates": "0.01,0.05"})
    assert s.refit is True and s.selection_learning_rates == (0.01, 0.05) and s.hidden == (64, 32)
    assert RunSettings.from_run_config(s.to_run_config()).selection_learning_rates == (0.01, 0.05)


@pytest.mark.heavy
def test_model_auto_compares_candidates_on_validation_users_then_refits(tmp_path, synth_silos):
    from fedretain.server.simulation import run_in_simulation

    data = tmp_path / "silos"
    shutil.copytree(synth_silos[0].parent, data)
    s = RunSettings(model="auto", refit=True, rounds=1, selection_rounds=1, local_epochs=1, min_nodes=3,
                    out_dir=str(tmp_path / "run"), run_id="sel", features=("recency_days", "frequency"),
                    hidden=(8,))
    rec = json.loads((run_in_simulation(s, data) / "run.json").read_text())
    assert rec["status"] == "completed"
    sel = rec["model_selection"]
    assert [c["model"] for c in sel["candidates"]] == ["logreg", "mlp"] and sel["refit"] is True
    for c in sel["candidates"]:
        assert c["nodes"] == 3 and 0.0 <= c["validation"]["auc"] <= 1.0
        assert c["validation"]["auc-low"] <= c["validation"]["auc"] <= c["validation"]["auc-high"]
    best = max(sel["candidates"], key=lambda c: c["validation"]["auc"])
    assert sel["chosen"]["model"] == best["model"] == rec["config"]["model"]
    assert rec["config"]["model_requested"] == "auto" and rec["config"]["refit"] is True
    # the candidates were compared on validation users (20% of the 70% training share), not on the test users
    validation = sel["candidates"][0]["validation"]["num-examples"]
    assert 0 < validation < rec["rounds"][-1]["evaluate"]["num-examples"]
    from fedretain.clients.node import MerchantNode, NodeConfig

    node = MerchantNode(NodeConfig.for_silo(data / synth_silos[0].name))
    with node.ledger() as ledger:  # the selection's reads are on record, under their own run id
        runs = {u.run_id for u in ledger.usages()}
    assert {"sel", "sel.select"} <= runs


def test_simulate_prints_the_comparison():
    from rich.console import Console

    from fedretain.cli.train import selection_table

    sel = {"selection_rounds": 2, "final_training_users": "all non-test users", "refit": True,
           "chosen": {"model": "mlp", "hidden": [64, 32], "learning_rate": 0.01},
           "candidates": [{"model": "logreg", "learning_rate": 0.01, "validation": {"auc": 0.7, "auc-low": 0.68,
                                                                                  "auc-high": 0.72, "log_loss": 0.5}},
                          {"model": "mlp", "learning_rate": 0.01, "validation": {"auc": 0.75, "log_loss": 0.45}}]}
    out = Console(record=True, width=160)
    out.print(selection_table(sel))
    text = out.export_text()
    assert "[0.680, 0.720]" in text and "0.7500" in text
    assert [line for line in text.splitlines() if "✓" in line][0].lstrip("│ ").startswith("mlp")
