"""End of a run: a failed node wait ends the run record as failed; the final model reaches the nodes.

The full path (server sends, every node verifies and saves, ``score --silo`` uses it) runs in
tests/test_simulation.py; here the node's checks are attacked directly.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from fedretain.clients.delivery import DeliveryError, latest_model, save_delivery
from fedretain.clients.node import NodeConfig
from fedretain.server.delivery import delivery_config, participants
from fedretain.server.federation import FederatedTraining, RunAborted, sha256_file
from fedretain.server.run_progress import run_progress
from fedretain.server.run_record import RunRecord
from fedretain.server.settings import RunSettings
from fedretain.server.strategies import build_strategy


class EmptyGrid:
    """The transport of a platform no merchant connected to (Flower's Grid surface the loop uses)."""

    def get_node_ids(self) -> list[int]:
        return []

    def push_messages(self, messages):  # pragma: no cover - nothing is ever sent without nodes
        raise AssertionError("no message may be sent without nodes")

    def pull_messages(self, ids):  # pragma: no cover
        return []


def test_too_few_merchants_ends_the_run_failed_with_the_reason(tmp_path):
    settings = RunSettings(rounds=2, min_nodes=2, node_wait_timeout=0.2, out_dir=str(tmp_path / "run"),
                           run_id="lonely")
    with pytest.raises(RunAborted, match="only 0 merchant node"):
        FederatedTraining(EmptyGrid(), settings, build_strategy(settings)).run()
    rec = json.loads((tmp_path / "run" / "run.json").read_text())
    assert rec["status"] == "failed"
    assert "only 0 merchant node(s) connected" in rec["error"] and "at least 2" in rec["error"]
    assert "waiting_for_nodes" in [e["kind"] for e in rec["events"]]
    shown = run_progress(tmp_path / "run")  # what `server status` and `server wait` print
    assert shown["status"] == "failed" and "at least 2" in shown["error"]


def test_a_budget_split_error_also_ends_the_run_failed(tmp_path):
    settings = RunSettings(dp_mode="local", target_epsilon=1.0, out_dir=str(tmp_path / "run"), run_id="badeps",
                           extra={"eval-epsilon": 5.0})
    with pytest.raises(ValueError, match="eval-epsilon"):
        FederatedTraining(EmptyGrid(), settings, build_strategy(settings)).run()
    rec = json.loads((tmp_path / "run" / "run.json").read_text())
    assert rec["status"] == "failed" and "eval-epsilon" in rec["error"]


@pytest.fixture()
def final_model(tmp_path):
    """A run's final model file as the server writes it (round 3 checkpoint, copied to model.pt)."""
    from fedretain.models import make_model
    from fedretain.protocol import model_arrays
    from fedretain.server.checkpoints import save_checkpoint

    settings = RunSettings(rounds=3, out_dir=str(tmp_path / "run"), run_id="run-a")
    run = FederatedTraining(EmptyGrid(), settings, build_strategy(settings))
    model = make_model(settings.model, len(run.columns), settings.hidden)
    ckpt = save_checkpoint(run.out_dir, 3, run.bundle(model_arrays(model.state_dict()), run.input_transform(), 3))
    return settings, run.out_dir / "model.pt", ckpt


def test_node_saves_the_verified_model_as_its_latest(final_model, tmp_path, synth_silos):
    settings, model_file, ckpt = final_model
    digest = sha256_file(model_file)
    assert digest == sha256_file(ckpt)  # model.pt is the last round's checkpoint byte for byte
    config = NodeConfig.for_silo(synth_silos[0], state_dir=tmp_path / "node")
    path, got, run_id, rnd = save_delivery(config, delivery_config(model_file, digest, settings))
    assert (got, run_id, rnd) == (digest, "run-a", 3)
    assert path == tmp_path / "node" / "models" / "run-a.pt"
    latest = latest_model(config.state_dir)
    assert hashlib.sha256(latest.read_bytes()).hexdigest() == digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not [p for p in path.parent.iterdir() if p.suffix == ".tmp"]


def _attacked(cfg, **changes):
    from flwr.app import ConfigRecord

    return ConfigRecord({**dict(cfg), **changes})


def test_node_refuses_a_tampered_or_mislabelled_model_and_keeps_its_copy(final_model, tmp_path, synth_silos):
    settings, model_file, _ = final_model
    digest = sha256_file(model_file)
    config = NodeConfig.for_silo(synth_silos[0], state_dir=tmp_path / "node")
    cfg = delivery_config(model_file, digest, settings)
    save_delivery(config, cfg)
    before = latest_model(config.state_dir).read_bytes()

    # an attacker on the way flips one byte of the file but keeps the stated hash
    data = bytearray(cfg["model-file"])
    data[len(data) // 2] ^= 0xFF
    with pytest.raises(DeliveryError, match="differs from the stated"):
        save_delivery(config, _attacked(cfg, **{"model-file": bytes(data)}))
    # ... or sends something that is not a model at all, with its matching hash
    junk = b"#!/bin/sh\nrm -rf ~\n"
    with pytest.raises(DeliveryError, match="not usable"):
        save_delivery(config, _attacked(cfg, **{"model-file": junk, "model-sha256": hashlib.sha256(junk).hexdigest()}))
    # replays this run's model as another run's, or under other features
    with pytest.raises(DeliveryError, match="run id 'run-a' \\(stated 'run-b'\\)"):
        save_delivery(config, _attacked(cfg, **{"run-id": "run-b"}))
    with pytest.raises(DeliveryError, match="features"):
        save_delivery(config, _attacked(cfg, features=["recency_days"]))
    with pytest.raises(DeliveryError, match="round"):
        save_delivery(config, _attacked(cfg, **{"server-round": 1}))
    # a run id that would write outside the models folder
    with pytest.raises(DeliveryError, match="not a valid file name"):
        save_delivery(config, _attacked(cfg, **{"run-id": "../../consent"}))
    assert latest_model(config.state_dir).read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "node" / "models").iterdir()) == ["latest.pt", "run-a.pt"]
    assert not (tmp_path / "node" / "models" / "run-b.pt").exists()


