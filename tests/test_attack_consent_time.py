"""Attack (issue 10 point 2): the server sends a past consent time to re-admit users.

The server may choose the feature cutoff (back-tests are legitimate), never the consent
time. Three users are admitted at the server's chosen time but not at the node's clock: one
withdrew since, one withdrew with a back-dated effective time (after the server's time), one
whose grant has expired. The config a server would send goes through the ClientApp's own
path (``prepare_from_config``), and an analytics query carrying a past ``consent_at`` goes
through the node's query handler (``answer_query``); the node evaluates consent at its own
clock and logs that it ignored the server's time.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from flwr.app import ConfigRecord

from fedretain.clients.client_app import prepare_from_config
from fedretain.clients.node import MerchantNode
from fedretain.clients.provision import provision_node
from fedretain.consent.ledger import ConsentLedger
from fedretain.consent.records import ConsentRecord
from fedretain.server.settings import RunSettings

PURPOSE = "retention_modeling"
ANALYTICS = "analytics"
NOW = datetime.now(timezone.utc)
SERVER_AT = NOW - timedelta(days=20)  # the consent time a server would like nodes to use


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> tuple[MerchantNode, dict[str, str]]:
    from fedretain.synth import generate

    root = tmp_path_factory.mktemp("consent_time")
    data_end = (NOW - timedelta(days=40)).strftime("%Y-%m-%d")  # every original grant precedes SERVER_AT
    silo = generate(root / "silos", n_merchants=1, n_users=400, seed=5, data_end=data_end)[0]
    cfg = provision_node(silo)
    node = MerchantNode(cfg)
    admitted = [set(node.gate(p, t)[0].user_ids) for p in (PURPOSE, ANALYTICS) for t in (SERVER_AT, None)]
    ev = node.silo.events
    buyers = set(ev.loc[ev["event"] == "purchase", "user_id"])  # so that every query would count them
    both = sorted(set.intersection(*admitted) & buyers)
    candidates = buyers
    with ConsentLedger.open(cfg.consent_db, key_path=cfg.node_key) as ledger:
        recorded = {r.subject_id for r in ledger.iter_records()}
    never = sorted(candidates - recorded)  # no consent record at all: the expiring grant is their only one
    users = {"withdrew": both[0], "backdated": both[1], "expired": never[0]}
    with ConsentLedger.open(cfg.consent_db, key_path=cfg.node_key) as ledger:
        m = ledger.controller
        for purpose in (PURPOSE, ANALYTICS):
            ledger.append_many([
                ConsentRecord.withdraw(users["withdrew"], m, purpose, NOW - timedelta(minutes=1)),
                ConsentRecord.withdraw(users["backdated"], m, purpose, SERVER_AT + timedelta(days=1)),
                ConsentRecord.grant(users["expired"], m, purpose, "purchase_history,viewing_behavior",
                                    SERVER_AT - timedelta(days=100), expires_at=SERVER_AT + timedelta(days=2)),
            ])
    return node, users


def _server_config(consent_at: str) -> ConfigRecord:
    """What a (malicious or outdated) server sends with a train message."""
    return ConfigRecord({
        "run-id": "attack", "server-round": 1, "purpose": PURPOSE,
        "features": ["recency_days", "frequency", "views_30d"], "horizon-days": 30.0, "cutoff": "",
        "consent-at": consent_at,
    })


def test_the_attack_would_work_at_the_servers_time(scene):
    node, users = scene
    for purpose in (PURPOSE, ANALYTICS):
        then, _ = node.gate(purpose, SERVER_AT)  # a node-local replay of the past, not what a server can ask for
        assert set(users.values()) <= set(then.user_ids)


def test_a_past_consent_time_from_the_server_admits_nobody_who_withdrew_or_expired(scene, caplog):
    node, users = scene
    caplog.set_level(logging.WARNING, logger="fedretain.clients.client_app")
    prep = prepare_from_config(node, _server_config(SERVER_AT.isoformat()))
    assert abs((prep.decision.at - datetime.now(timezone.utc)).total_seconds()) < 120  # the node's clock
    admitted = set(prep.decision.user_ids)
    assert not set(users.values()) & admitted
    assert not set(users.values()) & set(prep.used_users)
    assert len(admitted) > 0
    assert any("ignoring consent-at" in r.getMessage() for r in caplog.records)


def test_the_round_cache_does_not_key_on_the_servers_consent_time(scene):
    node, users = scene
    a = prepare_from_config(node, _server_config((SERVER_AT - timedelta(days=1)).isoformat()))
    b = prepare_from_config(node, _server_config(""))
    assert a is b  # one decision per round, taken at the node's clock whatever the server sent


def test_run_settings_no_longer_carry_a_consent_time():
    s = RunSettings.from_run_config({"consent-at": "2020-01-01T00:00:00+00:00", "cutoff": "2026-01-01"})
    assert not hasattr(s, "consent_at") and "consent-at" not in s.to_run_config()
    assert s.cutoff == "2026-01-01"  # the feature cutoff stays the server's choice
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert "\nconsent-at" not in pyproject


def test_an_analytics_query_with_a_past_consent_time_counts_nobody_who_withdrew_or_expired(scene, caplog):
    from fedretain.analytics.queries import QuerySpec
    from fedretain.clients.analytics_handlers import answer_query
    from fedretain.privacy.budget import BudgetLedger, ledger_path

    node, users = scene
    with BudgetLedger.open(ledger_path(node.config.state_dir), create=True) as budget:
        if budget.budget(ANALYTICS) is None:
            budget.set_budget(ANALYTICS, 5.0, note="test")
    caplog.set_level(logging.WARNING, logger="fedretain.clients.analytics_handlers")
    from fedretain.analytics.queries import query_inputs, users_counted

    spec = QuerySpec("repeat_rate", epsilon=1.0, end=node.data_end().isoformat(), consent_at=SERVER_AT.isoformat())
    _, gated_then = node.gate(ANALYTICS, SERVER_AT)  # what the server's time would have counted
    assert set(users.values()) <= set(users_counted(query_inputs(spec, gated_then, node.silo.merchant)))
    answer_query(node, spec)
    with node.ledger() as ledger:
        use = [u for u in ledger.usages() if u.run_id == spec.query_id]
        assert len(use) == 1 and abs((use[0].at - datetime.now(timezone.utc)).total_seconds()) < 120
        for user in users.values():
            assert spec.query_id not in {u.run_id for u in ledger.usages(user)}
    assert any("ignoring consent_at" in r.getMessage() for r in caplog.records)
