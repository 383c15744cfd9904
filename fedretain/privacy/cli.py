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
    """Show the node cap, committed and remaining ε per purpose, every run's spend and every cap change."""
    path = _ledger_file(silo, state_dir)
    try:
        with BudgetLedger.open(path) as ledger:
            report = ledger.report()
    except PrivacyError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    console = Console()
    node, rows, head = report["node"], report["purposes"], report["head"]
    console.print(f"Privacy ledger {path}", soft_wrap=True, markup=False, highlight=False)
    console.print(f"  {head['size']} entries, verified; signed head {head['root_hex'][:16]}… "
                  f"by {head['key_fingerprint'][:23]}…", soft_wrap=True, markup=False, highlight=False)
    if node["cap_epsilon"] is None:
        console.print("no node-wide budget set: every DP run and analytics query is refused "
                      "(`fedretain privacy set-budget --epsilon E --reason TEXT`)", soft_wrap=True)
    else:
        console.print(f"Node cap (all purposes): ε={node['cap_epsilon']:.3f}"
                      + (f", δ={node['cap_delta']:.1e}" if node["cap_delta"] is not None else "")
                      + f"; committed {node['committed_epsilon']:.3f}, remaining {node['remaining_epsilon']:.3f}",
                      soft_wrap=True)
    if rows:
        summary = Table(title="Per purpose (sub-limit optional; ε unless marked δ)", box=box.SIMPLE_HEAD,
                        pad_edge=False, title_justify="left")
        for col in ("purpose", "limit", "limit δ", "committed", "spent", "left", "runs"):
            summary.add_column(col, justify="left" if col == "purpose" else "right", no_wrap=True)
        for r in rows:
            summary.add_row(
                r["purpose"], _num(r["budget_epsilon"], "—"), _num(r["budget_delta"], "—", ".1e"),
                _num(r["committed_epsilon"]), _num(r["spent_epsilon"]), _num(r["remaining_epsilon"], "—"),
                str(len(r["runs"])),
            )
        console.print(summary)
    for r in rows:  # plain lines, not a table: run ids are copied into other commands, never wrapped (issue 13)
        if not r["runs"]:
            continue
        console.print(f"{r['purpose']} runs (committed = Σ reserved ε; σ, q in --json):",
                      soft_wrap=True, markup=False, highlight=False)
        for run in r["runs"]:
            console.print(f"  {run['run_id']}", soft_wrap=True, markup=False, highlight=False)
            console.print(f"    {run['mode']} ({run['accountant']})  ε reserved {run['reserved_epsilon']:.3f} "
                          f"spent {run['spent_epsilon']:.3f}  δ={run['delta']:.1e}  rounds {run['rounds']}  "
                          f"steps {run['steps']}/{run['planned_steps']}", soft_wrap=True, markup=False,
                          highlight=False)
    if report["cap_events"]:
        console.print("Budget changes (each signed by the node key):")
        for e in report["cap_events"]:
            before = "" if e["previous_epsilon"] is None else f" (was ε={e['previous_epsilon']:g})"
            console.print(f"  {e['set_at'][:19]}  {e['scope']}: {e['kind']} ε={e['epsilon']:g}"
                          + (f" δ={e['delta']:g}" if e["delta"] is not None else "") + before
                          , soft_wrap=True, markup=False, highlight=False)
            console.print(f"    reason: {e['reason']}", soft_wrap=True, markup=False, highlight=False)


@privacy.command("set-budget")
@_with_where
@click.option("--purpose", default=None,
              help="Set this purpose's sub-limit (e.g. analytics); without it: the node-wide cap of all purposes.")
@click.option("--epsilon", type=float, required=True, help="Lifetime ε.")
@click.option("--delta", type=float, default=None, help="Optional lifetime δ (Σ δ of all runs must stay below it).")
@click.option("--reason", default="", help="Why the budget is set or changed (required to raise one; signed and kept).")
@click.option("--note", default="", hidden=True, help="Old name of --reason.")
def set_budget(silo: Path | None, state_dir: Path | None, purpose: str | None, epsilon: float, delta: float | None,
               reason: str, note: str) -> None:
    """Set the node-wide lifetime cap, or a purpose's sub-limit (creates the ledger if needed; history is kept)."""
    path = _ledger_file(silo, state_dir)
    reason = reason or note
    try:
        with BudgetLedger.open(path, create=True) as ledger:
            if purpose is None:
                budget = ledger.set_node_cap(epsilon, delta, reason=reason)
            else:
                budget = ledger.set_budget(purpose, epsilon, delta, reason=reason)
            committed, _ = ledger.committed(purpose)
            cap = ledger.node_cap()
    except (PrivacyError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    what = "node-wide lifetime cap" if purpose is None else f"lifetime sub-limit for {purpose}"
    click.echo(f"{path}: {what} set to ε={budget.epsilon:g}"
               + (f", δ={budget.delta:g}" if budget.delta is not None else "")
               + f" (committed so far: ε={committed:g}; signed event: {budget.kind})")
    if purpose is not None and cap is not None and budget.epsilon > cap.epsilon:
        click.echo(f"note: the node-wide cap ε={cap.epsilon:g} is lower and still applies", err=True)
    if committed > budget.epsilon:
        click.echo("warning: more than this budget is already committed; every new DP run will be refused", err=True)


def _num(value: float | None, missing: str = "—", fmt: str = ".3f") -> str:
    return missing if value is None else format(value, fmt)
