"""``fedretain data``: check a merchant silo, generate synthetic silos, import CDNOW.

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
    code = EXIT_OK if all(r.ok for r in reports) else EXIT_REJECTED
    if as_json:
        click.echo(json.dumps({
            "ok": code == EXIT_OK,
            "path": str(path),
            "merchant": None if silo is None else silo.merchant,
            "reports": [r.to_dict() for r in reports],
            "exit_code": code,
        }, indent=2, default=str))
    else:
        _print_check(Console(), path, silo, reports)
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


def _print_check(console: Console, path: Path, silo: Silo | None, reports: list[IngestReport]) -> None:
    title = f"[bold]{path}[/bold]"
    if silo is not None:
        m = silo.merchant
        title += f" — merchant {m['merchant_id']}" + (f" ({m['name']})" if m.get("name") else "")
        title += f", data_end {m['data_end']}"
    console.print(title)

    files = Table(title="Files", title_justify="left", box=box.SIMPLE_HEAD)
    for col in ("file", "read", "accepted", "rejected", "users", "date range"):
        files.add_column(col, overflow="fold", no_wrap=True,
                         justify="left" if col in ("file", "date range") else "right")
    for r in reports:
        files.add_row(Path(r.file).name, f"{r.rows_read:,}", f"{r.rows_accepted:,}",
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
            rej.add_row(reason, f"{n:,}", "\n".join(f"row {p.row}, {p.field!r}" + (f" = {p.value!r}" if p.value else "")
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
    if rejected:
        console.print(f"[red]{rejected:,} row(s) rejected[/red] (exit status {EXIT_REJECTED})")
    else:
        console.print(f"[green]OK[/green]: all {sum(r.rows_read for r in reports):,} rows accepted")


@data.command("synth")
@click.option("--merchants", "n_merchants", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--users", "n_users", type=click.IntRange(min=1), default=20_000, show_default=True,
              help="Total users over all merchants.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False), required=True)
@click.option("--mode", type=click.Choice(["default", "rare-repeat"]), default="default", show_default=True,
              help="rare-repeat: a long-tail marketplace (a few large sellers, many with a few customers each; "
                   "1-3% of buyers buy again within 30 days), e.g. --merchants 2000 --users 40000.")
def synth(n_merchants: int, n_users: int, seed: int, out_dir: Path, mode: str) -> None:
    """Generate synthetic merchant silos (one folder per merchant) and check each one."""
    from fedretain.synth import generate

    try:
        paths = generate(out_dir, n_merchants, n_users, seed, mode=mode)
    except (ValueError, FileExistsError) as exc:
        raise click.ClickException(str(exc)) from None
    click.get_current_context().exit(_print_created(Console(), paths, f"Synthetic silos in {out_dir}"))


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
