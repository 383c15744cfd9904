"""``fedretain privacy``: a merchant node's privacy budget — status and lifetime budgets.

The ledger is ``<state-dir>/privacy.db``; ``--silo SILO`` means ``--state-dir SILO/.node``
(the node's default state folder, next to its consent ledger).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich import box
from rich.console import Console
from rich.table import Table

from fedretain.privacy.accountant import PrivacyError
from fedretain.privacy.budget import BudgetLedger, ledger_path

NODE_DIR = ".node"  # same as fedretain.clients.node.NODE_DIR (not imported: keeps this CLI free of Flower)


def _ledger_file(silo: Path | None, state_dir: Path | None) -> Path:
    if (silo is None) == (state_dir is None):
        raise click.UsageError("give exactly one of --silo or --state-dir")
    if state_dir is not None:
        return ledger_path(state_dir)
    assert silo is not None  # exactly one of the two was given
    return ledger_path(silo / NODE_DIR)


_where = [
    click.option("--silo", type=click.Path(file_okay=False, path_type=Path),
                 help="Merchant silo folder (ledger in SILO/.node)."),
    click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), help="The node's state folder."),
]


F = TypeVar("F", bound=Callable[..., Any])


def _with_where(fn: F) -> F:
    for opt in reversed(_where):
        fn = opt(fn)
    return fn


@click.group("privacy")
def privacy() -> None:
    """Privacy budget of a merchant node: what DP runs spent and what is left."""


@privacy.command("status")
@_with_where
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def status(silo: Path | None, state_dir: Path | None, as_json: bool) -> None:
    """Show the lifetime budget, committed and remaining ε per purpose, and every run's spend."""
    path = _ledger_file(silo, state_dir)
    try:
        with BudgetLedger.open(path) as ledger:
            rows = ledger.status()
    except PrivacyError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps({"ledger": str(path), "purposes": rows}, indent=2))
        return
    console = Console()
    if not rows:
        console.print(f"{path}: no budgets set and no DP runs recorded")
        return
    summary = Table(title=f"Privacy budget ({path})", box=box.SIMPLE_HEAVY)
    for col in ("purpose", "lifetime ε", "lifetime δ", "committed ε", "spent ε", "remaining ε", "runs"):
        summary.add_column(col, justify="left" if col == "purpose" else "right", overflow="fold")
    for r in rows:
        summary.add_row(
            r["purpose"], _num(r["budget_epsilon"], "not set"), _num(r["budget_delta"], "—", ".1e"),
            _num(r["committed_epsilon"]), _num(r["spent_epsilon"]), _num(r["remaining_epsilon"], "—"),
            str(len(r["runs"])),
        )
    console.print(summary)
    for r in rows:  # one table per purpose keeps it readable in 80 columns; σ and q are in --json
        if not r["runs"]:
            continue
        runs = Table(title=f"{r['purpose']}: runs (committed = Σ reserved ε, basic composition)", box=box.SIMPLE)
        for col in ("run", "mode", "reserved ε", "spent ε", "δ", "rounds", "steps"):
            runs.add_column(col, justify="left" if col in ("run", "mode") else "right", overflow="fold")
        for run in r["runs"]:
            runs.add_row(
                run["run_id"], f"{run['mode']} ({run['accountant']})", _num(run["reserved_epsilon"]),
                _num(run["spent_epsilon"]), _num(run["delta"], fmt=".1e"), str(run["rounds"]),
                f"{run['steps']}/{run['planned_steps']}",
            )
        console.print(runs)


@privacy.command("set-budget")
@_with_where
@click.option("--purpose", required=True, help="Consent purpose the budget applies to (e.g. retention_modeling).")
@click.option("--epsilon", type=float, required=True, help="Lifetime ε for this purpose on this node.")
@click.option("--delta", type=float, default=None, help="Optional lifetime δ (Σ δ of all runs must stay below it).")
@click.option("--note", default="", help="Why the budget was set or changed (kept in the ledger).")
def set_budget(silo: Path | None, state_dir: Path | None, purpose: str, epsilon: float, delta: float | None,
               note: str) -> None:
    """Set the lifetime privacy budget of a purpose (creates the ledger if needed; history is kept)."""
    path = _ledger_file(silo, state_dir)
    try:
        with BudgetLedger.open(path, create=True) as ledger:
            budget = ledger.set_budget(purpose, epsilon, delta, note)
            committed, _ = ledger.committed(purpose)
    except (PrivacyError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{path}: lifetime budget for {purpose} set to ε={budget.epsilon:g}"
               + (f", δ={budget.delta:g}" if budget.delta is not None else "")
               + f" (committed so far: ε={committed:g})")
    if committed > budget.epsilon:
        click.echo("warning: more than this budget is already committed; every new DP run will be refused", err=True)


def _num(value: float | None, missing: str = "—", fmt: str = ".3f") -> str:
    return missing if value is None else format(value, fmt)
