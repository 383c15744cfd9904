"""``fedretain simulate``'s checks before anything starts: budgets and person-level ε of every silo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table


def training_records(settings: Any) -> Any:
    """A function silo → the node's training-record count for this run (the node's own ``prepare``)."""

    def count(silo: Path) -> int:
        from fedretain.clients.node import MerchantNode, NodeConfig

        node = MerchantNode(NodeConfig.for_silo(silo))
        return node.prepare(settings.purpose, list(settings.features), settings.horizon_days,
                            settings.cutoff or None, eval_fraction=settings.eval_fraction).n_train

    return count


def check_or_exit(settings: Any, silos: list[Path], console: Console) -> None:
    """Refuse (exit 1, a readable message) a DP run that some silo cannot take; print person-level ε."""
    from fedretain.privacy.accountant import PrivacyError
    from fedretain.privacy.preflight import preflight
    from fedretain.server.federation import train_epsilon

    try:  # planned with the ε the nodes are sent (the run's ε less the evaluation release)
        result = preflight(settings, silos, training_records(settings), train_epsilon(settings))
    except (PrivacyError, ValueError) as exc:
        raise click.ClickException(f"DP run refused before starting the simulation: {exc}") from None
    if result.person:
        table = Table(title=f"Per-record vs person-level ε (person at up to k merchants; "
                            f"declared k={settings.max_merchants_per_person})")
        for col in ("node", "k", "ε per record", "ε per person", "δ"):
            table.add_column(col, justify="left" if col == "node" else "right", no_wrap=True)
        for row in result.person:
            table.add_row(row["node"], str(row["k"]), f"{row['per_record_epsilon']:.3f}",
                          f"{row['person_epsilon']:.3f}", f"{row['delta']:.1e}")
        console.print(table)
    if result.problems:
        raise click.ClickException(result.message())