def test_participants_are_the_nodes_that_trained(tmp_path):
    rec = RunRecord.create(tmp_path, "r", {})
    rec.add_round({"round": 1, "nodes": [
        {"node_id": 7, "merchant_id": "m7", "phase": "train", "error": None},
        {"node_id": 8, "merchant_id": "m8", "phase": "train", "error": "boom"},
        {"node_id": 9, "merchant_id": "m9", "phase": "evaluate", "error": None}]})
    assert participants(rec) == {7: "m7"}



def test_aggregate_plan_over_the_person_cap_fails_the_run_and_the_table_is_recorded(tmp_path):
    from fedretain.privacy.aggregate import plan_aggregate
    from fedretain.privacy.person import PersonCapExceeded
    from fedretain.server.secagg import aggregate_person_level

    settings = RunSettings(dp_mode="aggregate", rounds=5, target_epsilon=3.0, out_dir=str(tmp_path), run_id="agg",
                           max_merchants_per_person=5, person_epsilon_cap=1e6)
    plan = plan_aggregate(2.7, 0.0, 20000, 512.0, settings.rounds, settings.max_grad_norm, "rdp")
    shown = aggregate_person_level(plan, settings, 20000)
    assert [r["k"] for r in shown["table"]] == [1, 2, 5]
    assert shown["table"][0]["person_epsilon"] <= 2.7 + 1e-6 < shown["table"][2]["person_epsilon"]
    assert shown["person_epsilon"] == shown["table"][2]["person_epsilon"]
    tight = RunSettings(dp_mode="aggregate", rounds=5, target_epsilon=3.0, out_dir=str(tmp_path), run_id="agg",
                        max_merchants_per_person=5, person_epsilon_cap=shown["table"][1]["person_epsilon"])
    with pytest.raises(PersonCapExceeded, match="aggregate plan"):
        aggregate_person_level(plan, tight, 20000)


def test_node_computes_what_joining_gained_it_for_itself_and_records_that_use(final_model, tmp_path, synth_silos):
    """After saving the model the node compares it with one trained alone on its own users: the result stays
    in its folder and on its console (the ack carries only DELIVERY_ACK_KEYS), and the use is in its ledger."""
    import shutil

    from fedretain.clients.delivery import JOINING_SUFFIX, delivery_line, value_of_joining
    from fedretain.clients.node import MerchantNode
    from fedretain.clients.round_progress import describe_reply
    from fedretain.protocol import DELIVERY_ACK_KEYS

    settings, model_file, _ = final_model
    silo = tmp_path / "shop"
    shutil.copytree(synth_silos[0], silo)  # the use is appended to this copy's ledger
    config = NodeConfig.for_silo(silo)
    cfg = delivery_config(model_file, sha256_file(model_file), settings)
    assert {"cutoff", "batch-size", "learning-rate", "local-epochs", "rounds"} <= set(cfg)
    path, digest, run_id, rnd = save_delivery(config, cfg)
    out = value_of_joining(config, cfg, path, run_id, rnd)
    assert out is not None
    saved = json.loads(path.with_name("run-a" + JOINING_SUFFIX).read_text())
    assert saved["merchant"] == synth_silos[0].name and saved["n_test"] > 0 and saved["run_id"] == "run-a"
    assert set(saved["log_loss"]) == {"local", "global", "personalised"}
    assert saved["gain_low"] <= saved["gain"] <= saved["gain_high"] and isinstance(saved["decidable"], bool)
    with MerchantNode(config).ledger() as ledger:
        uses = [u for u in ledger.usages() if u.run_id == "run-a"]
    assert uses and all(u.feature_set.startswith("joining:") for u in uses)
    line = delivery_line("run-a", digest)
    assert "value of joining" in line and "not sent" in line and f"{saved['gain']:+.4f}" in line

    class Reply:  # what `client start` prints for the delivery reply (clients/round_progress.py)
        content = {"delivery": dict.fromkeys(DELIVERY_ACK_KEYS)}

    Reply.content["delivery"].update({"run-id": "run-a", "model-sha256": digest})
    request = type("Request", (), {"metadata": type("M", (), {"message_type": "query.deliver_model"})()})()
    assert describe_reply(request, Reply()) == line
