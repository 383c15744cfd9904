"""Attacks on a node's identity (issue 10 point 1): a consent ledger rebuilt under another key.

The attacker is the node's operator: through the public API they build a ledger under a key
of their own, with the same merchant id, the node's records and a forged grant for a user who
never consented, and put it in place of ``SILO/.node/consent.db``. The node trusts only the
key pinned at provisioning (``SILO/.node/node.json``), so the gate and ``consent verify``
refuse it; the node's own ledger keeps working.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedretain.cli.consent import consent
from fedretain.clients.node import MerchantNode, NodeConfig
from fedretain.clients.provision import provision_node
from fedretain.consent import signing
from fedretain.consent.gate import ConsentError
from fedretain.consent.identity import PinError, load_pin
from fedretain.consent.ledger import ConsentLedger
from fedretain.consent.records import ConsentRecord

PURPOSE = "retention_modeling"
SCOPES = "purchase_history,viewing_behavior,engagement,social,profile,location"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """One small provisioned silo; each test works on its own copy."""
    from fedretain.synth import generate

    root = tmp_path_factory.mktemp("identity")
    silo = generate(root / "silos", n_merchants=1, n_users=400, seed=11)[0]
    provision_node(silo)
    return silo


@pytest.fixture
def silo(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / pristine.name))


def _replace_file(src: Path, dst: Path) -> None:
    for suffix in ("-wal", "-shm"):
        Path(str(dst) + suffix).unlink(missing_ok=True)
    os.replace(src, dst)


def _forge(silo: Path, tmp_path: Path) -> tuple[str, str]:
    """The attack: same merchant id, the node's records plus a forged grant, under the attacker's key.

    Returns (the victim's user id, the attacker's key fingerprint).
    """
    cfg = NodeConfig.for_silo(silo)
    node = MerchantNode(cfg)
    decision, _ = node.gate(PURPOSE)
    candidates = set(node.silo.users["user_id"]) | set(node.silo.events["user_id"])
    never = sorted(candidates - set(decision.user_ids))
    assert never, "the silo needs a user without consent for this attack"
    victim = never[0]
    with ConsentLedger.open(cfg.consent_db) as real:
        records = real.records()
        merchant = real.controller
    forged_path = tmp_path / "forged.db"
    with ConsentLedger.create(forged_path, controller=merchant, key_path=tmp_path / "attacker.pem") as forged:
        forged.append_many(records)
        forged.append(ConsentRecord.grant(victim, merchant, PURPOSE, SCOPES, "2024-01-01T00:00:00Z"))
        attacker_fp = forged.key_fingerprint
        assert forged.verify().ok  # self-consistent: it passes against the key it declares
    _replace_file(forged_path, cfg.consent_db)
    return victim, attacker_fp


def _cli(*args: object) -> object:
    return CliRunner().invoke(consent, [str(a) for a in args])


def test_forged_ledger_under_another_key_is_refused_by_the_node(silo, tmp_path):
    cfg = NodeConfig.for_silo(silo)
    pinned = load_pin(cfg.state_dir)
    assert pinned is not None and pinned.merchant_id == json.loads((silo / "merchant.json").read_text())["merchant_id"]
    _, attacker_fp = _forge(silo, tmp_path)
    node = MerchantNode(cfg)
    for attempt in (lambda: node.gate(PURPOSE), lambda: node.prepare(PURPOSE, ["recency_days", "frequency"], 30)):
        with pytest.raises(ConsentError) as err:
            attempt()
        msg = str(err.value)
        assert str(cfg.consent_db) in msg and attacker_fp in msg and pinned.key_fingerprint in msg
        assert "refusing" in msg


def test_forged_ledger_fails_consent_verify(silo, tmp_path):
    cfg = NodeConfig.for_silo(silo)
    pinned = load_pin(cfg.state_dir)
    _, attacker_fp = _forge(silo, tmp_path)
    res = _cli("verify", "--silo", silo)
    assert res.exit_code == 1 and "ledger OK" not in res.output and "Traceback" not in res.output
    assert attacker_fp in res.output and pinned.key_fingerprint in res.output
    # the same file named directly: the pin beside it is found and used
    res = _cli("verify", "--db", cfg.consent_db)
    assert res.exit_code == 1 and attacker_fp in res.output
    # a copy elsewhere with no key at all: the officer must choose to trust the embedded key, and is warned
    loose = tmp_path / "loose" / "copy.db"
    loose.parent.mkdir()
    shutil.copy(cfg.consent_db, loose)
    res = _cli("verify", "--db", loose)
    assert res.exit_code == 1 and "no trusted key" in res.output and "--trust-embedded-key" in res.output
    res = _cli("verify", "--db", loose, "--trust-embedded-key")
    assert res.exit_code == 0 and "ledger OK" in res.output and "WARNING" in res.output
    res = _cli("verify", "--db", loose, "--public-key", _pub_file(pinned.public_key_pem, tmp_path))
    assert res.exit_code == 1 and "created with key" in res.output


def _pub_file(pem: str, tmp_path: Path) -> Path:
    path = tmp_path / "node.pub"
    path.write_text(pem)
    return path


def test_the_nodes_own_ledger_still_works(silo, tmp_path):
    cfg = NodeConfig.for_silo(silo)
    original = tmp_path / "original.db"
    shutil.copy(cfg.consent_db, original)
    victim, _ = _forge(silo, tmp_path)
    _replace_file(original, cfg.consent_db)  # the node's own file back in place
    decision, _ = MerchantNode(cfg).gate(PURPOSE)
    assert victim not in decision.user_ids and len(decision.user_ids) > 0
    res = _cli("verify", "--silo", silo)
    assert res.exit_code == 0 and "ledger OK" in res.output and "pinned node key" in res.output
    assert "WARNING" not in res.output
    # the node key still writes, and the node still trusts what it wrote
    res = _cli("grant", victim, "--purpose", PURPOSE, "--scopes", "purchase_history", "--silo", silo)
    assert res.exit_code == 0, res.output
    decision, _ = MerchantNode(cfg).gate(PURPOSE)
    assert victim in decision.user_ids


def test_missing_pin_fails_closed_and_pinning_is_a_deliberate_act(silo, tmp_path):
    cfg = NodeConfig.for_silo(silo)
    fp = load_pin(cfg.state_dir).key_fingerprint
    cfg.pin_path.unlink()
    with pytest.raises(ConsentError, match=f"no pinned key.*fedretain consent pin --silo {silo}"):
        MerchantNode(cfg).gate(PURPOSE)
    with pytest.raises(PinError, match="consent pin --silo"):
        provision_node(silo)  # provisioning does not pin an existing ledger behind the operator's back
    res = _cli("verify", "--silo", silo)
    assert res.exit_code == 1 and "no pinned key" in res.output
    res = _cli("pin", "--silo", silo)
    assert res.exit_code == 0, res.output
    assert f"pinned key {fp}" in res.output and str(cfg.pin_path) in res.output
    assert MerchantNode(cfg).gate(PURPOSE)[0].n_candidates > 0
    assert "already pins" in _cli("pin", "--silo", silo).output


def test_pin_refuses_a_ledger_the_node_key_did_not_sign(silo, tmp_path):
    cfg = NodeConfig.for_silo(silo)
    _forge(silo, tmp_path)
    cfg.pin_path.unlink()  # the attacker also removes the pin, hoping to have the forged ledger pinned
    res = _cli("pin", "--silo", silo)
    assert res.exit_code == 1 and "nothing pinned" in res.output and not cfg.pin_path.exists()
    with pytest.raises(ConsentError, match="no pinned key"):
        MerchantNode(cfg).gate(PURPOSE)


def test_a_pin_replaced_by_another_key_is_refused_without_replace(silo, tmp_path):
    other = tmp_path / "other.pub"
    other.write_text(signing.public_key_pem(signing.generate_key()))
    res = _cli("pin", "--silo", silo, "--public-key", other)
    assert res.exit_code == 1 and "does not verify" in res.output
