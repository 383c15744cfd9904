"""``fedretain consent``: the compliance officer's command line for a node's consent ledger.

Which ledger: ``--silo SILO`` (a node's ledger ``SILO/.node/consent.db``, its key and its
pinned identity), or ``--db FILE`` (commands that write sign with ``--key``, default
``<db>.key.pem``). ``--silo/--db/--key`` are accepted before or after the subcommand.
Trust: a node's ledger is verified against the node's pinned key (``node.json`` beside
it, see :mod:`.identity`), else the node key or ``--public-key``; checking a ledger only
against the key it declares about itself needs ``--trust-embedded-key`` and prints a WARNING.
User errors print one clear message and exit 1 (never a traceback); ``verify`` exits 1
when the ledger was tampered with or is not signed by the trusted key.
"""


import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import click

from . import cli_export, cli_identity, cli_impact
from .cli_base import (
    _TRUST_OPT,
    EMBEDDED_WARNING,
    F,
    _console,
    _Ctx,
    _default_by,
    _friendly,
    _loc,
    _now,
    _open,
    _require_trust,
    _ts,
)
from .vocab import PURPOSES, SCOPES


@click.group("consent")
@click.option("--silo", type=click.Path(file_okay=False, path_type=Path), default=None,
              envvar="FEDRETAIN_SILO", help="a node's silo: use SILO/.node/consent.db, its node key and pinned key")
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path), default=None,
              envvar="FEDRETAIN_CONSENT_DB",
              help="the consent ledger (SQLite file) [default: ./consent-ledger.sqlite; "
                   "a node's is SILO/.node/consent.db]")
@click.option("--key", type=click.Path(dir_okay=False, path_type=Path), default=None, envvar="FEDRETAIN_NODE_KEY",
              help="the node's Ed25519 private key (PEM) [default: <db>.key.pem, or SILO/.node/node_key.pem]")
@click.pass_context
def consent(ctx: click.Context, silo: Path | None, db: Path | None, key: Path | None) -> None:
    """Record, inspect, verify and report a node's consent ledger.

    --silo/--db/--key may also be given after the subcommand.
    """
    db_ = db if db is not None else Path(DEFAULT_DB)
    ctx.obj = _Ctx(db=db_, key=key if key is not None else db_.with_suffix(".key.pem"), key_given=key is not None,
                   db_given=db is not None, silo=silo)


DEFAULT_DB = "consent-ledger.sqlite"


FeatureScopes = Callable[[], Mapping[str, Iterable[str]]]
_feature_scopes: FeatureScopes | None = None


def provide_feature_scopes(fn: FeatureScopes | None) -> None:
    """Register where ``show`` learns which scopes each feature reads (None: unknown)."""
    global _feature_scopes
    _feature_scopes = fn


def read_for_subject(feature_set: str, granted: set[str]) -> dict[str, Any]:
    """What one use read of one subject: the subject's granted scopes that the use's features read.

    A feature reads only the scopes it declares, and the gate passes only the subject's
    granted ones, so the subject's data read = declared ∩ granted; a feature with no
    granted scope read nothing of theirs and is not listed.
    """
    use, _, names = feature_set.partition(":") if ":" in feature_set else ("", "", feature_set)
    features = [f for f in names.split(",") if f]
    table = dict(_feature_scopes()) if _feature_scopes is not None else None
    if table is None or not all(f in table for f in features):
        return {"use": use, "scopes": sorted(granted), "features": features, "features_known": False}
    read = {f: sorted(set(table[f]) & granted) for f in features}
    return {"use": use, "scopes": sorted({s for v in read.values() for s in v}),
            "features": [f for f in features if read[f]], "features_known": True}


def _record_opts(fn: F) -> F:
    for opt in reversed([
        click.option("--at", "at", default=None, help="when it takes effect (ISO 8601, UTC) [default: now]"),
        click.option("--method", default="operator_entry", show_default=True, help="collection method"),
        click.option("--notice", default="", help="version of the notice the subject saw"),
        click.option("--jurisdiction", default="", help="e.g. CN, EU"),
        click.option("--by", "by", default=None, help="who records it [default: cli:<login>]"),
    ]):
        fn = opt(fn)
    return fn


