"""Shared fixtures: small synthetic silos, provisioned nodes, quiet Flower/Ray settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


@pytest.fixture(scope="session")
def synth_silos(tmp_path_factory) -> list[Path]:
    """Three small synthetic merchants with provisioned nodes (key + consent ledger), shared read-only."""
    from fedretain.clients.provision import provision_node
    from fedretain.synth import generate

    root = tmp_path_factory.mktemp("synth")
    silos = generate(root / "silos", n_merchants=3, n_users=2400, seed=7)
    for silo in silos:
        provision_node(silo)
    return silos
