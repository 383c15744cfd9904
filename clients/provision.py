"""Provision a merchant node: its signing key, its pinned identity and consent ledger, from the silo's consent file.

The node key is pinned (``STATE_DIR/node.json``: merchant id, key fingerprint and public
PEM, written atomically) *before* the ledger is created, so the node only ever trusts a
ledger signed by its own key (see :mod:`fedretain.consent.identity`). Idempotent: an
existing ledger is kept as it is (never re-imported or overwritten), so consent changes
recorded since provisioning survive. An existing ledger without a pin is not pinned here:
that is a deliberate act (``fedretain consent pin --silo SILO``), refused with a message.
"""

from __future__ import annotations

from pathlib import Path

from fedretain.clients.node import NodeConfig
from fedretain.consent import signing
from fedretain.consent.identity import PinError, load_pin, require_pin, write_pin
from fedretain.consent.ledger import ConsentLedger
from fedretain.ingest import IngestError, read_merchant


def provision_node(
    silo: str | Path, *, consent_db: str | Path | None = None, node_key: str | Path | None = None,
    lifetime_budgets: dict[str, float] | None = None,
) -> NodeConfig:
    """Create ``SILO/.node/{node_key.pem,node.json,consent.db}`` (or the given paths) if missing.

    ``lifetime_budgets`` (purpose → ε) sets the node's lifetime privacy budget for purposes
    that have none yet; an existing budget is never changed here (that is a deliberate act:
    ``fedretain privacy set-budget``).
    """
    cfg = NodeConfig.for_silo(silo, consent_db=consent_db, node_key=node_key)
    if lifetime_budgets:
        from fedretain.privacy.budget import BudgetLedger, ledger_path

        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            controller = str(read_merchant(Path(silo) / "merchant.json")["merchant_id"])
        except IngestError:
            controller = None  # the ledger is then named by its key fingerprint
        with BudgetLedger.open(ledger_path(cfg.state_dir), create=True, key_path=cfg.node_key,
                               controller=controller) as budget:
            for purpose, epsilon in lifetime_budgets.items():
                if budget.budget(purpose) is None:
                    budget.set_budget(purpose, float(epsilon), note="set at provisioning")
    merchant_id = str(read_merchant(Path(silo) / "merchant.json")["merchant_id"])
    if cfg.consent_db.exists():
        require_pin(cfg.state_dir, cfg.consent_db)  # an unpinned ledger: pinning it is the operator's decision
        return cfg
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    key, _ = signing.load_or_create_key(cfg.node_key)
    pin = load_pin(cfg.state_dir)
    if pin is None:
        write_pin(cfg.state_dir, merchant_id, key)
    elif (pin.key_fingerprint, pin.merchant_id) != (signing.fingerprint(key), merchant_id):
        raise PinError(f"{pin.path} pins key {pin.key_fingerprint} for merchant {pin.merchant_id!r}, but the node "
                       f"key {cfg.node_key} is {signing.fingerprint(key)} for merchant {merchant_id!r}; refusing to "
                       f"create a ledger under a key the node does not trust")
    with ConsentLedger.create(cfg.consent_db, controller=merchant_id, key_path=cfg.node_key) as ledger:
        consent_file = Path(silo) / "consent.csv"
        if consent_file.is_file():
            ledger.import_file(consent_file)
    return cfg