@consent.command()
@click.argument("user")
@click.option("--purpose", required=True, type=click.Choice(PURPOSES), help="what the data may be used for")
@click.option("--scopes", required=True, help=f"comma-separated scopes ({', '.join(SCOPES)})")
@click.option("--expires", default=None, help="when the grant expires (ISO 8601, UTC)")
@_record_opts
@click.pass_obj
@_loc
@_friendly
def grant(obj: _Ctx, user: str, purpose: str, scopes: str, expires: str | None, at: str | None, method: str,
          notice: str, jurisdiction: str, by: str | None) -> None:
    """Record that USER grants SCOPES for PURPOSE."""
    from .records import ConsentRecord

    with _open(obj, write=True) as ledger:
        rec = ConsentRecord.grant(user, ledger.controller, purpose, scopes, at or _now(), expires_at=expires,
                                  collection_method=method, notice_version=notice, jurisdiction=jurisdiction,
                                  recorded_by=by or _default_by())
        size = ledger.append(rec)
        click.echo(f"granted {user}: {purpose} [{', '.join(rec.scopes)}] from {rec.to_dict()['effective_at']}"
                   + (f" until {rec.to_dict()['expires_at']}" if rec.expires_at else "")
                   + f" — record {rec.record_id}, ledger size {size}, root {ledger.head().root_hex[:16]}…")


@consent.command()
@click.argument("user")
@click.option("--purpose", required=True, type=click.Choice(PURPOSES))
@click.option("--scopes", default="", help="comma-separated scopes to withdraw [default: all of the purpose]")
@click.option("--new-subject", is_flag=True,
              help="record it even though the ledger has no record of USER (otherwise refused: a typo is permanent)")
@_record_opts
@click.pass_obj
@_loc
@_friendly
def withdraw(obj: _Ctx, user: str, purpose: str, scopes: str, new_subject: bool, at: str | None, method: str,
             notice: str, jurisdiction: str, by: str | None) -> None:
    """Record that USER withdraws SCOPES (default: all) for PURPOSE.

    A subject id the ledger has never seen is refused unless --new-subject: records are
    permanent, so a mistyped id would stay forever while the real subject stays granted.
    """
    from .records import ConsentRecord

    with _open(obj, write=True) as ledger:
        known = ledger.connection.execute("SELECT 1 FROM records WHERE subject_id = ? LIMIT 1", (user,)).fetchone()
        if known is None and not new_subject:
            raise click.ClickException(
                f"subject {user!r} has no consent record in {obj.db}; nothing was recorded. Check the id (a typo "
                f"would be permanent: `fedretain consent show {user}`), or pass --new-subject to record a "
                "withdrawal for a subject this ledger has not seen")
        rec = ConsentRecord.withdraw(user, ledger.controller, purpose, at or _now(), scopes=scopes,
                                     collection_method=method, notice_version=notice, jurisdiction=jurisdiction,
                                     recorded_by=by or _default_by())
        size = ledger.append(rec)
        what = ", ".join(rec.scopes) if rec.scopes else "all scopes"
        click.echo(f"withdrew {user}: {purpose} [{what}] from {rec.to_dict()['effective_at']} — record "
                   f"{rec.record_id}, ledger size {size}")


@consent.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--by", "by", default=None, help="recorded_by for rows that leave it empty [default: import:<file>]")
@click.pass_obj
@_loc
@_friendly
def import_(obj: _Ctx, file: Path, by: str | None) -> None:
    """Import a consent CSV/JSONL file (all rows or nothing)."""
    with _open(obj, write=True) as ledger:
        n = ledger.import_file(file, recorded_by=by)
        click.echo(f"imported {n} consent record(s) from {file}; ledger size {ledger.size}, "
                   f"root {ledger.head().root_hex[:16]}…")


