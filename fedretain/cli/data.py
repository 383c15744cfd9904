"""``fedretain data``: check a merchant silo, generate synthetic silos, import CDNOW.

``data check`` also compares the user ids of the events with the subject ids of ``consent.csv``
(overlap, users without consent, and a hint when the ids differ only in format such as
``12471.0`` vs ``12471``). A silo read through a version 2 mapping also shows, per source file,
rows read = accepted + skipped by rule + quarantined.

``data check`` exit status (so scripts and CI can gate on it):

* 0 — every row was accepted;
* 1 — some rows were rejected (they are in the quarantine file; the rest is usable);
* 2 — a file-level error (missing folder/file/column, corrupt file, bad merchant.json or mapping).
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import pandas as pd
from rich import box
from rich.console import Console
from rich.table import Table

from fedretain.exports.ids import Overlap, compare_ids
from fedretain.exports.runner import ExportReport
from fedretain.ingest import IngestError, IngestReport, Silo, load_silo, read_events, read_users

EXIT_OK, EXIT_REJECTED, EXIT_FILE_ERROR = 0, 1, 2
EXAMPLES_SHOWN = 3


@click.group()
def data() -> None:
    """Check, generate and import merchant silos."""


@data.command("check")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--mapping", "mapping_path", type=click.Path(path_type=Path, dir_okay=False),
              help="mapping.json to use instead of the one next to the data.")
@click.option("--quarantine-dir", type=click.Path(path_type=Path, file_okay=False),
              help="Where rejected rows go (default: <silo>/quarantine).")
@click.option("--now", "now", default=None, metavar="ISO_TIME",
              help="Timestamps later than this are 'future' (default: current UTC time).")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable JSON report.")
def check(path: Path, mapping_path: Path | None, quarantine_dir: Path | None, now: str | None, as_json: bool) -> None:
    """Validate a silo folder or a single events/users file and summarise what was accepted.

    A silo read through a version 2 mapping (the shop's own export files, see docs/MAPPING.md)
    shows per file: read = accepted + skipped by rule + quarantined. The silo's consent.csv is
    compared with the events' user ids (overlap, users without consent, id format hints).

    Exit status: 0 if every row was accepted, 1 if some rows were rejected (see the quarantine
    file), 2 on a file-level error (missing file or column, corrupt file, bad merchant.json).
    """
    try:
        silo, reports = _check(path, mapping_path, quarantine_dir, now)
    except IngestError as exc:
        if as_json:
            click.echo(json.dumps({"ok": False, "path": str(path), "error": str(exc), "exit_code": EXIT_FILE_ERROR}))
        else:
            click.echo(f"error: {exc}", err=True)
        click.get_current_context().exit(EXIT_FILE_ERROR)
    export = getattr(silo, "export_report", None)
    overlap = consent_overlap(silo) if silo is not None else None
    code = EXIT_OK if all(r.ok for r in reports) and (export is None or export.ok) else EXIT_REJECTED
    if as_json:
        click.echo(json.dumps({
            "ok": code == EXIT_OK,
            "path": str(path),
            "merchant": None if silo is None else silo.merchant,
            "reports": [r.to_dict() for r in reports],
            "export": None if export is None else export.to_dict(),
            "consent": overlap.to_dict() if isinstance(overlap, Overlap) else overlap,
            "exit_code": code,
        }, indent=2, default=str))
    else:
        console = Console()
        if export is not None:
            _print_export(console, export)
        _print_check(console, path, silo, reports)
        if overlap is not None:
            _print_consent(console, overlap)
    click.get_current_context().exit(code)


def _check(path: Path, mapping_path: Path | None, quarantine_dir: Path | None,
           now: str | None) -> tuple[Silo | None, list[IngestReport]]:
    """Run the checks: a folder is a silo, a file is an events file (or users file if named users.*)."""
    if now is not None:
        try:
            pd.Timestamp(now)
        except ValueError:
            raise IngestError(f"--now: not an ISO 8601 time: {now!r}") from None
    if path.is_dir():
        silo = load_silo(path, mapping=mapping_path, now=now, quarantine_dir=quarantine_dir)
        return silo, [r for r in (silo.report, silo.users_report) if r is not None]
    if not path.exists():
        raise IngestError(f"{path}: no such file or folder")
    mapping = mapping_path
    if mapping is None and (path.parent / "mapping.json").is_file():
        mapping = path.parent / "mapping.json"
    qpath = None if quarantine_dir is None else Path(quarantine_dir) / f"{path.stem}.rejected.csv"
    if path.stem == "users":
        _, report = read_users(path, mapping=mapping, quarantine_path=qpath)
    else:
        _, report = read_events(path, mapping=mapping, now=now, quarantine_path=qpath)
    return None, [report]


def consent_overlap(silo: Silo) -> Overlap | str | None:
    """Event user ids against ``consent.csv`` subject ids; a message string when the file is unusable."""
    path = silo.consent_path
    if path is None:
        return None
    try:
        subjects = pd.read_csv(path, dtype=str, keep_default_na=False, usecols=["subject_id"])["subject_id"]
    except ValueError:
        return f"{path}: no 'subject_id' column; cannot compare consent with the events"
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        return f"{path}: cannot read: {exc}"
    return compare_ids(silo.events["user_id"], subjects)


def _print_consent(console: Console, overlap: Overlap | str) -> None:
    if isinstance(overlap, str):
        console.print(f"[yellow]consent:[/yellow] {overlap}", soft_wrap=True)
        return
    o = overlap
    share = o.n_both / o.n_users if o.n_users else 1.0
    line = (f"Consent file: {o.n_subjects:,} subject(s); {o.n_both:,} of {o.n_users:,} user(s) with events "
            f"appear in it ({share:.0%}); {o.users_without_consent:,} user(s) without any consent record "
            f"(the consent gate drops their data)")
    console.print(line if share >= 0.5 else f"[yellow]{line}[/yellow]", soft_wrap=True)
    if o.hint:
        console.print(f"[yellow]hint:[/yellow] {o.hint}", soft_wrap=True)


def _print_export(console: Console, export: ExportReport) -> None:
    """Per source file: read = accepted + skipped (by rule) + quarantined (by reason)."""
    table = Table(title=f"Source files (mapping {Path(export.mapping).name})", title_justify="left",
                  box=box.SIMPLE_HEAD, caption="read = accepted + skipped + quarantined", caption_justify="left")
    for col in ("file", "read", "accepted", "skipped", "quarantined"):
        table.add_column(col, overflow="fold", no_wrap=col == "file", justify="left" if col == "file" else "right")
    rules = Table(title="Skipped by rule (declared in the mapping)", title_justify="left",
                  box=box.SIMPLE_HEAD)
    for col in ("file", "rule", "rows"):
        rules.add_column(col, overflow="fold", justify="right" if col == "rows" else "left")
    for s in export.sources:
        table.add_row(s.file, f"{s.rows_read:,}", f"{s.rows_accepted:,}", f"{s.rows_skipped:,}",
                      f"[red]{s.rows_quarantined:,}[/red]" if s.rows_quarantined else "0")
        for rule, n in s.skipped_by_rule.items():
            rules.add_row(s.file, rule, f"{n:,}")
    console.print(table)
    if rules.row_count:
        console.print(rules)
    for s in export.sources:
        if not s.rows_quarantined:
            continue
        rej = Table(title=f"Quarantined rows of {s.file}", title_justify="left")
        rej.add_column("reason", overflow="fold")
        rej.add_column("rows", justify="right")
        rej.add_column("examples (row, field, value)", overflow="fold")
        for reason, n in sorted(s.quarantined_by_reason.items(), key=lambda kv: -kv[1]):
            ex = [e for e in s.examples if e["reason"] == reason][:EXAMPLES_SHOWN]
            rej.add_row(reason, f"{n:,}", "\n".join(f"row {e['row']}, {e['field']!r}"
                                                    + (f" = {e['value']!r}" if e["value"] else "") for e in ex))
        console.print(rej)
        console.print(f"quarantine: {s.quarantine_path}", soft_wrap=True)
    for table_name, fields in export.unmapped_values.items():
        for name, values in fields.items():
            shown = ", ".join(f"{v!r} ({n:,})" for v, n in list(values.items())[:5])
            console.print(f"{table_name}.{name}: value(s) not in the mapping's value map, set missing: {shown}",
                          soft_wrap=True)
    for r in export.rejected_values[:EXAMPLES_SHOWN]:
        console.print(f"[red]{r['file']}: row {r['row']}, field {r['field']!r}: {r['reason']}; value {r['value']!r}",
                      soft_wrap=True)
    if len(export.rejected_values) > EXAMPLES_SHOWN:
        console.print(f"[red]... {len(export.rejected_values) - EXAMPLES_SHOWN:,} more rejected value(s)[/red]")


def _label(silo: Silo | None, report: IngestReport) -> str:
    """A file's name; for tables built by a v2 mapping, what they are (their files are under quarantine/mapped)."""
    if getattr(silo, "export_report", None) is not None:
        return f"{report.kind} (mapped)"
    return Path(report.file).name


def _print_check(console: Console, path: Path, silo: Silo | None, reports: list[IngestReport]) -> None:
    title = f"[bold]{path}[/bold]"
    if silo is not None:
        m = silo.merchant
        title += f" — merchant {m['merchant_id']}" + (f" ({m['name']})" if m.get("name") else "")
        title += f", data_end {m['data_end']}"
    console.print(title)

    files = Table(title="Files", title_justify="left", box=box.SIMPLE_HEAD)
    for col in ("file", "read", "accepted", "rejected", "users", "date range"):
        numeric = col not in ("file", "date range")  # numbers never wrap or crop; names and dates may fold
        files.add_column(col, overflow="fold", no_wrap=numeric, min_width=None if not numeric else len(col),
                         justify="right" if numeric else "left")
    for r in reports:
        files.add_row(_label(silo, r), f"{r.rows_read:,}", f"{r.rows_accepted:,}",
                      f"[red]{r.rows_rejected:,}[/red]" if r.rows_rejected else "0", f"{r.n_users:,}",
                      _date_range(r))
    console.print(files)

    for r in reports:
        if r.ignored_columns:
            console.print(f"{Path(r.file).name}: ignored column(s) not in the schema: {', '.join(r.ignored_columns)}")
        if not r.rows_rejected:
            continue
        first_row = "the header is row 1" if Path(r.file).suffix.lower() == ".csv" else "the first row is row 1"
        rej = Table(title=f"Rejected rows in {Path(r.file).name} (by first problem)", title_justify="left",
                    caption=f"rows are numbered as in the file: {first_row}", caption_justify="left")
        rej.add_column("reason", overflow="fold")
        rej.add_column("rows", justify="right")
        rej.add_column("examples (row, field, value)", overflow="fold")
        for reason, n in sorted(r.rejected_by_reason.items(), key=lambda kv: -kv[1]):
            examples = [p for p in r.problems if p.reason == reason][:EXAMPLES_SHOWN]
            rej.add_row(reason, f"{n:,}", "\n".join(
                f"row {p.row}, {p.field!r}" + (f" = {p.value!r}" if p.value else "")
                + (f" ({p.detail})" if p.detail and p.detail.startswith("same") else "")
                for p in examples))
        console.print(rej)
        console.print(f"quarantine: {r.quarantine_path}", soft_wrap=True)

    events = next((r for r in reports if r.kind == "events"), None)
    if events is not None and events.event_counts:
        mix = Table(title="Event mix (accepted)", title_justify="left")
        mix.add_column("event")
        mix.add_column("rows", justify="right")
        mix.add_column("share", justify="right")
        total = sum(events.event_counts.values())
        for name, n in sorted(events.event_counts.items(), key=lambda kv: -kv[1]):
            mix.add_row(name, f"{n:,}", f"{n / total:.1%}")
        console.print(mix)
    if events is not None and events.n_users_without_attributes:
        console.print(f"{events.n_users_without_attributes:,} user(s) in events have no users-file row "
                      "(kept, with unknown attributes)")
    rejected = sum(r.rows_rejected for r in reports)
    export = getattr(silo, "export_report", None)
    if export is not None:  # a v2 mapping: count in the files' own rows
        quarantined = sum(s.rows_quarantined for s in export.sources)
        if quarantined or export.rejected_values:
            console.print(f"[red]{quarantined:,} source row(s) quarantined, {len(export.rejected_values):,} "
                          f"value(s) rejected[/red] (exit status {EXIT_REJECTED})")
        else:
            read = sum(s.rows_read for s in export.sources)
            skipped = sum(s.rows_skipped for s in export.sources)
            console.print(f"[green]OK[/green]: all {read:,} source rows accepted or skipped by rule "
                          f"({skipped:,} skipped)")
    elif rejected:
        console.print(f"[red]{rejected:,} row(s) rejected[/red] (exit status {EXIT_REJECTED})")
    else:
        console.print(f"[green]OK[/green]: all {sum(r.rows_read for r in reports):,} rows accepted")


@data.command("synth")
@click.option("--merchants", "n_merchants", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--users", "n_users", type=click.IntRange(min=1), default=20_000, show_default=True,
              help="Total users over all merchants.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False), required=True)
@click.option("--shape", type=click.Choice(["events", "orderlines", "marketplace"]), default="events",
              show_default=True,
              help="events: the canonical tables; orderlines / marketplace: a shop's own export files plus "
                   "the mapping.json that reads them (and truth.csv with purchases and spend per customer).")
@click.option("--mode", type=click.Choice(["default", "rare-repeat"]), default="default", show_default=True,
              help="rare-repeat: a long-tail marketplace (a few large sellers, many with a few customers each; "
                   "1-3% of buyers buy again within 30 days), e.g. --merchants 2000 --users 40000.")
def synth(n_merchants: int, n_users: int, seed: int, out_dir: Path, shape: str, mode: str) -> None:
    """Generate synthetic merchant silos (one folder per merchant) and check each one."""
    try:
        if shape == "events":
            from fedretain.synth import generate

            paths = generate(out_dir, n_merchants, n_users, seed, mode=mode)
        else:
            if mode != "default":
                raise click.UsageError("--mode rare-repeat writes canonical silos: use it with --shape events")
            from fedretain.synth_exports import generate_exports

            paths = generate_exports(out_dir, shape, n_merchants, n_users, seed)
    except (ValueError, FileExistsError) as exc:
        raise click.ClickException(str(exc)) from None
    title = f"Synthetic silos in {out_dir}" + ("" if shape == "events" else f" ({shape} exports)")
    click.get_current_context().exit(_print_created(Console(), paths, title))


@data.command("import-cdnow")
@click.argument("src", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False), required=True)
@click.option("--merchants", "n_merchants", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--split", type=click.Choice(["hash", "non-iid", "power-law"]), default="hash", show_default=True,
              help="How customers are dealt to merchants.")
@click.option("--seed", type=int, default=0, show_default=True)
def import_cdnow_cmd(src: Path, out_dir: Path, n_merchants: int, split: str, seed: int) -> None:
    """Import the CDNOW transactions file into merchant silos."""
    from fedretain.datasets.cdnow import import_cdnow

    try:
        paths = import_cdnow(src, out_dir, n_merchants, split, seed)
    except (ValueError, FileExistsError) as exc:
        raise click.ClickException(str(exc)) from None
    click.get_current_context().exit(_print_created(Console(), paths, f"CDNOW silos in {out_dir} (split {split})"))


def _print_created(console: Console, paths: list[Path], title: str) -> int:
    """Check each created silo and print one table row per silo; 1 if any row was rejected, 2 on errors."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    for col in ("silo", "events", "users", "date range", "rejected"):
        table.add_column(col, overflow="fold", no_wrap=col != "silo",
                         justify="right" if col in ("events", "users", "rejected") else "left")
    worst = EXIT_OK
    for p in paths:
        try:
            silo = load_silo(p)
        except IngestError as exc:
            table.add_row(Path(p).name, "", "", "", f"[red]error: {exc}[/red]")
            worst = EXIT_FILE_ERROR
            continue
        rejected = silo.report.rows_rejected + (silo.users_report.rows_rejected if silo.users_report else 0)
        export = getattr(silo, "export_report", None)
        if export is not None:  # rows quarantined before validation (not a number, no matching order, ...)
            rejected += sum(s.rows_quarantined for s in export.sources)
        if rejected:
            worst = max(worst, EXIT_REJECTED)
        name = Path(p).name if Path(p).name == silo.merchant_id else f"{Path(p).name} ({silo.merchant_id})"
        table.add_row(name, f"{len(silo.events):,}", f"{len(silo.users):,}",
                      _date_range(silo.report),
                      f"[red]{rejected:,}[/red]" if rejected else "0")
    console.print(table)
    return worst


def _date_range(report: IngestReport) -> str:
    if report.date_range is None:
        return ""
    first, last = report.date_range
    return f"{first:%Y-%m-%d} .. {last:%Y-%m-%d}"
