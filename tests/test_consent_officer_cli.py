"""The compliance officer's journeys through ``fedretain consent`` (issue 13)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedretain.cli.consent import consent  # the front end's group: knows which scopes each feature reads
from fedretain.consent.ledger import ConsentLedger


def _run(*args: object, ok: bool | None = True):
    res = CliRunner().invoke(consent, [str(a) for a in args])
    assert "Traceback" not in res.output
    if ok is not None:
        assert (res.exit_code == 0) == ok, res.output
    return res


@pytest.fixture
def db(tmp_path) -> Path:
    path = tmp_path / "node" / "consent.sqlite"
    _run("init", "--controller", "shop1", "--db", path)  # options after the subcommand
    return path


def test_ledger_options_after_the_subcommand(db, tmp_path):
    key = db.with_suffix(".key.pem")
    _run("grant", "alice", "--purpose", "analytics", "--scopes", "social", "--at", "2024-01-01", "--db", db,
         "--key", key)
    _run("--db", db, "grant", "bob", "--purpose", "analytics", "--scopes", "social", "--at", "2024-01-01")
    assert _run("verify", "--db", db).output.startswith("ledger OK: 2 records")
    assert _run("--db", tmp_path / "elsewhere.sqlite", "verify", "--db", db).output.startswith("ledger OK")


def test_silo_option_on_every_subcommand(tmp_path):
    silo = tmp_path / "shop"
    silo.mkdir()
    res = _run("init", "--controller", "shop1", "--silo", silo)
    assert "pinned the node key" in res.output and (silo / ".node" / "node.json").is_file()
    _run("grant", "alice", "--purpose", "analytics", "--scopes", "social", "--at", "2024-01-01", "--silo", silo)
    _run("withdraw", "alice", "--purpose", "analytics", "--silo", silo)
    assert "pinned node key" in _run("verify", "--silo", silo).output
    assert json.loads(_run("show", "alice", "--json", "--silo", silo).output)["state"]["analytics"] == []
    _run("report", "--out", tmp_path / "rep", "--silo", silo)
    _run("export", "--format", "csv", "--out", tmp_path / "x.csv", "--silo", silo)
    assert (tmp_path / "x.csv").read_text().count("alice") == 2


def test_a_missing_ledger_does_not_send_the_officer_to_init(tmp_path):
    res = _run("verify", "--db", tmp_path / "consent-ledger.sqlite", ok=False)
    assert "--silo SILO" in res.output and "SILO/.node/consent.db" in res.output
    assert "only for a node that has no ledger yet" in res.output


def test_withdrawal_for_an_unknown_subject_is_refused(db):
    _run("grant", "alice", "--purpose", "analytics", "--scopes", "social", "--at", "2024-01-01", "--db", db)
    res = _run("withdraw", "alcie", "--purpose", "analytics", "--db", db, ok=False)
    assert "'alcie' has no consent record" in res.output and "--new-subject" in res.output
    with ConsentLedger.open(db) as led:
        assert led.size == 1  # nothing recorded
    _run("withdraw", "carol", "--purpose", "analytics", "--db", db, "--new-subject")
    _run("withdraw", "alice", "--purpose", "analytics", "--db", db)
    with ConsentLedger.open(db) as led:
        assert led.size == 3


def test_show_lists_only_the_scopes_and_features_read_for_that_user(db):
    _run("grant", "alice", "--purpose", "retention_modeling", "--scopes", "purchase_history", "--at", "2024-01-01",
         "--db", db)
    _run("grant", "bob", "--purpose", "retention_modeling", "--scopes", "purchase_history,viewing_behavior",
         "--at", "2024-01-01", "--db", db)
    with ConsentLedger.open(db) as led:
        root = led.head().root_hex
        led.record_usage("run1", 1, "retention_modeling", "train:recency_days,views_30d,likes_30d",
                         {"purchase_history": 2, "viewing_behavior": 1}, 2, led.size, root, "2024-02-01",
                         ["alice", "bob"])
    alice = json.loads(_run("show", "alice", "--json", "--db", db).output)["usage"][0]["read"]
    bob = json.loads(_run("show", "bob", "--json", "--db", db).output)["usage"][0]["read"]
    assert alice == {"use": "train", "scopes": ["purchase_history"], "features": ["recency_days"],
                     "features_known": True}
    assert bob["scopes"] == ["purchase_history", "viewing_behavior"]
    assert bob["features"] == ["recency_days", "views_30d"]  # likes_30d reads engagement: nobody granted it
    table = _run("show", "alice", "--db", db).output
    assert "recency_days" in table and "views_30d" not in table and "likes_30d" not in table


def test_report_without_a_trusted_key_needs_the_flag_and_warns(db, tmp_path):
    _run("grant", "alice", "--purpose", "analytics", "--scopes", "social", "--at", "2024-01-01", "--db", db)
    db.with_suffix(".key.pem").rename(tmp_path / "away.pem")  # the officer has only the file
    res = _run("report", "--out", tmp_path / "rep", "--db", db, ok=False)
    assert "no trusted key" in res.output
    res = _run("report", "--out", tmp_path / "rep", "--db", db, "--trust-embedded-key")
    assert "WARNING" in res.output
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert "re-signed under another key" in rep["verify"]["warning"]
    assert "WARNING" in (tmp_path / "rep" / "report.html").read_text()


def test_init_of_a_nodes_ledger_pins_its_key_as_deployment_md_says(tmp_path):
    from fedretain.consent.identity import load_pin

    state = tmp_path / "shop" / ".node"
    res = _run("--db", state / "consent.db", "--key", state / "node_key.pem", "init", "--controller", "shop_a")
    pin = load_pin(state)
    assert pin is not None and pin.merchant_id == "shop_a" and pin.key_fingerprint in res.output
    (state / "node_key.pem").rename(tmp_path / "lost.pem")
    (state / "consent.db").unlink()
    res = _run("init", "--silo", tmp_path / "shop", "--controller", "shop_a", ok=False)
    assert "pins key" in res.output and "restore the node key" in res.output
