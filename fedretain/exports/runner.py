"""Running a v2 mapping over a silo: files -> canonical tables -> the usual ingest validation.

Flow: read the sources; build events (and users) with ``build_table``; write them as Parquet
to ``<quarantine dir>/mapped/`` with a ``source_ref`` and ``source_rows`` column (so a row that
validation rejects can be traced to the file rows it came from); validate them with
``fedretain.ingest.read_events`` / ``read_users`` exactly like a plain silo; then give every source
row its verdict. ``ExportReport`` holds, per source file, rows read / accepted / skipped by rule /
quarantined by reason, and always ``read == accepted + skipped + quarantined``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedretain.exports.build import ACCEPTED, PENDING, QUARANTINED, SKIPPED, Built, Ledger, build_table
from fedretain.exports.expr import ExprError
from fedretain.exports.sources import check_all_columns, first_row, read_header, read_source
from fedretain.exports.spec import MappingError, MappingV2
from fedretain.ingest import IngestError, IngestReport, Silo, read_events, read_users, write_table
from fedretain.schema import canonical_users, empty_users

MAX_EXAMPLES = 20
_TRACE = ("source_ref", "source_rows")  # columns of the mapped tables that trace rows back to the files


@dataclass
class SourceReport:
    """What happened to every row of one source file."""

    name: str
    file: str
    rows_read: int = 0
    rows_accepted: int = 0
    skipped_by_rule: dict[str, int] = field(default_factory=dict)
    quarantined_by_reason: dict[str, int] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)  # up to MAX_EXAMPLES per reason
    quarantine_path: Path | None = None

    @property
    def rows_skipped(self) -> int:
        return sum(self.skipped_by_rule.values())

    @property
    def rows_quarantined(self) -> int:
        return sum(self.quarantined_by_reason.values())

    @property
    def conserved(self) -> bool:
        return self.rows_read == self.rows_accepted + self.rows_skipped + self.rows_quarantined

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.name, "file": self.file, "rows_read": self.rows_read,
                "rows_accepted": self.rows_accepted, "rows_skipped": self.rows_skipped,
                "rows_quarantined": self.rows_quarantined, "skipped_by_rule": dict(self.skipped_by_rule),
                "quarantined_by_reason": dict(self.quarantined_by_reason), "examples": list(self.examples),
                "quarantine_path": None if self.quarantine_path is None else str(self.quarantine_path),
                "conserved": self.conserved}


@dataclass
class ExportReport:
    """The mapping's account of every source file, plus value-map notes."""

    mapping: str
    sources: list[SourceReport]
    unmapped_values: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)  # table -> field -> value
    rejected_values: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(s.rows_quarantined == 0 for s in self.sources) and not self.rejected_values

    def to_dict(self) -> dict[str, Any]:
        return {"mapping": self.mapping, "sources": [s.to_dict() for s in self.sources],
                "unmapped_values": self.unmapped_values, "rejected_values": self.rejected_values}


@dataclass
class ExportSilo(Silo):
    """A silo read through a v2 mapping: the usual ``Silo`` plus the per-file account."""

    export_report: ExportReport | None = None


def run_export(folder: Path, spec: MappingV2, *, now=None, quarantine_dir: Path | None = None,
               chunksize: int = 100_000) -> tuple[pd.DataFrame, pd.DataFrame, IngestReport,
                                                    IngestReport | None, ExportReport]:
    """(events, users, events report, users report, export report) for a silo described by ``spec``."""
    headers = {name: read_header(folder, src, spec.where) for name, src in spec.sources.items()}
    check_all_columns(spec, headers)
    ledgers = {name: Ledger(src, read_source(folder, src), first_row(src)) for name, src in spec.sources.items()}
    qdir = Path(quarantine_dir) if quarantine_dir is not None else folder / "quarantine"
    mapped = qdir / "mapped"
    export = ExportReport(spec.where, [])

    built_events = _build(spec, spec.events, ledgers)
    ev_path = write_table(built_events.frame, mapped / "events.parquet")
    events, ev_report = read_events(ev_path, now=now, quarantine_path=qdir / "events.rejected.csv",
                                    chunksize=chunksize)
    _settle(built_events, ev_report, ledgers, spec.events.source)
    ev_report.ignored_columns = [c for c in ev_report.ignored_columns if c not in _TRACE]
    users, us_report = empty_users(), None
    if spec.users is not None:
        built_users = _build(spec, spec.users, ledgers)
        us_path = write_table(built_users.frame, mapped / "users.parquet")
        users, us_report = read_users(us_path, quarantine_path=qdir / "users.rejected.csv", chunksize=chunksize)
        _settle(built_users, us_report, ledgers, spec.users.source)
        us_report.ignored_columns = [c for c in us_report.ignored_columns if c not in _TRACE]
        if built_users.unmapped:
            export.unmapped_values["users"] = built_users.unmapped
        main = ledgers[spec.users.source]
        export.rejected_values = [
            {"file": main.source.file, "row": int(main.rows(np.array([pos]))[0]), "field": name, "value": value,
             "reason": "value not in the mapping's value map (row kept, value set missing)"}
            for pos, name, value in built_users.rejected_values]
    if built_events.unmapped:
        export.unmapped_values["events"] = built_events.unmapped
    for ledger in ledgers.values():
        ledger.decide(np.ones(len(ledger.state), dtype=bool), ACCEPTED, "")  # lookup-only rows were read fine
        export.sources.append(_source_report(ledger, qdir))
    return events, users, ev_report, us_report, export


