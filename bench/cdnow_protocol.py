"""Shared set-up of the CDNOW benchmarks: silos, the protocol's run settings, pooled data.

Protocol (issue 2): calibration 1997-01-01..1997-09-30 (features), holdout
1997-10-01..1998-06-30 (label: any purchase), fixed 70/30 customer-level split (each
node's deterministic hash split), CDNOW split into K merchant silos.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CUTOFF = "1997-10-01"
HORIZON_DAYS = 273.0  # 1997-10-01 .. 1998-06-30 inclusive
CONSENT_AT = "1998-07-01T00:00:00+00:00"


def cdnow_source() -> Path:
    """The CDNOW master file (env FEDRETAIN_CDNOW_DIR, else ../shared/data/cdnow)."""
    folder = Path(os.environ.get("FEDRETAIN_CDNOW_DIR", REPO.parent / "shared" / "data" / "cdnow"))
    path = folder / "CDNOW_master.txt"
    if not path.is_file():
        sys.exit(f"CDNOW data not found at {path} (set FEDRETAIN_CDNOW_DIR)")
    return path


def make_silos(workdir: Path, n_merchants: int = 10, split: str = "hash", seed: int = 0) -> list[Path]:
    """Import CDNOW into ``n_merchants`` silos and provision each node's consent ledger."""
    from fedretain.clients.provision import provision_node
    from fedretain.datasets.cdnow import import_cdnow

    silos = import_cdnow(cdnow_source(), workdir, n_merchants, split, seed)
    for silo in silos:
        provision_node(silo)
    return silos


def settings(out_dir: Path, rounds: int = 10, **overrides):
    """Run settings of the protocol (purchase-history features only: CDNOW has nothing else)."""
    from fedretain.features import PURCHASE_FEATURES
    from fedretain.server.settings import RunSettings

    base = dict(
        rounds=rounds, local_epochs=2, batch_size=128, learning_rate=0.005, cutoff=CUTOFF,
        horizon_days=HORIZON_DAYS, features=PURCHASE_FEATURES, hidden=(32, 16),
        out_dir=str(out_dir), min_nodes=2,
    )
    base.update(overrides)
    return RunSettings(**base)


def prepared(silos: list[Path], s, consent_at: str = CONSENT_AT) -> list:
    """Each node's consent-gated train/test matrices under the protocol (for pooled yardsticks)."""
    from datetime import datetime

    from fedretain.clients.node import MerchantNode, NodeConfig

    at = datetime.fromisoformat(consent_at)  # local yardstick; federated nodes use their own clock
    return [MerchantNode(NodeConfig.for_silo(p)).prepare(s.purpose, list(s.features), s.horizon_days, s.cutoff, at)
            for p in silos]
