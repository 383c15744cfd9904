"""The usage log: which training/analytics run used which subjects' data, under which ledger head.

It lives in the ledger's SQLite file, in its own append-only tables (``BEFORE UPDATE`` /
``BEFORE DELETE`` triggers abort), so that ``consent show USER`` can answer a data
subject's "who used my data, when, for what" from one file. Each entry pins the ledger
head (size and RFC 9162 root) the consent decision was taken against, which makes the
decision re-checkable later with an inclusion/consistency proof.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .records import format_ts, parse_ts
from .vocab import UnknownTermError, check_purpose, check_scope

__all__ = ["UsageRecord", "USAGE_SCHEMA", "record_usage", "record_usages", "usages"]

USAGE_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    usage_id     INTEGER PRIMARY KEY,
    run_id       TEXT NOT NULL,
    round        INTEGER NOT NULL,
    purpose      TEXT NOT NULL,
    feature_set  TEXT NOT NULL,
    scope_counts TEXT NOT NULL,      -- JSON object scope -> admitted users granting it
    n_users      INTEGER NOT NULL,
    ledger_size  INTEGER NOT NULL,
    ledger_root  TEXT NOT NULL,      -- hex RFC 9162 root of the ledger head used
    at           TEXT NOT NULL,      -- the point in time consent was evaluated at
    recorded_at  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_run ON usage(run_id);
CREATE TABLE IF NOT EXISTS usage_subjects (
    usage_id   INTEGER NOT NULL REFERENCES usage(usage_id),
    subject_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_subjects_subject ON usage_subjects(subject_id);
CREATE TRIGGER IF NOT EXISTS usage_no_update BEFORE UPDATE ON usage
BEGIN SELECT RAISE(ABORT, 'consent usage log is append-only: UPDATE refused'); END;
CREATE TRIGGER IF NOT EXISTS usage_no_delete BEFORE DELETE ON usage
BEGIN SELECT RAISE(ABORT, 'consent usage log is append-only: DELETE refused'); END;
CREATE TRIGGER IF NOT EXISTS usage_subjects_no_update BEFORE UPDATE ON usage_subjects
BEGIN SELECT RAISE(ABORT, 'consent usage log is append-only: UPDATE refused'); END;
CREATE TRIGGER IF NOT EXISTS usage_subjects_no_delete BEFORE DELETE ON usage_subjects
BEGIN SELECT RAISE(ABORT, 'consent usage log is append-only: DELETE refused'); END;
"""


@dataclass(frozen=True)
class UsageRecord:
    """One use of consented data by one round of one run."""

    usage_id: int
    run_id: str
    round: int
    purpose: str
    feature_set: str
    scope_counts: dict[str, int]
    n_users: int
    ledger_size: int
    ledger_root: str
    at: datetime
    recorded_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "usage_id": self.usage_id,
            "run_id": self.run_id,
            "round": self.round,
            "purpose": self.purpose,
            "feature_set": self.feature_set,
            "scope_counts": dict(self.scope_counts),
            "n_users": self.n_users,
            "ledger_size": self.ledger_size,
            "ledger_root": self.ledger_root,
            "at": format_ts(self.at),
            "recorded_at": format_ts(self.recorded_at),
        }


def record_usage(
    conn: sqlite3.Connection,
    run_id: str,
    round: int,
    purpose: str,
    feature_set: str | Iterable[str],
    scope_counts: Mapping[str, int],
    n_users: int,
    ledger_size: int,
    ledger_root: str,
    at: Any,
    subjects: Iterable[str],
) -> int:
    """Append one usage entry and its subjects in one transaction; returns the usage id.

    ``n_users`` must equal the number of distinct ``subjects``: the count reported to the
    server and the list a data subject can query must never disagree.
    """
    return record_usages(conn, [dict(run_id=run_id, round=round, purpose=purpose, feature_set=feature_set,
                                     scope_counts=scope_counts, n_users=n_users, ledger_size=ledger_size,
                                     ledger_root=ledger_root, at=at, subjects=subjects)])[0]


