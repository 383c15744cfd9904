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

from fedretain.analytics.granularity import AUTO, DEFAULT_SIZE_SHARE, DEFAULT_TARGET, NO_AUTO, AutoSettings
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


def _run(kind: str, opts: dict[str, Any], auto: AutoSettings = NO_AUTO, **query: Any) -> None:
    from fedretain.server.analytics import AnalyticsRefused, AnalyticsSettings

    data_dir, out_dir = opts.pop("data_dir"), opts.pop("out_dir")
    try:
        spec = QuerySpec(kind, by=opts["by"], epsilon=opts["epsilon"], delta=opts["delta"], end=opts["end"], **query)
        policy = IntervalPolicy(opts["confidence"], opts["min_snr"], opts["flag_width"])
        if auto.active:
            from fedretain.analytics.granularity import split_budget

            split = split_budget(spec.epsilon, spec.delta, auto.size_share)  # fails here, not after Ray started
    except (QueryError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    if opts["print_run_config"]:
        cfg = AnalyticsSettings(spec=spec, out_dir=str(out_dir), policy=policy, auto=auto).to_run_config()
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
    if auto.active:
        console.print(f"auto {', '.join(auto.names())}: a noisy size release first (ε={split.size_epsilon:g}, "
                      f"δ={split.size_delta:g}; {split.note}), then the query (ε={split.query_epsilon:g}, "
                      f"δ={split.query_delta:g})", highlight=False)
    try:
        outputs = run_query_in_simulation(spec, data_dir, out_dir, policy=policy, auto=auto)
    except AnalyticsRefused as exc:
        raise click.ClickException(f"query refused: {exc}") from None
    if outputs.record.get("auto"):
        a = outputs.record["auto"]
        console.print(f"[bold]{a['summary']}[/]: {a['reason']}", highlight=False)
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
    eps = record.get("privacy", {}).get("epsilon_per_merchant", q["epsilon"])
    table = Table(title=f"{q['kind']} by {q['by']}: {len(record['merchants'])} merchants, ε={eps:g} each")
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


class _CountOrAuto(click.ParamType):
    """A count >= 1, or ``auto`` (chosen from the shops' noisy size)."""

    name = "N|auto"

    def convert(self, value: Any, param: Any, ctx: Any) -> int | str:
        if str(value).strip().lower() == AUTO:
            return AUTO
        try:
            n = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is neither a whole number nor 'auto'", param, ctx)
        if n < 1:
            self.fail(f"{n} is not >= 1", param, ctx)
        return n


@analytics.command("retention-curve")
@_common
@click.option("--period", type=click.Choice([AUTO, *PERIOD_DAYS]), default=AUTO, show_default=True,
              help="Cohort and period length (month = 30 days after the first purchase). auto: chosen with the "
                   "counts from the shops' size; with --cohorts and --periods both numbers, auto means month.")
@click.option("--periods", default=AUTO, show_default=True, type=_CountOrAuto(),
              help="Following periods per cohort, or auto.")
@click.option("--cohorts", default=AUTO, show_default=True, type=_CountOrAuto(),
              help="Most recent cohorts to include, or auto.")
@click.option("--size-share", default=DEFAULT_SIZE_SHARE, show_default=True,
              type=click.FloatRange(0, 0.5, min_open=True),
              help="auto: share of ε spent on the noisy size release that chooses the grid (raised to what the "
                   "accountant can calibrate, about ε=0.2); the query gets the rest.")
@click.option("--auto-target", default=DEFAULT_TARGET, show_default=True,
              type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="auto: choose the grid with the most figures among those expected to publish at least this "
                   "share of their figures.")
def retention_curve(period: str, periods: int | str, cohorts: int | str, size_share: float, auto_target: float,
                    **opts: Any) -> None:
    """Share of each first-purchase cohort that buys again in each following period.

    By default the grid (period length, cohorts, periods) is auto: every merchant first releases
    a noisy count of its users (a share of ε, charged to its budget), and the grid with the most
    figures expected to be publishable is chosen. Numbers for --cohorts and --periods skip that.
    """
    auto = AutoSettings(period=period == AUTO, periods=periods == AUTO, cohorts=cohorts == AUTO,
                        size_share=size_share, target=auto_target)
    if not auto.active:
        auto = NO_AUTO  # explicit numbers: today's query exactly, no size release (auto period = month)
    _run("retention_curve", opts, auto=auto, period="month" if period == AUTO else period,
         periods=6 if periods == AUTO else periods, cohorts=6 if cohorts == AUTO else cohorts)


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
