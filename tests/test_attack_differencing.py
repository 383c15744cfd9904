"""The differencing attack of issue 10 (point 4), run by a curious server against real runs.

The attacker's steps: run a training run, let one training user and one held-out user of
merchant 0 withdraw, run again, and subtract what merchant 0's node sent in the second run
from what it sent in the first. Before issue 10 the node sent its exact feature sums (the
difference *is* the withdrawn training user's feature vector, error ~1e-13) and exact
held-out metrics (``base_rate × num-examples`` differs by the held-out user's label).

The test first shows the attack works on exact values (computed from the node's own
inputs in both consent states), then runs it on what the nodes really sent in two local-DP
simulations (read from the nodes' egress audit copies): no feature sum exists any more, the
weights are the constant 1, and the only held-out quantity is the noisy score histogram,
whose difference gives the label plus Gaussian noise of the declared scale (σ·√(2B) on a
class total, ≈60 against a signal of 1).
"""

from __future__ import annotations

import math
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from test_egress import (
    FEATURES,
    PURPOSE,
    check_replies,
    exact_counts,
    numbers,
    run_audited,
)

pytestmark = pytest.mark.heavy


def _prep(silo: Path):
    from fedretain.clients.node import MerchantNode, NodeConfig

    return MerchantNode(NodeConfig.for_silo(silo)).prepare(PURPOSE, list(FEATURES), 30.0, None,
                                                          datetime.now(timezone.utc))


def _withdraw(silo: Path, subjects: list[str]) -> None:
    from fedretain.consent.ledger import ConsentLedger
    from fedretain.consent.records import ConsentRecord

    node = silo / ".node"
    with ConsentLedger.open(node / "consent.db", key_path=node / "node_key.pem") as ledger:
        for subject in subjects:
            ledger.append(ConsentRecord.withdraw(subject, silo.name, PURPOSE, datetime.now(timezone.utc),
                                                 recorded_by="test"))


def _sent_by(replies: list[dict], partition: int) -> list[dict]:
    return [r for r in replies if r["node_config"].get("partition-id") == str(partition)]


def _value(replies: list[dict], record: str, key: str, kind: str = "evaluate"):
    found = [r["records"][record]["items"][key] for r in replies
             if r["message_type"] == kind and record in r["records"] and key in r["records"][record]["items"]]
    assert len(found) == 1, f"expected one {record}.{key} in the {kind} replies, got {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def attack(tmp_path_factory, synth_silos):
    """Two local-DP runs around the withdrawal of one training and one held-out user of merchant 0."""
    from fedretain.privacy.budget import BudgetLedger, ledger_path
    from fedretain.server.settings import RunSettings

    root = tmp_path_factory.mktemp("differencing")
    data = root / "silos"
    shutil.copytree(synth_silos[0].parent, data)
    silos = sorted(p for p in data.iterdir() if p.is_dir())
    for silo in silos:
        with BudgetLedger.open(ledger_path(silo / ".node"), create=True) as ledger:
            ledger.set_budget(PURPOSE, 100.0)
    before = _prep(silos[0])
    y_test = before.y_test[:, 0]
    train_user = str(before.train_users[0])
    held_out = int(np.flatnonzero(y_test == 1)[0])  # a buyer: the label the attack is after
    held_user = str(before.test_users[held_out])

    def settings(run: str):
        return RunSettings(rounds=1, local_epochs=1, batch_size=128, out_dir=str(root / run), min_nodes=3,
                           features=FEATURES, hidden=(8,), dp_mode="local", target_epsilon=3.0,
                           max_grad_norm=1.0, run_id=run)

    exact = exact_counts(silos)
    everything = run_audited(settings("run-a"), data, root / "audit-a")
    _withdraw(silos[0], [train_user, held_user])
    after = _prep(silos[0])
    exact |= exact_counts(silos)
    everything_b = run_audited(settings("run-b"), data, root / "audit-b")
    return {"before": before, "after": after, "first": _sent_by(everything, 0), "second": _sent_by(everything_b, 0),
            "all": everything + everything_b, "exact": exact, "train_user": train_user, "label": 1.0,
            "held_user": held_user}


def test_every_reply_of_both_local_dp_runs_is_declared_and_carries_no_exact_count(attack):
    """The egress check of tests/test_egress.py for dp-mode local, on both runs of the attack."""
    check_replies(attack["all"], "local", attack["exact"])
    # besides training and evaluation: the platform asks each node once who it is (``query.witness``: the
    # signed ledger heads only) and hands every node the final model (``query.deliver_model``: an acknowledgement)
    assert {r["message_type"] for r in attack["all"]} == {"train", "evaluate", "query.witness", "query.deliver_model"}
    assert len({r["node_config"].get("partition-id") for r in attack["all"]}) == 3


def test_on_exact_values_the_attack_recovers_the_feature_vector_and_the_label(attack):
    """What the server got before issue 10: exact sums of features and exact held-out counts."""
    b, a = attack["before"], attack["after"]
    assert attack["train_user"] not in set(a.train_users) and attack["held_user"] not in set(a.test_users)
    x_user = b.x_train[list(b.train_users).index(attack["train_user"])]
    recovered = b.x_train.sum(axis=0) - a.x_train.sum(axis=0)  # difference of the old feature_stats 'sum'
    assert np.max(np.abs(recovered - x_user)) < 1e-9
    label = b.y_test[:, 0].sum() - a.y_test[:, 0].sum()  # difference of the old base_rate × num-examples
    assert label == attack["label"]


def test_the_server_receives_no_feature_sums_and_no_exact_counts(attack):
    for r in attack["first"] + attack["second"]:
        keys = {k for rec in r["records"].values() for k in rec["items"]}
        assert not keys & {"sum", "sumsq", "mean", "std", "users-used", "users-consented", "base_rate", "auc"}
        assert r["message_type"] in ("train", "evaluate", "query.witness", "query.deliver_model")  # no feature_stats
    weights = [_value(run, "metrics", "num-examples", "train") for run in (attack["first"], attack["second"])]
    assert weights == [1, 1]  # differencing the weights gives 0, not the number of withdrawn users


def test_the_label_is_only_recoverable_up_to_the_declared_dp_noise(attack):
    from fedretain.dp_evaluation import DEFAULT_EVAL_DELTA, N_BINS, calibrated

    first, second = attack["first"], attack["second"]
    sd = _value(first, "metrics", "hist-sd")
    eps = _value(first, "metrics", "eval-epsilon")
    assert sd == pytest.approx(calibrated(eps, DEFAULT_EVAL_DELTA).scale) and sd >= 10  # ε = 0.3 of the run's 3
    pos_a, pos_b = (np.asarray(numbers(_value(run, "metrics", "hist-pos"))) for run in (first, second))
    neg_a, neg_b = (np.asarray(numbers(_value(run, "metrics", "hist-neg"))) for run in (first, second))
    assert len(pos_a) == N_BINS and not np.allclose(pos_a, np.round(pos_a))  # noisy, not counts
    # The attacker's estimate of the held-out user's label: the difference of the buyer totals.
    estimate = pos_a.sum() - pos_b.sum()
    noise_sd = sd * math.sqrt(2 * N_BINS)  # two releases of B noisy cells each
    assert noise_sd > 40  # the label (a change of 1) is < 1/40 of one noise sd: the guess is near chance
    assert abs(estimate - attack["label"]) < 6 * noise_sd  # what it CAN recover: the label plus that noise
    total = (pos_a.sum() + neg_a.sum()) - (pos_b.sum() + neg_b.sum())  # held-out users who left: 1, plus noise
    assert abs(total - 1.0) < 6 * noise_sd
