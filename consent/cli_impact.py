"""``fedretain consent impact USER``: what a subject's withdrawal means for models already trained.

Joins the node's usage log (which runs and rounds read the subject's data) with the
platform's run records (``--runs RUN.json``: which model each round produced) and the DP
bound of each run. The bound comes from the node's privacy-budget ledger when the front
end provides it (:func:`provide_dp_bounds`; the consent package does not import the
privacy package), else from the run record's declared settings.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import click

from .cli_base import _console, _Ctx, _friendly, _loc, _now, _open, _ts
from .impact import DPBound, RunModels, SubjectImpact, read_run_record, subject_impact

__all__ = ["impact", "provide_dp_bounds", "dp_bounds_for", "read_runs", "impact_lines"]

# (state_dir, node key path) -> run id -> DP bound; None when the node keeps no privacy ledger
DPBounds = Callable[[Path, Path], Mapping[str, DPBound] | None]
_dp_bounds: DPBounds | None = None


def provide_dp_bounds(fn: DPBounds | None) -> None:
    """Register where ``impact`` and ``report`` learn each run's DP bound from the node's budget ledger."""
    global _dp_bounds
    _dp_bounds = fn


def dp_bounds_for(ctx: _Ctx) -> tuple[dict[str, DPBound], str]:
    """The node's per-run DP bounds and a line saying where they came from (or why none)."""
    if _dp_bounds is None or ctx.state_dir is None:
        return {}, "no privacy ledger consulted: DP bounds are the run records' declared settings"
    try:
        found = _dp_bounds(ctx.state_dir, ctx.key)
    except Exception as exc:  # a ledger that cannot be read must not hide the consent answer; say so
        return {}, f"privacy ledger not usable ({exc}): DP bounds are the run records' declared settings"
    if found is None:
        return {}, f"no privacy ledger in {ctx.state_dir}: DP bounds are the run records' declared settings"
    return dict(found), f"DP bounds from the node's privacy ledger in {ctx.state_dir} (ε actually spent)"


def read_runs(paths: tuple[Path, ...]) -> list[RunModels]:
    return [read_run_record(p) for p in paths]


def _state(imp: SubjectImpact) -> str:
    if not imp.scopes_now:
        return "no consent records"
    return "; ".join(f"{p}: {', '.join(s)}" if s else f"{p}: NO CONSENT (withdrawn or expired)"
                     for p, s in imp.scopes_now.items())


def impact_lines(imp: SubjectImpact) -> list[str]:
    """Plain-text summary for an officer (also used by the report): what to retrain, and why."""
    out = [f"consent of {imp.subject} at {_ts(imp.at)} UTC: {_state(imp)}"]
    if not imp.uses:
        return out + [f"no run has used {imp.subject}'s data: no model to retrain"]
    gone = imp.trained_after_withdrawal
    models = imp.models_to_replace
    if gone:
        runs = sorted({u.run_id for u in gone})
        out.append(f"{imp.subject} no longer consents to uses that trained {len(runs)} run(s): {', '.join(runs)}")
    if models:
        out.append("a retrain without " + imp.subject + " would replace " + ", ".join(
            f"{m.run_id} round {m.round}" + (f" ({m.sha256[:12]}…)" if m.sha256 else "") for m in models))
    else:
        out.append(f"{imp.subject}'s data trained no model (evaluation, analytics or scoring only)")
    return out


@click.command()
@click.argument("user")
@click.option("--runs", "runs", multiple=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="a platform run record (run.json): which model each round produced (repeatable)")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of tables")
@click.option("--at", "at", default=None, help="evaluate today's consent at this time [default: now]")
@click.pass_obj
@_loc
@_friendly
def impact(obj: _Ctx, user: str, runs: tuple[Path, ...], as_json: bool, at: str | None) -> None:
    """Which models USER's data trained or fed, and what a withdrawal means for them.

    For every use of USER's data: run, round, model (hash from --runs), the consent USER had
    then and has now, the DP bound on USER's influence on that model, and the models a
    retrain without USER would replace.
    """
    from .impact import parse_time

    at_dt = parse_time(at) if at else _now()
    run_models = read_runs(runs)
    bounds, source = dp_bounds_for(obj)
    with _open(obj) as ledger:
        if ledger.connection.execute("SELECT 1 FROM records WHERE subject_id = ? LIMIT 1",
                                     (user,)).fetchone() is None and not ledger.usages(user):
            raise click.ClickException(f"subject {user!r} has no consent record and no recorded use in {obj.db}; "
                                       "check the id")
        imp = subject_impact(ledger, user, runs=run_models, privacy=bounds, now=at_dt)
    if as_json:
        click.echo(json.dumps({**imp.to_dict(), "dp_source": source,
                               "run_records": [str(p) for p in runs]}, indent=2, ensure_ascii=False))
        return
    from rich.table import Table

    console = _console()
    for line in impact_lines(imp):
        console.print(line, highlight=False)
    if imp.uses:
        t = Table(title=f"uses of {user}'s data and the models they fed")
        for c in ("run", "round", "use", "purpose", "model (sha256)", "consent then", "consents now", "DP bound",
                  "retrain replaces"):
            t.add_column(c, overflow="fold")
        for u in imp.uses:
            model = "" if u.produced is None else (u.produced.sha256[:16] + "…" if u.produced.sha256
                                                   else "(hash unknown: pass --runs)")
            replaces = ", ".join(f"r{m.round}" for m in u.replaced_by_retrain) or "nothing (no weights changed)"
            t.add_row(u.run_id, str(u.round), u.phase, u.purpose, model or "–", ", ".join(u.scopes_then) or "none",
                      "yes" if u.consented_now else "[bold red]NO[/bold red]",
                      u.dp.describe() if u.dp else "unknown (pass --runs or --silo)", replaces)
        console.print(t)
    console.print(f"[dim]{source}. ε bounds how much any one person's data can change a model: the smaller, "
                  "the less a model can reveal or depend on them (see docs/COMPLIANCE.md).[/dim]")