def _checked(run_id: str, round: int, purpose: str, feature_set: str | Iterable[str], scope_counts: Mapping[str, int],
             n_users: int, ledger_size: int, ledger_root: str, at: Any,
             subjects: Iterable[str]) -> tuple[tuple[Any, ...], list[str]]:
    """One entry validated (as :func:`record_usage` documents) into its row values and subjects."""
    if not isinstance(run_id, str) or not run_id.strip():
        raise ValueError("usage: run_id must be non-empty text")
    if int(round) < 0:
        raise ValueError(f"usage: round must be >= 0, got {round}")
    try:
        check_purpose(purpose)
        counts = {check_scope(str(k)): int(v) for k, v in dict(scope_counts).items()}
    except UnknownTermError as err:
        raise ValueError(f"usage: {err}") from None
    if any(v < 0 for v in counts.values()):
        raise ValueError("usage: scope counts must be >= 0")
    fs = feature_set if isinstance(feature_set, str) else ",".join(sorted(feature_set))
    subj = list(dict.fromkeys(str(s) for s in subjects))
    if len(subj) != int(n_users):
        raise ValueError(f"usage: n_users={n_users} but {len(subj)} distinct subjects were given")
    if any(v > len(subj) for v in counts.values()):
        raise ValueError("usage: a scope count exceeds the number of users")
    if len(ledger_root) != 64:
        raise ValueError("usage: ledger_root must be a 64-character hex SHA-256 root")
    at_txt = format_ts(parse_ts(at, "at"))
    row = (run_id, int(round), purpose, fs, json.dumps(counts, sort_keys=True), len(subj), int(ledger_size),
           ledger_root, at_txt)
    return row, subj


def record_usages(conn: sqlite3.Connection, entries: list[Mapping[str, Any]]) -> list[int]:
    """Append several usage entries (keyword arguments of :func:`record_usage`) in one transaction:
    all or none. A node answering one message that uses two phases (evaluate, then train) commits
    once instead of twice; every entry is validated before anything is written."""
    checked = [_checked(**e) for e in entries]
    now = format_ts(datetime.now(timezone.utc))
    ids: list[int] = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        for row, subj in checked:
            cur = conn.execute(
                "INSERT INTO usage (run_id, round, purpose, feature_set, scope_counts, n_users, ledger_size,"
                " ledger_root, at, recorded_at) VALUES (?,?,?,?,?,?,?,?,?,?)", (*row, now))
            usage_id = int(cur.lastrowid)  # type: ignore[arg-type]
            conn.executemany(
                "INSERT INTO usage_subjects (usage_id, subject_id) VALUES (?, ?)", ((usage_id, s) for s in subj)
            )
            ids.append(usage_id)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # SQLite already rolled back after a full disk or I/O error
            conn.execute("ROLLBACK")
        raise
    return ids


def usages(conn: sqlite3.Connection, subject: str | None = None) -> list[UsageRecord]:
    """All usage entries (oldest first), or those whose subjects include ``subject``."""
    cols = ("u.usage_id, run_id, round, purpose, feature_set, scope_counts, n_users, ledger_size, ledger_root, at, "
            "recorded_at")
    if subject is None:
        rows = conn.execute(f"SELECT {cols} FROM usage u ORDER BY u.usage_id").fetchall()
    else:
        rows = conn.execute(
            f"SELECT DISTINCT {cols} FROM usage u JOIN usage_subjects s ON s.usage_id = u.usage_id"
            " WHERE s.subject_id = ? ORDER BY u.usage_id",
            (subject,),
        ).fetchall()
    return [
        UsageRecord(
            usage_id=r[0], run_id=r[1], round=r[2], purpose=r[3], feature_set=r[4],
            scope_counts=json.loads(r[5]), n_users=r[6], ledger_size=r[7], ledger_root=r[8],
            at=parse_ts(r[9], "at"), recorded_at=parse_ts(r[10], "recorded_at"),
        )
        for r in rows
    ]
