"""The per-run cache of a node's inputs (clients/round_cache.py): reused while consent and data are
unchanged, recomputed at the next round after a withdrawal or a silo change, and never a way around
the consent decision — a rolled-back ledger is refused even though cached features exist."""

from __future__ import annotations

import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

import pytest
from flwr.app import ConfigRecord

from fedretain.clients import round_cache
from fedretain.clients.client_app import record_usage
from fedretain.clients.node import MerchantNode, NodeConfig
from fedretain.consent.gate import ConsentError
from fedretain.consent.ledger import ConsentLedger
from fedretain.consent.records import ConsentRecord

PURPOSE = "retention_modeling"
FEATURES = ["recency_days", "frequency", "views_30d"]


def _cfg(rnd: int, run_id: str = "cache-run") -> ConfigRecord:
    return ConfigRecord({"run-id": run_id, "server-round": rnd, "purpose": PURPOSE, "features": FEATURES,
                         "horizon-days": 30.0, "cutoff": ""})


def _now() -> datetime:
    return datetime.now(timezone.utc)


@pytest.fixture()
def node(tmp_path, synth_silos) -> MerchantNode:
    silo = tmp_path / synth_silos[1].name
    shutil.copytree(synth_silos[1], silo)  # own copy: these tests append to and replace its ledger
    round_cache.clear()
    yield MerchantNode(NodeConfig.for_silo(silo))
    round_cache.clear()


def _round(node: MerchantNode, rnd: int, run_id: str = "cache-run"):
    cfg = _cfg(rnd, run_id)
    prep = round_cache.prepared_for(node, cfg, _now())
    record_usage(node, prep, cfg, "train")  # as the ClientApp does: the ledger head moves every round
    return prep


def _withdraw(node: MerchantNode, subject: str) -> None:
    state = node.config.state_dir
    with ConsentLedger.open(node.config.consent_db, key_path=state / "node_key.pem") as ledger:
        ledger.append(ConsentRecord.withdraw(subject, node.merchant_id, PURPOSE, _now(), recorded_by="test"))


def test_unchanged_consent_reuses_the_features_with_a_fresh_decision(node):
    first = _round(node, 1)
    again = round_cache.prepared_for(node, _cfg(1), _now())  # the evaluate message of the same round
    assert again is first
    second = _round(node, 2)
    assert round_cache.stats() == {"round_hits": 1, "reused": 1, "computed": 1}
    assert second.x_train is first.x_train and second.train_users.equals(first.train_users)
    # the decision was taken again, at the node's clock of round 2, under the same verified head
    assert second.decision is not first.decision
    assert second.decision.at > first.decision.at
    assert (second.decision.ledger_size, second.decision.ledger_head) == (first.decision.ledger_size,
                                                                          first.decision.ledger_head)


def test_an_append_that_changes_no_grant_still_reuses_but_under_the_new_head(node):
    first = _round(node, 1)
    _withdraw(node, "someone-not-in-this-silo")  # a real ledger append, no admitted user affected
    second = _round(node, 2)
    assert round_cache.stats()["reused"] == 1
    assert second.decision.ledger_size == first.decision.ledger_size + 1
    assert second.decision.ledger_head != first.decision.ledger_head


def test_a_withdrawal_recomputes_at_the_next_round(node):
    first = _round(node, 1)
    subject = str(first.train_users[0])
    _withdraw(node, subject)
    second = _round(node, 2)
    assert round_cache.stats()["computed"] == 2 and round_cache.stats()["reused"] == 0
    assert subject not in set(second.used_users)
    assert subject not in set(second.decision.user_ids)
    assert len(second.train_users) == len(first.train_users) - 1


def test_a_changed_silo_recomputes(node):
    _round(node, 1)
    users = node.config.data_path / "users.csv"
    st = users.stat()
    os.utime(users, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # the merchant re-exported its data
    _round(node, 2)
    assert round_cache.stats()["computed"] == 2


def test_a_new_run_recomputes(node):
    _round(node, 1, run_id="run-a")
    _round(node, 1, run_id="run-b")
    assert round_cache.stats()["computed"] == 2


def test_attack_replaying_the_ledger_from_before_a_withdrawal_is_refused_despite_the_cache(node, tmp_path: Path):
    """The attacker keeps a copy of the ledger, lets the user withdraw, then puts the old copy back
    hoping the node reuses the features it computed when the user was still admitted."""
    db = node.config.consent_db
    first = _round(node, 1)
    old = tmp_path / "old-consent.db"
    shutil.copy2(db, old)
    subject = str(first.train_users[0])
    _withdraw(node, subject)
    _round(node, 2)
    for suffix in ("-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    shutil.copy2(old, db)  # roll back: the withdrawal and round 2's usage record disappear
    with pytest.raises(ConsentError, match="shrank|verif|roll"):
        round_cache.prepared_for(node, _cfg(3), _now())
