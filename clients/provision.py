"""Provision a merchant node: its signing key and consent ledger, from the silo's consent file.

Idempotent: an existing ledger is kept as it is (never re-imported or overwritten), so
consent changes recorded since provisioning survive.
"""

from __future__ import annotations

from pathlib import Path

from fedretain.clients.node import NodeConfig
from fedretain.consent.ledger import ConsentLedger
from fedretain.ingest import IngestError, read_merchant


def provision_node(
    silo: str | Path, *, consent_db: str | Path | None = None, node_key: str | Path | None = None,
    lifetime_budgets: dict[str, float] | None = None,
) -> NodeConfig:
    """Create ``SILO/.node/{node_key.pem,consent.db}`` (or the given paths) if missing.

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
    if cfg.consent_db.exists():
        return cfg
    merchant = read_merchant(Path(silo) / "merchant.json")
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    with ConsentLedger.create(cfg.consent_db, controller=str(merchant["merchant_id"]), key_path=cfg.node_key) as ledger:
        consent_file = Path(silo) / "consent.csv"
        if consent_file.is_file():
            ledger.import_file(consent_file)
    return cfg
