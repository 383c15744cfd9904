"""Simulation plumbing without starting Ray: worker priority defaults and the merchants-done observer."""

from __future__ import annotations

from fedretain.server.progress import MerchantsDone, add_observer, notify, remove_observer
from fedretain.server.simulation import WORKER_NICENESS_ENV, simulation_env


def test_workers_run_at_the_drivers_priority_unless_the_user_chose_otherwise():
    env: dict[str, str] = {}
    simulation_env(env)
    assert env[WORKER_NICENESS_ENV] == "0"  # not Ray's default nice 15, which starves nodes on a busy machine
    chosen = {WORKER_NICENESS_ENV: "10", "FLWR_TELEMETRY_ENABLED": "1"}
    simulation_env(chosen)
    assert chosen[WORKER_NICENESS_ENV] == "10" and chosen["FLWR_TELEMETRY_ENABLED"] == "1"


def test_merchants_done_counts_trained_and_failed_nodes_per_round(capsys):
    obs = MerchantsDone(total=3, echo=True)
    add_observer(obs)
    try:
        nodes = [{"merchant_id": "a", "phase": "train", "error": ""},
                 {"merchant_id": "b", "phase": "train", "error": "no consented training examples"},
                 {"merchant_id": "c", "phase": "train", "error": ""},
                 {"merchant_id": "c", "phase": "evaluate", "error": ""}]
        notify("on_round_trained", {"round": 2, "nodes": nodes})
    finally:
        remove_observer(obs)
    assert obs.done_per_round == {2: 2} and obs.failed_per_round == {2: 1}
    assert "round 2: 2/3 merchants trained (1 failed)" in capsys.readouterr().out
