"""``fedretain consent export``: the ledger's records (all, or some subjects'), optionally with the usage log.

CSV is the import format (``consent import`` reads it back); JSON carries the signed head
and the node's public key so the export can be checked on its own. One read transaction:
the head written matches the records written. Progress goes to stderr, so stdout and the
file stay clean.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from .cli_base import _Ctx, _friendly, _loc, _open

__all__ = ["export", "PROGRESS_FROM"]

PROGRESS_FROM = 10_000  # records: smaller exports finish before a bar would help


def _records(ledger: Any, subjects: tuple[str, ...]) -> Iterator[Any]:
    if not subjects:
        yield from ledger.iter_records()
        return
    for s in dict.fromkeys(subjects):
        yield from ledger.iter_records(s)


def _count(ledger: Any, subjects: tuple[str, ...]) -> int:
    if not subjects:
        return int(ledger.connection.execute("SELECT COUNT(*) FROM records").fetchone()[0])
    uniq = list(dict.fromkeys(subjects))
    marks = ",".join("?" * len(uniq))
    return int(ledger.connection.execute(f"SELECT COUNT(*) FROM records WHERE subject_id IN ({marks})",
                                         uniq).fetchone()[0])


def _usage(ledger: Any, subjects: tuple[str, ...]) -> list[dict[str, Any]]:
    if not subjects:
        return [u.to_dict() for u in ledger.usages()]
    return [{"subject_id": s, **u.to_dict()} for s in dict.fromkeys(subjects) for u in ledger.usages(s)]


def _progress(total: int) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("exporting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), transient=True, disable=total < PROGRESS_FROM)


@click.command()
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), required=True)
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--subject", "subjects", multiple=True, help="export only this subject's records (repeatable)")
@click.option("--with-usage", is_flag=True,
              help="also export the usage log (JSON: a 'usage' list; CSV: OUT with .usage.csv beside it)")
@click.pass_obj
@_loc
@_friendly
def export(obj: _Ctx, fmt: str, out: Path, subjects: tuple[str, ...], with_usage: bool) -> None:
    """Export records (CSV in the import format, or JSON with the signed head), all or --subject's."""
    from .importer import OPTIONAL_COLUMNS, REQUIRED_COLUMNS

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    usage_out = out.with_name(out.stem + ".usage.csv")
    n = 0
    usage: list[dict[str, Any]] = []
    with _open(obj) as ledger:
        ledger.connection.execute("BEGIN")  # one snapshot: the head matches the records written
        unknown = [s for s in subjects if not ledger.connection.execute(
            "SELECT 1 FROM records WHERE subject_id = ? LIMIT 1", (s,)).fetchone()]
        if unknown:
            ledger.connection.execute("ROLLBACK")
            raise click.ClickException(f"no consent record for subject(s) {', '.join(map(repr, unknown))} in "
                                       f"{obj.db}; nothing was exported. Check the id(s)")
        total = _count(ledger, subjects)
        if with_usage:
            usage = _usage(ledger, subjects)
        with _progress(total) as bar:
            task = bar.add_task("export", total=total)
            if fmt == "csv":
                cols = list(dict.fromkeys(("record_id",) + REQUIRED_COLUMNS + OPTIONAL_COLUMNS))
                with tmp.open("w", newline="", encoding="utf-8") as fh:
                    w = csv.DictWriter(fh, fieldnames=cols)
                    w.writeheader()
                    for rec in _records(ledger, subjects):
                        d = rec.to_dict()
                        d["scopes"] = ";".join(d["scopes"])
                        d["expires_at"] = d["expires_at"] or ""
                        w.writerow({c: d[c] for c in cols})
                        n += 1
                        if n % 5000 == 0:
                            bar.update(task, completed=n)
            else:
                with tmp.open("w", encoding="utf-8") as fh:
                    head = ledger.head().to_dict()
                    fh.write('{"controller": ' + json.dumps(ledger.controller) + ', "head": ' + json.dumps(head)
                             + ', "public_key_pem": ' + json.dumps(ledger.public_key_pem)
                             + (', "subjects": ' + json.dumps(list(dict.fromkeys(subjects))) if subjects else "")
                             + (', "usage": ' + json.dumps(usage, ensure_ascii=False) if with_usage else "")
                             + ', "records": [\n')
                    for rec in _records(ledger, subjects):
                        fh.write((",\n" if n else "") + json.dumps(rec.to_dict(), ensure_ascii=False, sort_keys=True))
                        n += 1
                        if n % 5000 == 0:
                            bar.update(task, completed=n)
                    fh.write("\n]}\n")
            bar.update(task, completed=n)
        ledger.connection.execute("COMMIT")
        if with_usage and fmt == "csv":
            _write_usage_csv(usage_out, usage)
        os.replace(tmp, out)
    extra = (f" and {len(usage)} usage entr{'y' if len(usage) == 1 else 'ies'}"
             + (f" to {usage_out}" if fmt == "csv" else "")) if with_usage else ""
    click.echo(f"exported {n} record(s) to {out}{extra}")


def _write_usage_csv(path: Path, usage: list[dict[str, Any]]) -> None:
    cols = ["subject_id"] if usage and "subject_id" in usage[0] else []
    cols += ["usage_id", "run_id", "round", "purpose", "feature_set", "scope_counts", "n_users", "ledger_size",
             "ledger_root", "at", "recorded_at"]
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for u in usage:
            w.writerow({c: json.dumps(u[c], sort_keys=True) if c == "scope_counts" else u[c] for c in cols})
    os.replace(tmp, path)
