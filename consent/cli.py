"""``fedretain consent``: the compliance officer's command line for a node's consent ledger.

Every command opens the ledger given by ``--db``; commands that write sign with the node
key given by ``--key`` (default: ``<db>.key.pem`` next to the ledger, created by ``init``).
User errors print one clear message and exit 1 (never a traceback); ``verify`` exits 1
when the ledger was tampered with and names the first bad record.
"""

from __future__ import annotations

import csv
import functools
import getpass
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import click

from .vocab import PURPOSES, SCOPES

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class _Ctx:
    db: Path
    key: Path
    key_given: bool


def _friendly(fn: F) -> F:
    """Turn expected errors (bad input, missing files, tampering) into a clean message and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .gate import ConsentError
        from .importer import ConsentImportError
        from .ledger import LedgerError
        from .signing import KeyFileError

        try:
            return fn(*args, **kwargs)
        except ConsentImportError as exc:
            lines = [str(exc)]
            if len(exc.errors) > 1:
                lines.append("first problems:")
                lines += [f"  row {r}, field {f!r}: {m}" for r, f, m in exc.errors[:10]]
            raise click.ClickException("\n".join(lines)) from None
        except (LedgerError, KeyFileError, ConsentError, ValueError, OSError) as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper  # type: ignore[return-value]


def _open(ctx: _Ctx, *, write: bool = False) -> Any:
    from .ledger import ConsentLedger

    if write or ctx.key_given or ctx.key.exists():
        return ConsentLedger.open(ctx.db, key_path=ctx.key)
    return ConsentLedger.open(ctx.db)


def _console() -> Any:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # piped or captured: wide enough that ids and timestamps stay whole
        console = Console(width=200)
    return console


def _ts(text: str | None) -> str:
    """Canonical timestamp text, shortened for tables: ``2024-01-01 00:00:00`` (UTC)."""
    if not text:
        return ""
    short = text.replace("T", " ").removesuffix("Z")
    return short.removesuffix(".000000")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _default_by() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


@click.group("consent")
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path), default="consent-ledger.sqlite",
              show_default=True, envvar="FEDRETAIN_CONSENT_DB", help="the node's consent ledger (SQLite file)")
@click.option("--key", type=click.Path(dir_okay=False, path_type=Path), default=None, envvar="FEDRETAIN_NODE_KEY",
              help="the node's Ed25519 private key (PEM) [default: <db>.key.pem]")
@click.pass_context
def consent(ctx: click.Context, db: Path, key: Path | None) -> None:
    """Record, inspect, verify and report a node's consent ledger."""
    ctx.obj = _Ctx(db=db, key=key if key is not None else db.with_suffix(".key.pem"), key_given=key is not None)


@consent.command()
@click.option("--controller", required=True, help="the merchant id this node's ledger belongs to")
@click.pass_obj
@_friendly
def init(obj: _Ctx, controller: str) -> None:
    """Create a new ledger and (if missing) the node's signing key."""
    from . import signing
    from .ledger import ConsentLedger

    existed = obj.key.exists()
    ledger = ConsentLedger.create(obj.db, controller=controller, key_path=obj.key)
    pub = obj.key.with_name(obj.key.name + ".pub")
    if not pub.exists():
        pub.write_text(signing.public_key_pem(ledger.public_key))
    click.echo(f"created consent ledger {obj.db} for controller {ledger.controller!r}")
    click.echo(f"node key {obj.key} ({'existing' if existed else 'new, mode 0600'}), public key {pub}")
    click.echo(f"key fingerprint {ledger.key_fingerprint}")
    ledger.close()


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
@_record_opts
@click.pass_obj
@_friendly
def withdraw(obj: _Ctx, user: str, purpose: str, scopes: str, at: str | None, method: str, notice: str,
             jurisdiction: str, by: str | None) -> None:
    """Record that USER withdraws SCOPES (default: all) for PURPOSE."""
    from .records import ConsentRecord

    with _open(obj, write=True) as ledger:
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
@_friendly
def show(obj: _Ctx, user: str, as_json: bool, at: str | None) -> None:
    """USER's full consent history, state now, and which runs used their data."""
    from .records import format_ts, parse_ts

    at_dt = parse_ts(at, "at") if at else _now()
    with _open(obj) as ledger:
        hist = ledger.history(user)
        state = {p: [s for s, v in ledger.state_at(p, at_dt, subjects=[user]).iloc[0].items() if v]
                 for p in PURPOSES}
        used = [u.to_dict() for u in ledger.usages(user)]
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
        for c in ("run", "round", "purpose", "features", "consent at", "ledger size", "recorded"):
            u.add_column(c, overflow="fold")
        for x in used:
            u.add_row(x["run_id"], str(x["round"]), x["purpose"], x["feature_set"], _ts(x["at"]),
                      str(x["ledger_size"]), _ts(x["recorded_at"]))
        console.print(u)
    else:
        console.print(f"no run has used {user}'s data")


