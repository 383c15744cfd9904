"""What happened to the rows of one file: counts by reason and named examples (file, row, field).

Row numbers are 1-based record numbers *as in the file*: in a CSV the header is row 1, so the
first data row is row 2 (equal to the line number unless a quoted value spans lines); in a
Parquet file, which has no header row, the first data row is row 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["Problem", "IngestReport", "MAX_EXAMPLES_PER_REASON"]

MAX_EXAMPLES_PER_REASON = 20  # Problem records kept per (field, reason); counts are always complete


@dataclass(frozen=True)
class Problem:
    """One rejected value: where it is (file, row, field), why (reason), and what it was (value).

    ``row`` is numbered as in the file: in a CSV the header is row 1 (first data row = row 2),
    in Parquet the first row is row 1. ``field`` is the file's own column name, or ``"*"`` for
    the whole row (blank or duplicate rows). ``reason`` is a short key also used in
    ``IngestReport.rejected_by_reason``; ``detail`` adds specifics such as the row duplicated.
    """

    file: str
    row: int
    field: str
    reason: str
    value: str = ""
    detail: str = ""

    @property
    def message(self) -> str:
        """A one-line, human-readable description naming file, row and field."""
        text = f"{self.file}: row {self.row}, field {self.field!r}: {self.reason}"
        if self.detail:
            text += f" ({self.detail})"
        if self.value:
            text += f"; value {self.value!r}"
        return text

    def __str__(self) -> str:
        return self.message


@dataclass
class IngestReport:
    """What happened to every row of one file. ``rows_read == rows_accepted + rows_rejected``.

    ``rejected_by_reason`` counts each rejected row once, under its first problem in check order
    (so the counts sum to ``rows_rejected``); the quarantine file lists all of a row's problems.
    """

    file: str
    kind: str  # "events" | "users"
    rows_read: int = 0
    rows_accepted: int = 0
    rows_rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    date_min: pd.Timestamp | None = None
    date_max: pd.Timestamp | None = None
    n_users: int = 0
    quarantine_path: Path | None = None
    problems: list[Problem] = field(default_factory=list)
    event_counts: dict[str, int] = field(default_factory=dict)
    ignored_columns: list[str] = field(default_factory=list)
    n_users_without_attributes: int | None = None

    @property
    def date_range(self) -> tuple[pd.Timestamp, pd.Timestamp] | None:
        """(first, last) accepted event time, or None when nothing was accepted."""
        if self.date_min is None or self.date_max is None:
            return None
        return (self.date_min, self.date_max)

    @property
    def ok(self) -> bool:
        """True when no row was rejected."""
        return self.rows_rejected == 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable view (timestamps as ISO 8601 strings)."""
        return {
            "file": self.file,
            "kind": self.kind,
            "rows_read": self.rows_read,
            "rows_accepted": self.rows_accepted,
            "rows_rejected": self.rows_rejected,
            "rejected_by_reason": dict(self.rejected_by_reason),
            "date_min": None if self.date_min is None else self.date_min.isoformat(),
            "date_max": None if self.date_max is None else self.date_max.isoformat(),
            "n_users": self.n_users,
            "n_users_without_attributes": self.n_users_without_attributes,
            "event_counts": dict(self.event_counts),
            "ignored_columns": list(self.ignored_columns),
            "quarantine_path": None if self.quarantine_path is None else str(self.quarantine_path),
            "problems": [
                {"file": p.file, "row": p.row, "field": p.field, "reason": p.reason, "value": p.value,
                 "detail": p.detail, "message": p.message}
                for p in self.problems
            ],
        }
