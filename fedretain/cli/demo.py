"""``fedretain demo``: synthetic merchants → consent-gated federated training → scores → report."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console

console = Console()


@click.command()
@click.option("--workspace", default="fedretain-demo", show_default=True, type=click.Path(path_type=Path),
              help="Folder for silos, node state, run record, scores and report (recreated).")
@click.option("--quick", is_flag=True, help="Small and fast (under a minute): for tests and a first look.")
@click.option("--merchants", type=click.IntRange(2), default=None, help="Default 6 (quick: 3).")
@click.option("--users", type=click.IntRange(300), default=None, help="Total users. Default 30000 (quick: 3000).")
@click.option("--rounds", type=click.IntRange(1), default=None, help="Default 6 (quick: 2).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--deploy", is_flag=True,
              help="Instead of the simulation: a platform server and merchant nodes as separate processes on "
                   "127.0.0.1 (Flower SuperLink/SuperNodes, TLS, node authentication); stops all it started.")
def demo(workspace: Path, quick: bool, merchants: int | None, users: int | None, rounds: int | None, seed: int,
         deploy: bool) -> None:
    """Run the whole pipeline on synthetic merchants and write report.html and run.json."""
    if deploy:
        from fedretain.demo.deployment import run_deploy_demo

        summary = run_deploy_demo(workspace, merchants=merchants or 3, users=users or 1500, rounds=rounds or 3,
                                  echo=lambda m: console.print(m, markup=False))
        console.print_json(data=summary, default=str)
        return
    from fedretain.cli.train import RichRoundObserver, ensure_nodes, round_table
    from fedretain.demo import DemoPlan, run_demo
    from fedretain.server import progress

    plan = DemoPlan(
        workspace=workspace,
        merchants=merchants or (3 if quick else 6),
        users=users or (3000 if quick else 30000),
        rounds=rounds or (2 if quick else 6),
        local_epochs=2 if quick else 3,
        seed=seed,
    )
    if workspace.exists():
        shutil.rmtree(workspace)
    observer = RichRoundObserver()
    progress.add_observer(observer)
    t0 = time.time()
    try:
        summary = run_demo(plan, say=console.print, ensure_nodes=ensure_nodes)
    finally:
        progress.remove_observer(observer)
    record = json.loads(Path(summary["run_json"]).read_text())
    console.print(round_table(record["rounds"]))
    _print_summary(summary, time.time() - t0)


def _print_summary(s: dict[str, Any], seconds: float) -> None:
    fed, cen = s["federated"], s["centralized"]

    def auc(m: dict[str, Any]) -> str:
        ci = f" (95% {m['auc_low']:.3f}–{m['auc_high']:.3f})" if "auc_low" in m else ""
        return f"{m['auc']:.4f}{ci}"

    console.print(
        f"[bold]held-out AUC, all merchants' held-out users pooled[/bold]: federated {auc(fed)} vs centralized "
        f"yardstick {auc(cen)} (gap {cen['auc'] - fed['auc']:+.4f}); log loss {fed['log_loss']:.4f} vs "
        f"{cen['log_loss']:.4f}"
    )
    if s.get("mean_merchant_auc") is not None:
        console.print(f"mean of per-merchant AUCs (the round table's last row, each shop's own held-out users): "
                      f"{s['mean_merchant_auc']:.4f}; report.html explains why the two differ")
    joining = s.get("joining") or []
    if joining:
        helps = [j for j in joining if j["joining_helps"]]
        console.print(f"value of joining (each node, its own held-out users): the shared or fine-tuned model beats "
                      f"training alone for {len(helps)} of {len(joining)} merchants")
    console.print(f"scores: {s['scores_csv']}\nreport: {s['report_html']}\nrun record: {s['run_json']}")
    console.print(f"finished in {seconds:.0f} s")