@consent.command()
@click.option("--public-key", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="verify against this public key PEM instead of the node key")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@click.option("--against", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="also check the ledger against the heads the platform witnessed (a run.json or its witness.db)")
@click.pass_obj
@_friendly
def verify(obj: _Ctx, public_key: Path | None, as_json: bool, against: Path | None = None) -> None:
    """Check the hash chain, indexed columns, Merkle roots and signatures (exit 1 if tampered)."""
    from .signing import load_public_key
    from .witness_check import check_file

    pub = load_public_key(public_key) if public_key is not None else None
    with _open(obj) as ledger:
        res = ledger.verify(pub)
        seen = check_file(ledger, against, pub) if against is not None else None
    if as_json:
        click.echo(json.dumps({**res.to_dict(), **({"against": seen.to_dict()} if seen else {})}, indent=2))
    else:
        click.echo(res.describe() + (f"\n{seen.describe()}" if seen else ""))
        if res.ok and res.key_source.startswith("ledger"):
            click.echo("note: no node key or --public-key was given, so the signatures were checked against the "
                       "key the ledger itself declares", err=True)
    if not res.ok or (seen is not None and not seen.ok):
        raise SystemExit(1)


@consent.command()
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="folder for report.html and report.json")
@click.option("--at", "at", default=None, help="report the state at this time [default: now]")
@click.pass_obj
@_friendly
def report(obj: _Ctx, out: Path, at: str | None) -> None:
    """Write an HTML + JSON compliance report (coverage, withdrawals, usage, verification)."""
    from .report import build_report

    with _open(obj) as ledger:
        paths = build_report(ledger, out, at=at)
        ok = ledger.verify().ok
    click.echo(f"wrote {paths['html']} and {paths['json']}")
    if not ok:
        click.echo("warning: the ledger FAILED verification; see the report", err=True)


@consent.command()
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), required=True)
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.pass_obj
@_friendly
def export(obj: _Ctx, fmt: str, out: Path) -> None:
    """Export every record (CSV in the import format, or JSON with the signed head)."""
    from .importer import OPTIONAL_COLUMNS, REQUIRED_COLUMNS

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    n = 0
    with _open(obj) as ledger:
        ledger.connection.execute("BEGIN")  # one snapshot: the head matches the records written
        if fmt == "csv":
            cols = list(dict.fromkeys(("record_id",) + REQUIRED_COLUMNS + OPTIONAL_COLUMNS))
            with tmp.open("w", newline="", encoding="utf-8") as fh:
                w = csv.DictWriter(fh, fieldnames=cols)
                w.writeheader()
                for rec in ledger.iter_records():
                    d = rec.to_dict()
                    d["scopes"] = ";".join(d["scopes"])
                    d["expires_at"] = d["expires_at"] or ""
                    w.writerow({c: d[c] for c in cols})
                    n += 1
        else:
            with tmp.open("w", encoding="utf-8") as fh:
                head = ledger.head().to_dict()
                fh.write('{"controller": ' + json.dumps(ledger.controller) + ', "head": ' + json.dumps(head)
                         + ', "public_key_pem": ' + json.dumps(ledger.public_key_pem) + ', "records": [\n')
                for rec in ledger.iter_records():
                    fh.write((",\n" if n else "") + json.dumps(rec.to_dict(), ensure_ascii=False, sort_keys=True))
                    n += 1
                fh.write("\n]}\n")
        ledger.connection.execute("COMMIT")
        os.replace(tmp, out)
    click.echo(f"exported {n} record(s) to {out}")