@consent.command()
@click.argument("user")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of tables")
@click.option("--at", "at", default=None, help="evaluate the state at this time [default: now]")
@click.pass_obj
@_loc
@_friendly
def show(obj: _Ctx, user: str, as_json: bool, at: str | None) -> None:
    """USER's full consent history, state now, and which runs used their data."""
    from .records import format_ts, parse_ts

    at_dt = parse_ts(at, "at") if at else _now()
    with _open(obj) as ledger:
        hist = ledger.history(user)
        state = {p: [s for s, v in ledger.state_at(p, at_dt, subjects=[user]).iloc[0].items() if v]
                 for p in PURPOSES}
        used = []
        for u in ledger.usages(user):
            granted = {sc for sc, v in ledger.state_at(u.purpose, u.at, subjects=[user]).iloc[0].items() if v}
            used.append({**u.to_dict(), "read": read_for_subject(u.feature_set, granted)})
    if as_json:
        click.echo(json.dumps({"subject_id": user, "at": format_ts(at_dt), "state": state,
                               "history": hist.to_dict(orient="records"), "usage": used}, indent=2))
        return
    from rich.table import Table

    console = _console()
    if hist.empty:
        console.print(f"[yellow]no consent records for {user}[/yellow]")
    t = Table(title=f"consent history of {user}", show_lines=False)
    for c in ("seq", "effective (UTC)", "purpose", "action", "scopes", "expires (UTC)", "method", "notice",
              "recorded by", "record_id"):
        t.add_column(c, overflow="fold")
    for r in hist.itertuples(index=False):
        t.add_row(str(r.seq), _ts(r.effective_at), r.purpose, r.action, r.scopes.replace(";", ", ") or "(all)",
                  _ts(r.expires_at), r.collection_method, r.notice_version, r.recorded_by, r.record_id)
    console.print(t)
    s = Table(title=f"consent state at {_ts(format_ts(at_dt))} UTC")
    s.add_column("purpose")
    s.add_column("granted scopes")
    for p, scopes in state.items():
        s.add_row(p, ", ".join(scopes) if scopes else "[dim]none[/dim]")
    console.print(s)
    if used:
        u = Table(title=f"runs that used {user}'s data")
        for c in ("run", "round", "purpose", "use", "scopes read", "features read", "consent at", "ledger size",
                  "recorded"):
            u.add_column(c, overflow="fold")
        for x in used:
            r = x["read"]
            feats = ", ".join(r["features"]) if r["features_known"] else "(feature scopes not available here)"
            u.add_row(x["run_id"], str(x["round"]), x["purpose"], r["use"], ", ".join(r["scopes"]) or "none",
                      feats, _ts(x["at"]), str(x["ledger_size"]), _ts(x["recorded_at"]))
        console.print(u)
    else:
        console.print(f"no run has used {user}'s data")


@consent.command()
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="folder for report.html and report.json")
@click.option("--at", "at", default=None, help="report the state at this time [default: now]")
@click.option("--runs", "runs", multiple=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="a platform run record (run.json) naming each round's model (repeatable)")
@click.option("--subject", "subjects", multiple=True,
              help="add an erasure-impact section for this subject (repeatable)")
@_TRUST_OPT
@click.pass_obj
@_loc
@_friendly
def report(obj: _Ctx, out: Path, at: str | None, runs: tuple[Path, ...], subjects: tuple[str, ...],
           trust_embedded_key: bool) -> None:
    """Write an HTML + JSON compliance report (coverage, withdrawals, usage, models trained on withdrawn users)."""
    from .report import build_report

    run_models = cli_impact.read_runs(runs)
    bounds, source = cli_impact.dp_bounds_for(obj)
    with _open(obj) as ledger:
        _require_trust(obj, ledger, False, trust_embedded_key)
        paths = build_report(ledger, out, at=at, runs=run_models, subjects=subjects, privacy=bounds,
                             dp_source=source)
        res = ledger.verify()
    click.echo(f"wrote {paths['html']} and {paths['json']}")
    if res.key_source.startswith("ledger"):
        click.echo(f"WARNING: {EMBEDDED_WARNING}")
    if not res.ok:
        click.echo("warning: the ledger FAILED verification; see the report", err=True)


for _command in (cli_identity.init, cli_identity.verify, cli_identity.pin, cli_impact.impact, cli_export.export):
    consent.add_command(_command)
