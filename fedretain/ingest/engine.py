"""The batch loop: validate each raw batch, quarantine what fails, keep the rest, then settle duplicates.

Conservation holds by construction: every record read is either accepted or rejected
(``rows_read == rows_accepted + rows_rejected``), and every rejected row is in the quarantine file.
A rejected row is counted once, under its first problem in check order; the quarantine lists all.
Duplicates are settled after the last batch (one linear pass, see ``dedupe``), so a copy is found
whatever batch its first occurrence landed in.
Validation and row hashing of a batch need no state, so ``WORKERS`` threads run them ahead while the
calling thread does the file-order work (duplicate flags, counts, examples, quarantine) batch by batch,
in file order: results do not depend on the threads.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from fedretain.ingest.dedupe import DuplicateFinder, row_keys
from fedretain.ingest.quarantine import Quarantine
from fedretain.ingest.readers import RawBatch, RawTable
from fedretain.ingest.report import MAX_EXAMPLES_PER_REASON, IngestReport, Problem
from fedretain.ingest.rules import Check, RawColumns, Rules
from fedretain.mapping import ColumnMapping, IngestError
from fedretain.schema import EVENT_TYPES

__all__ = ["run", "WORKERS"]

# Batches validated at once: the file-order work (duplicates, quarantine) stays in the calling thread while
# the next batches are parsed, validated and hashed in workers (polars and numpy release the GIL).
WORKERS = 2


def run(raw: RawTable, rules: Rules, mapping: ColumnMapping,
        quarantine_path: Path) -> tuple[list[pa.Table], IngestReport]:
    """Validate every batch of ``raw``; return the accepted canonical rows (one Arrow table per batch) and the
    report."""
    file = raw.file
    renamed = mapping.rename(raw.columns, file=file)
    names = {ours: theirs for theirs, ours in renamed.items()}
    known = {c.name for c in rules.columns}
    missing = [c.name for c in rules.columns if c.required and c.name not in names]
    if missing:
        hint = " (map your column names in mapping.json 'columns')" if mapping.columns == {} else ""
        raise IngestError(
            f"{file}: missing required column(s) {', '.join(missing)} for a {rules.kind} file; "
            f"found columns: {', '.join(raw.columns) or '(none)'}{hint}"
        )
    report = IngestReport(file=file, kind=rules.kind)
    report.ignored_columns = [theirs for theirs, ours in renamed.items() if ours not in known]
    finder = DuplicateFinder()
    examples: dict[tuple[str, str], int] = {}
    accepted: list[tuple[pa.Table, np.ndarray]] = []  # compact Arrow copies: no raw batch buffers kept alive
    dup_field = "*" if rules.kind == "events" else names["user_id"]
    with Quarantine(quarantine_path) as quarantine, ThreadPoolExecutor(WORKERS) as pool:
        prepared = _in_order(pool, (partial(_prepare, b, rules, mapping, names) for b in raw.batches), WORKERS)
        for p in prepared:  # the file-order part: duplicates, counts, examples, quarantine
            rows, frame, checks = p.rows, p.frame, p.checks
            report.rows_read += len(rows)
            if p.clean is not None:
                good_rows = rows[~p.bad]
                maybe = finder.add(p.h1, p.h2, good_rows)
                if maybe.any():
                    finder.hold(frame[np.flatnonzero(~p.bad)[maybe]], good_rows[maybe], p.h1[maybe])
                accepted.append((p.clean, good_rows))
            if p.reasons is not None:
                report.rows_rejected += int(p.bad.sum())
                _count(report, checks, p.bad)
                _examples(report, examples, checks, frame, rows, file)
                quarantine.write(frame.filter(pl.Series(p.bad)), file, rows[p.bad], *p.reasons)
        dups = finder.finish()
        if dups.height:
            accepted = _settle_duplicates(report, examples, finder, dups, accepted, quarantine, rules,
                                          dup_field, file)
        report.rows_accepted = report.rows_read - report.rows_rejected
        report.quarantine_path = quarantine.commit()
    report.problems.sort(key=lambda p: p.row)  # stable: check order within a row
    frames = [df for df, _ in accepted if df.num_rows]
    accepted.clear()
    if frames:
        _summarise(report, frames)
    return frames, report


@dataclass
class _Prepared:
    """One batch, validated and hashed (the part that needs no file-order state, so it runs in a worker)."""

    rows: np.ndarray
    frame: pl.DataFrame  # raw values, as text
    checks: list[Check]
    bad: np.ndarray
    clean: pa.Table | None  # accepted canonical rows
    h1: np.ndarray
    h2: np.ndarray
    reasons: tuple[pl.Series, pl.Series] | None  # fields and reasons of the rejected rows


def _prepare(batch: RawBatch, rules: Rules, mapping: ColumnMapping, names: dict[str, str]) -> _Prepared:
    frame = pl.from_arrow(batch.table)
    assert isinstance(frame, pl.DataFrame)
    if any(isinstance(t, (pl.Categorical, pl.Enum)) for t in frame.dtypes):
        frame = frame.with_columns(pl.col(pl.Categorical, pl.Enum).cast(pl.String))
    cols = RawColumns(frame, names)
    checks, clean = rules.validate(cols, mapping)
    blank = checks[0].mask  # a blank row is one problem, not one per column
    for check in checks[1:]:
        check.mask = check.mask & ~blank
    bad = np.logical_or.reduce([c.mask for c in checks])
    h1 = h2 = np.zeros(0, dtype=np.uint64)
    table = None
    if not bad.all():
        good = ~bad
        h1, h2 = row_keys(rules.key_frame(cols))  # hash every row, keep the good rows' keys: no copy of the text
        h1, h2 = h1[good], h2[good]
        table = clean.filter(pl.Series(good)).to_arrow(compat_level=pl.CompatLevel.oldest())
    return _Prepared(batch.rows, frame, checks, bad, table, h1, h2, _row_reasons(checks, bad) if bad.any() else None)


def _in_order(pool: ThreadPoolExecutor, jobs: Iterator[Callable[[], _Prepared]], ahead: int) -> Iterator[_Prepared]:
    """Run jobs on the pool, at most ``ahead`` beyond the one being consumed; yield results in job order."""
    pending: deque[Future[_Prepared]] = deque()
    for job in jobs:
        pending.append(pool.submit(job))
        if len(pending) > ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _settle_duplicates(report: IngestReport, examples: dict[tuple[str, str], int], finder: DuplicateFinder,
                       dups: pl.DataFrame, accepted: list[tuple[pa.Table, np.ndarray]], quarantine: Quarantine,
                       rules: Rules, field: str, file: str) -> list[tuple[pa.Table, np.ndarray]]:
    """Move the rows that repeat an earlier row from the accepted batches to the quarantine."""
    dup_rows = dups.get_column("row").to_numpy()
    first = dups.get_column("first_row").to_numpy()
    reason = rules.duplicate_reason
    n = len(dup_rows)
    report.rows_rejected += n
    report.rejected_by_reason[reason] = report.rejected_by_reason.get(reason, 0) + n
    raw, held = finder.held_rows(dup_rows)
    order = np.argsort(held, kind="stable")
    raw, held = raw[order], held[order]  # now aligned with dup_rows (both sorted by row)
    value_col = field if rules.kind == "users" else None
    key = (field, reason)
    room = max(MAX_EXAMPLES_PER_REASON - examples.get(key, 0), 0)
    for i in range(min(room, n)):
        value = "" if value_col is None else _cell(raw.get_column(value_col)[i])
        report.problems.append(Problem(file, int(dup_rows[i]), field, reason, value, f"same as row {first[i]}"))
    examples[key] = examples.get(key, 0) + min(room, n)
    details = pl.Series(first).cast(pl.String)
    reasons = pl.select(pl.concat_str(pl.lit(f"{reason} (same as row "), details, pl.lit(")"))).to_series()
    quarantine.write_late(raw, file, dup_rows, pl.Series([field] * n, dtype=pl.String), reasons)
    gone = pl.Series(dup_rows).implode()
    for i, (df, rows) in enumerate(accepted):  # in place: each old batch is freed as soon as it is replaced
        keep = (~pl.Series(rows).is_in(gone)).to_numpy()
        if not keep.all():
            accepted[i] = (df.filter(pa.array(keep)), rows[keep])
    return accepted


def _count(report: IngestReport, checks: list[Check], bad: np.ndarray) -> None:
    """Count each rejected row once, under its first problem in check order."""
    first = np.argmax(np.vstack([c.mask[bad] for c in checks]), axis=0)
    for idx, count in zip(*np.unique(first, return_counts=True)):
        reason = checks[idx].reason
        report.rejected_by_reason[reason] = report.rejected_by_reason.get(reason, 0) + int(count)


def _examples(report: IngestReport, examples: dict[tuple[str, str], int], checks: list[Check],
              frame: pl.DataFrame, rows: np.ndarray, file: str) -> None:
    """Keep up to MAX_EXAMPLES_PER_REASON named problems per (field, reason); counts stay complete."""
    for check in checks:
        key = (check.field, check.reason)
        room = MAX_EXAMPLES_PER_REASON - examples.get(key, 0)
        if room <= 0 or not check.mask.any():
            continue
        where = np.flatnonzero(check.mask)[:room]
        examples[key] = examples.get(key, 0) + len(where)
        values = frame.get_column(check.values) if check.values is not None else None
        for i in where:
            value = "" if values is None else _cell(values[int(i)])
            report.problems.append(Problem(file, int(rows[i]), check.field, check.reason, value, check.detail))


def _row_reasons(checks: list[Check], bad: np.ndarray) -> tuple[pl.Series, pl.Series]:
    """All problems of each rejected row, in check order: ';'-joined fields and '; '-joined reasons."""
    used = [c for c in checks if c.mask[bad].any()]
    masks = pl.DataFrame({f"m{i}": c.mask[bad] for i, c in enumerate(used)})
    text = [c.reason + (f" ({c.detail})" if c.detail else "") for c in used]
    out = masks.select(
        pl.concat_str([pl.when(pl.col(f"m{i}")).then(pl.lit(c.field)) for i, c in enumerate(used)],
                      separator=";", ignore_nulls=True).alias("f"),
        pl.concat_str([pl.when(pl.col(f"m{i}")).then(pl.lit(t)) for i, t in enumerate(text)],
                      separator="; ", ignore_nulls=True).alias("r"),
    )
    return out.get_column("f"), out.get_column("r")


def _column(frames: list[pa.Table], name: str) -> pa.ChunkedArray:
    return pa.chunked_array([chunk for f in frames for chunk in f.column(name).chunks],
                            frames[0].schema.field(name).type)


def _summarise(report: IngestReport, frames: list[pa.Table]) -> None:
    """Users, time span and event counts of the accepted rows (event counts from the enum codes: no text)."""
    report.n_users = int(pc.count_distinct(_column(frames, "user_id")).as_py())
    if report.kind == "events":
        span = pc.min_max(_column(frames, "ts")).as_py()
        report.date_min, report.date_max = pd.Timestamp(span["min"]), pd.Timestamp(span["max"])
        found = np.zeros(len(EVENT_TYPES), dtype=np.int64)
        for chunk in _column(frames, "event").chunks:
            lut = np.array([EVENT_TYPES.index(v) for v in chunk.dictionary.to_pylist()], dtype=np.int64)
            found += np.bincount(lut[chunk.indices.drop_null().to_numpy()], minlength=len(EVENT_TYPES))
        report.event_counts = {t: int(found[i]) for i, t in enumerate(EVENT_TYPES) if found[i]}


def _cell(value: Any, limit: int = 200) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
