"""Privacy modes end to end in Flower's Simulation Engine (Ray): local DP-SGD, central DP
(Flower's server-side wrapper) and aggregate mode under SecAgg+ (legacy workflow)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from fedretain.privacy.schedule import local_batch_size

pytestmark = pytest.mark.heavy

PURPOSE = "retention_modeling"


@pytest.fixture()
def silos(tmp_path, synth_silos):
    """Private copies of the shared synthetic silos, each with a lifetime budget of ε=10."""
    from fedretain.privacy.budget import BudgetLedger, ledger_path

    data = tmp_path / "silos"
    shutil.copytree(synth_silos[0].parent, data)
    out = sorted(p for p in data.iterdir() if p.is_dir())
    for silo in out:
        with BudgetLedger.open(ledger_path(silo / ".node"), create=True) as ledger:
            ledger.set_budget(PURPOSE, 10.0)
    return out


def _settings(tmp_path, **kw):
    from fedretain.server.settings import RunSettings

    base = dict(rounds=2, local_epochs=1, batch_size=128, out_dir=str(tmp_path / "run"), min_nodes=3,
                features=("recency_days", "frequency", "monetary_total", "views_30d"), hidden=(16, 8))
    return RunSettings(**{**base, **kw})


def _record(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def _train_nodes(entry):
    return [n for n in entry["nodes"] if n["phase"] == "train"]


def _ledger_rows(silo: Path, run_id: str):
    from fedretain.privacy.budget import BudgetLedger, ledger_path

    with BudgetLedger.open(ledger_path(silo / ".node")) as ledger:
        return ledger.run(run_id, PURPOSE), ledger.spends(run_id, PURPOSE)


def test_local_dp_reports_epsilon_per_round_and_records_it_on_each_node(tmp_path, silos):
    from fedretain.server.simulation import run_in_simulation

    s = _settings(tmp_path, dp_mode="local", target_epsilon=3.0, run_id="local-dp", dp_schedule="auto")
    rec = _record(run_in_simulation(s, silos[0].parent))
    assert rec["status"] == "completed" and [r["round"] for r in rec["rounds"]] == [1, 2]
    assert rec["dp_schedule"]["schedule"] == "auto" and "does not send" in rec["dp_schedule"]["chosen_by"]
    eps = {}
    for entry in rec["rounds"]:
        nodes = _train_nodes(entry)
        assert len(nodes) == 3 and all(n["error"] is None for n in nodes)
        for n in nodes:
            eps.setdefault(n["merchant_id"], []).append(n["epsilon"])
    for merchant, (e1, e2) in eps.items():
        assert 0 < e1 < e2 <= 3.0
        assert rec["merchants"][merchant]["epsilon_spent"] == e2
    for silo in silos:
        plan, spends = _ledger_rows(silo, "local-dp")
        assert plan.mode == "local" and [sp.round for sp in spends] == [1, 2]
        # each node sized its batch from its own training users (dp-schedule auto), not the run's batch-size
        assert plan.sample_rate == pytest.approx(1 / math.ceil(plan.n_records / local_batch_size(plan.n_records)))
        assert spends[-1].epsilon == pytest.approx(eps[silo.name][-1])


def test_central_dp_runs_with_flowers_wrapper_and_accounts(tmp_path, silos):
    from fedretain.server.simulation import run_in_simulation

    s = _settings(tmp_path, dp_mode="central", target_epsilon=3.0, max_grad_norm=0.5, run_id="central")
    rec = _record(run_in_simulation(s, silos[0].parent))
    assert rec["status"] == "completed"
    eps = [r["train"]["central-epsilon"] for r in rec["rounds"]]
    assert 0 < eps[0] < eps[1] <= 3.0 * (1 + 1e-6)
    assert all(r["train"]["central-noise-multiplier"] > 1 for r in rec["rounds"])
    for entry in rec["rounds"]:
        assert all(n["metrics"]["dp-weight"] == 1.0 for n in _train_nodes(entry))
    assert 0.0 <= rec["rounds"][-1]["evaluate"]["auc"] <= 1.0  # DP runs evaluate the final model only


def test_aggregate_mode_under_secagg_plus(tmp_path, silos):
    from fedretain.server.secagg import run_secagg_simulation

    s = _settings(tmp_path, dp_mode="aggregate", target_epsilon=3.0, rounds=3, run_id="agg",
                  extra={"aggregate-batch-size": 600, "server-learning-rate": 0.05, "aggregate-population": 3000})
    rec = _record(run_secagg_simulation(s, silos[0].parent))
    assert rec["status"] == "completed" and [r["round"] for r in rec["rounds"]] == [1, 2, 3]
    plan = rec["aggregate_plan"]
    chosen = rec["dp_schedule"]  # what was chosen and by whom (dp-schedule fixed: the operator's numbers)
    assert (chosen["rounds"], chosen["expected_batch"], chosen["rounds_chosen_by"]) == (3, 600, "operator")
    assert chosen["sample_rate"] == plan["agg-sample-rate"] == pytest.approx(0.2)
    server_eps = [r["train"]["aggregate-epsilon"] for r in rec["rounds"]]
    assert server_eps == sorted(server_eps) and server_eps[-1] <= 3.0
    for entry, e in zip(rec["rounds"], server_eps):
        nodes = _train_nodes(entry)
        assert len(nodes) == 3 and entry["train"]["contributors"] == 3
        assert all(n["epsilon"] == pytest.approx(e) for n in nodes)  # every node accounts the same mechanism
        assert all(n["num_examples"] == 1 for n in nodes)  # batch sizes are not released
    for silo in silos:
        stored, spends = _ledger_rows(silo, "agg")
        assert stored.mode == "aggregate" and stored.noise_multiplier == pytest.approx(plan["agg-noise-multiplier"])
        assert [sp.total_steps for sp in spends] == [1, 2, 3]
    assert (Path(s.out_dir) / "model.pt").is_file()
    _assert_delivered_and_scorable(rec, Path(s.out_dir), silos, "agg", tmp_path)


def _assert_delivered_and_scorable(rec: dict, run_dir: Path, silos: list[Path], run_id: str, tmp_path: Path) -> None:
    """Every node got the final model (the hash in run.json) under SecAgg+ too, and scores with it."""
    import hashlib

    import pandas as pd
    from click.testing import CliRunner

    from fedretain.cli.train import score

    final = hashlib.sha256((run_dir / "model.pt").read_bytes()).hexdigest()
    assert rec["rounds"][-1]["model_sha256"] == final
    delivery = rec["delivery"]
    assert delivery["model_sha256"] == final and delivery["round"] == rec["rounds"][-1]["round"]
    assert sorted(n["merchant_id"] for n in delivery["nodes"] if n["acknowledged"]) == sorted(p.name for p in silos)
    assert all(n["model_sha256"] == final and n["error"] is None for n in delivery["nodes"])
    for silo in silos:
        models = silo / ".node" / "models"
        assert hashlib.sha256((models / "latest.pt").read_bytes()).hexdigest() == final
        assert (models / f"{run_id}.pt").read_bytes() == (models / "latest.pt").read_bytes()
        joining = json.loads((models / f"{run_id}.joining.json").read_text())  # computed there, never sent
        assert joining["merchant"] == silo.name and set(joining["log_loss"]) == {"local", "global", "personalised"}
        out = tmp_path / f"scores-{silo.name}.csv"
        res = CliRunner().invoke(score, ["--silo", str(silo), "--out", str(out)])  # the delivered model, by default
        assert res.exit_code == 0, res.output
        assert len(pd.read_csv(out)) > 0


def test_local_dp_models_summed_under_secagg_plus(tmp_path, silos):
    """SecAgg+ FedAvg: the server gets only the weighted mean of the nodes' DP-SGD models."""
    import torch

    from fedretain.models import ModelBundle
    from fedretain.server.secagg import run_secagg_simulation

    s = _settings(tmp_path, dp_mode="local", target_epsilon=3.0, run_id="secagg-local")
    rec = _record(run_secagg_simulation(s, silos[0].parent))
    assert rec["status"] == "completed" and rec["config"]["secure_aggregation"] == "secagg+"
    for entry in rec["rounds"]:
        nodes = _train_nodes(entry)
        assert len(nodes) == 3 and all(0 < n["epsilon"] <= 3.0 for n in nodes)
    final = rec["rounds"][-1]["evaluate"]  # DP runs evaluate the final model only (a noisy histogram)
    assert final["hist-noise-sd"] > 0
    if "auc-status" in final:  # tiny test silos: the noise can make a class total negative; then nothing is published
        assert final["auc-status"].startswith("suppressed") and "auc" not in final
    else:
        assert final["num-examples"] > 0 and final["auc-low"] <= final["auc"] <= final["auc-high"]
    first, last = (ModelBundle.load(Path(r["checkpoint"])).state_dict for r in rec["rounds"])
    assert any(not torch.equal(first[k], last[k]) for k in first)
    for silo in silos:
        plan, spends = _ledger_rows(silo, "secagg-local")
        assert plan.mode == "local" and len(spends) == 2