def _build(spec: MappingV2, table, ledgers: dict[str, Ledger]) -> Built:
    """``build_table`` with an expression that fails on the data (``'a' * 2``) reported as a mapping error."""
    try:
        return build_table(spec, table, ledgers)
    except (ExprError, ZeroDivisionError, TypeError) as exc:
        raise MappingError(f"{spec.where}: {table.kind}: an expression cannot be evaluated: {exc}") from None


def _settle(built: Built, report: IngestReport, ledgers: dict[str, Ledger], main_name: str) -> None:
    """Verdicts for the rows behind each output row: quarantined if validation rejected it, else accepted."""
    main = ledgers[main_name]
    rejected: dict[int, str] = {}
    if report.quarantine_path is not None and report.rows_rejected:
        q = pd.read_csv(report.quarantine_path, dtype=str, keep_default_na=False)  # rejected rows, values unchanged
        reasons = q["_reason"] if "_reason" in q else pd.Series("rejected by validation", index=q.index)
        rejected = {int(r): why for r, why in zip(q["source_ref"], reasons)}
    if len(rejected) != report.rows_rejected:  # every rejected row must be traced back to its source rows
        raise IngestError(f"{report.file}: {report.rows_rejected} row(s) rejected but {len(rejected)} found in "
                          f"{report.quarantine_path}; the quarantine file was changed while it was read, run again")
    out = built.main_out
    has_out = out >= 0
    if rejected:
        ref = np.array(sorted(rejected), dtype=np.int64)
        bad = has_out & np.isin(out, ref)
        why = np.full(len(out), "", dtype=object)
        why[bad] = [f"{rejected[int(o)]} (after mapping; see {Path(report.file).name})" for o in out[bad]]
        main.decide(bad, QUARANTINED, why, "*")
    main.decide(has_out, ACCEPTED, "")
    for source, parent in built.children:
        child = ledgers[source]
        linked = parent >= 0
        p = np.maximum(parent, 0)
        state = np.where(linked, main.state[p], PENDING)
        for s in (SKIPPED, QUARANTINED):
            mask = linked & (state == s)
            if mask.any():
                why = np.array([f"{main.source.file} row {r}: {w}" if s == QUARANTINED else w
                                for r, w in zip(main.rows(p), main.why[p])], dtype=object)
                child.decide(mask, s, why, "*")
        child.decide(linked & (state == ACCEPTED), ACCEPTED, "")


def _source_report(ledger: Ledger, qdir: Path) -> SourceReport:
    rep = SourceReport(ledger.source.name, ledger.source.file, rows_read=len(ledger.state))
    rep.rows_accepted = int((ledger.state == ACCEPTED).sum())
    for state, target in ((SKIPPED, rep.skipped_by_rule), (QUARANTINED, rep.quarantined_by_reason)):
        mask = ledger.state == state
        if mask.any():
            for why, count in pd.Series(ledger.why[mask]).value_counts(sort=False).items():
                target[str(why)] = int(count)
    quarantined = np.flatnonzero(ledger.state == QUARANTINED)
    path = qdir / f"{Path(ledger.source.file).name}.rejected.csv"
    if len(quarantined):
        per_reason: dict[str, int] = {}
        for i in quarantined:
            why = str(ledger.why[i])
            if per_reason.get(why, 0) < MAX_EXAMPLES:
                per_reason[why] = per_reason.get(why, 0) + 1
                rep.examples.append({"file": ledger.source.file, "row": int(ledger.rows(np.array([i]))[0]),
                                     "field": str(ledger.field[i]), "reason": why, "value": str(ledger.value[i])})
        q = ledger.frame.iloc[quarantined].copy()
        q["_row"] = ledger.rows(quarantined)
        q["_field"] = ledger.field[quarantined]
        q["_reason"] = ledger.why[quarantined]
        rep.quarantine_path = write_table(q, path)
    elif path.is_file():
        path.unlink()  # a stale file from an earlier run must not sit next to a clean result
    return rep


def load_export_silo(folder: Path, spec: MappingV2, merchant: dict, *, now=None,
                     quarantine_dir: Path | None = None, chunksize: int = 100_000) -> ExportSilo:
    """The ``Silo`` of a folder described by a v2 mapping (see ``load_silo``)."""
    events, users, report, users_report, export = run_export(folder, spec, now=now, quarantine_dir=quarantine_dir,
                                                             chunksize=chunksize)
    event_users = pd.Index(events["user_id"].unique()).dropna()
    missing = event_users.difference(pd.Index(users["user_id"]))
    report.n_users_without_attributes = len(missing)
    if len(missing):
        extra = canonical_users(pd.DataFrame({"user_id": pd.Series(missing, dtype="string")}))
        users = pd.concat([users, extra], ignore_index=True) if len(users) else extra
    return ExportSilo(folder, merchant, events, users, report, users_report, None, export)
