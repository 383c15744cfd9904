"""``fedretain analytics``: DP retention curves and KPIs across merchants, one query per command.

Each command runs one query in Flower's Simulation Engine over the silos under ``--data``
(one simulated merchant node each) and writes ``<kind>_by-<by>.{png,csv,json}`` to ``--out``.
``--print-run-config`` prints the same query as a ``flwr run --run-config`` string for a
deployment instead (see docs/ANALYTICS.md).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from fedretain.analytics.intervals import DEFAULT_CONFIDENCE, DEFAULT_FLAG_WIDTH, DEFAULT_MIN_SNR, IntervalPolicy
from fedretain.analytics.queries import BREAKDOWNS, PERIOD_DAYS, QueryError, QuerySpec

console = Console()


def _common(fn: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("--by", type=click.Choice(list(BREAKDOWNS)), default="none", show_default=True,
                     help="Break the figures down by one dimension."),
        click.option("--epsilon", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
                     help="ε each merchant spends on its answer (charged to its 'analytics' budget)."),
        click.option("--delta", default=1e-6, show_default=True,
                     type=click.FloatRange(0, 1, min_open=True, max_open=True),
                     help="δ each merchant spends."),
        click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
                     help="Folder of merchant silos (simulation: one node each)."),
        click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
                     help="Where the PNG, CSV and JSON go."),
        click.option("--end", default="", help="Exclusive end of the data (ISO date); default: earliest data end."),
        click.option("--confidence", default=DEFAULT_CONFIDENCE, show_default=True,
                     type=click.FloatRange(0, 1, min_open=True, max_open=True)),
        click.option("--min-snr", default=DEFAULT_MIN_SNR, show_default=True,
                     type=click.FloatRange(min=0, min_open=True),
                     help="Suppress a figure whose denominator is below this many noise sd."),
        click.option("--flag-width", default=DEFAULT_FLAG_WIDTH, show_default=True,
                     type=click.FloatRange(min=0, min_open=True),
                     help="Flag a figure whose interval is wider than this (rates: absolute; spend: relative)."),
        click.option("--print-run-config", is_flag=True,
                     help="Only print the query as `flwr run --run-config` for a deployment; run nothing."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _run(kind: str, opts: dict[str, Any], **query: Any) -> None:
    from fedretain.server.analytics import AnalyticsRefused, AnalyticsSettings

    data_dir, out_dir = opts.pop("data_dir"), opts.pop("out_dir")
    try:
        spec = QuerySpec(kind, by=opts["by"], epsilon=opts["epsilon"], delta=opts["delta"], end=opts["end"], **query)
        policy = IntervalPolicy(opts["confidence"], opts["min_snr"], opts["flag_width"])
    except (QueryError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    if opts["print_run_config"]:
        cfg = AnalyticsSettings(spec=spec, out_dir=str(out_dir), policy=policy).to_run_config()
        cfg.pop("analytics-query-id")  # a fresh id per run
        click.echo(" ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in cfg.items() if v != ""))
        return
    if data_dir is None:
        raise click.UsageError("--data is required (a folder of merchant silos) unless --print-run-config is given")
    from fedretain.cli.train import ensure_nodes
    from fedretain.server.analytics_app import run_query_in_simulation

    ensure_nodes(data_dir)
    console.print(f"[bold]{kind}[/] by {spec.by}: query {spec.query_id}, ε={spec.epsilon:g}, δ={spec.delta:g} "
                  f"per merchant ({len(list(_silos(data_dir)))} merchants)")
    try:
        outputs = run_query_in_simulation(spec, data_dir, out_dir, policy=policy)
    except AnalyticsRefused as exc:
        raise click.ClickException(f"query refused: {exc}") from None
    console.print(figures_table(outputs.record))
    if outputs.record.get("advice"):
        console.print(f"[yellow]{outputs.record['advice']}[/]", highlight=False)
    console.print(f"plot: {outputs.png}\ntable: {outputs.csv}\nrecord: {outputs.json}")


def _silos(data_dir: Path):
    from fedretain.server.simulation import silo_folders

    return silo_folders(data_dir)


def figures_table(record: dict[str, Any]) -> Table:
    """The headline figures (pooled curve or per-window values) as people read them."""
    q = record["query"]
    rows = [f for f in record["figures"] if f["level"] != "cohort"]
    several = len({f["figure"] for f in rows}) > 1
    table = Table(title=f"{q['kind']} by {q['by']}: {len(record['merchants'])} merchants, ε={q['epsilon']:g} each")
    cols = ["group", "period" if q["kind"] == "retention_curve" else "window", *(["figure"] if several else []),
            "estimate", f"{record['intervals']['confidence']:.0%} interval", "n (noisy)", "status"]
    for col in cols:
        table.add_column(col, justify="left" if col in ("group", "figure", "status") else "right")
    for f in rows:
        rate = f["figure"] != "spend_per_retained_user"
        fmt = (lambda v: f"{100 * v:.1f}%") if rate else (lambda v: f"{v:,.2f}")
        est = "–" if f["estimate"] is None else fmt(f["estimate"])
        ci = "–" if f["ci_low"] is None else f"{fmt(f['ci_low'])}–{fmt(f['ci_high'])}"
        step = f"{f['step']}" if q["kind"] == "retention_curve" else f"{f['step']} d"
        fig = [f["figure"].replace("_", " ")] if several else []
        table.add_row(f["group"], step, *fig, est, ci, f"{f['denominator']:,.0f}", f["status"])
    return table


@click.group("analytics")
def analytics() -> None:
    """Differentially private retention curves and KPIs pooled across merchants.

    Every merchant node answers from its own data only, counting users who granted the
    'analytics' purpose for the scopes the query reads, adds calibrated noise and charges
    ε to its privacy budget (purpose 'analytics'); over-budget queries are refused.
    """


@analytics.command("retention-curve")
@_common
@click.option("--period", type=click.Choice(list(PERIOD_DAYS)), default="month", show_default=True,
              help="Cohort and period length (month = 30 days after the first purchase).")
@click.option("--periods", default=6, show_default=True, type=click.IntRange(1), help="Following periods per cohort.")
@click.option("--cohorts", default=6, show_default=True, type=click.IntRange(1), help="Most recent cohorts to include.")
def retention_curve(period: str, periods: int, cohorts: int, **opts: Any) -> None:
    """Share of each first-purchase cohort that buys again in each following period."""
    _run("retention_curve", opts, period=period, periods=periods, cohorts=cohorts)


@analytics.command("repeat-rate")
@_common
@click.option("--windows", default="30,60,90", show_default=True, help="Windows in days after the first purchase.")
def repeat_rate(windows: str, **opts: Any) -> None:
    """Share of first-time buyers who buy again within 30/60/90 days."""
    try:
        parsed = tuple(int(w) for w in windows.split(",") if w.strip())
    except ValueError:
        raise click.UsageError(f"--windows must be comma-separated day counts, got {windows!r}") from None
    _run("repeat_rate", opts, windows=parsed)


@analytics.command("spend-per-retained-user")
@_common
@click.option("--window-days", default=90, show_default=True, type=click.IntRange(1),
              help="Window after the first purchase (spend includes the first order, net of refunds).")
@click.option("--spend-cap", default=500.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Each user's window spend is clipped to this (currency units) before summing.")
def spend_per_retained_user(window_days: int, spend_cap: float, **opts: Any) -> None:
    """Average spend of users who bought again within the window."""
    _run("spend_per_retained_user", opts, window_days=window_days, spend_cap=spend_cap)
