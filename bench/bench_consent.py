"""Benchmark the consent ledger against its floors, measured in the same process and run.

    python bench/bench_consent.py                          # 100k and 1M events, median of 3
    python bench/bench_consent.py --sizes 100000 --repeat 1 --steps

For every size it prints, next to each other and with the load average:

* ``import`` (``ConsentLedger.import_file`` of a CSV) against the *import floor*: the same
  rows, already in memory as Python tuples, chained with SHA-256 in plain Python and
  inserted with one ``executemany`` in one transaction into a fresh file with the ledger's
  schema, pragmas and indexes (built after the insert, the cheapest order). The floor
  reads no CSV, validates nothing, builds no JSON, no Merkle tree and signs nothing;
* ``verify`` (the full audit) against the *verify floor*: one ``SELECT`` of every
  record's canonical text and hashes, and the SHA-256 chain recomputed in plain Python;
* ``decide`` per round of a run (``fedretain.consent.incremental``): the run's first
  decision verifies in full, later rounds only the records appended since (``--append``
  new consent events before each round); the replay of the decision is shown apart, next to
  the uncached replay (every record read and factorized again, as before the replay cache).

Figures are medians over ``--repeat`` runs (wall and CPU seconds; CPU shows the cost when
the machine is shared). Everything is written to a temporary directory removed at the end.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedretain.consent import timing
from fedretain.consent.gate import decide
from fedretain.consent.incremental import IncrementalLedger
from fedretain.consent.ledger import ConsentLedger
from fedretain.consent.records import to_us
from fedretain.consent.replay import log_frame, replay_state
from fedretain.consent.store import INDEXES, PAGE_SIZE, SCHEMA, _connect, _statements
from fedretain.consent.vocab import PURPOSES, SCOPES

CONTROLLER = "bench-merchant"
AT = "2025-06-01T00:00:00Z"


def make_consent_csv(path: Path, n: int, n_subjects: int, seed: int = 0, first: int = 0) -> None:
    """``n`` consent events over ``n_subjects`` subjects: grants, some expiring, ~15% withdrawals."""
    rng = np.random.default_rng(seed)
    subj = rng.integers(0, n_subjects, n)
    if first == 0:
        subj[:n_subjects] = np.arange(min(n, n_subjects))  # every subject has at least one event
    action = np.where(rng.random(n) < 0.15, "withdraw", "grant")
    if first == 0:
        action[:n_subjects] = "grant"
    combos = np.array([";".join(s for j, s in enumerate(SCOPES) if m >> j & 1) for m in range(1, 1 << len(SCOPES))])
    scopes = combos[rng.integers(0, len(combos), n)]
    scopes = np.where((action == "withdraw") & (rng.random(n) < 0.5), "", scopes)
    base = np.datetime64("2024-01-01T00:00:00", "s")
    eff = base + rng.integers(0, 365 * 86400, n).astype("timedelta64[s]")
    has_exp = (action == "grant") & (rng.random(n) < 0.2)
    exp = eff + rng.integers(86400, 200 * 86400, n).astype("timedelta64[s]")
    pd.DataFrame({
        "subject_id": np.char.add("u", subj.astype(str)),
        "controller": CONTROLLER,
        "purpose": np.array(PURPOSES)[rng.integers(0, 2, n)],
        "scopes": scopes,
        "action": action,
        "effective_at": np.char.add(np.datetime_as_string(eff, unit="s"), "Z"),
        "expires_at": np.where(has_exp, np.char.add(np.datetime_as_string(exp, unit="s"), "Z"), ""),
        "collection_method": "app_dialog",
        "notice_version": "v3",
        "jurisdiction": "CN",
        "recorded_by": "bench",
    }).to_csv(path, index=False)


@contextmanager
def timed(out: dict[str, list[float]], name: str) -> Iterator[None]:
    """Append the wall and CPU seconds of the block to ``out[name]`` and ``out[name + ' cpu']``."""
    gc.collect()
    w, c = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        out.setdefault(name, []).append(time.perf_counter() - w)
        out.setdefault(name + " cpu", []).append(time.process_time() - c)
        out.setdefault(name + " load", []).append(os.getloadavg()[0])


def _fresh(path: Path) -> None:
    for suffix in ("", "-journal", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)


def import_floor(rows: list[tuple[Any, ...]], path: Path) -> None:
    """SHA-256 chain in plain Python + one executemany, one transaction, the ledger's schema and pragmas."""
    _fresh(path)
    conn = _connect(path)
    conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
    for stmt in _statements(SCHEMA):
        conn.execute(stmt)
    sha = hashlib.sha256
    prev = bytes(32)
    out = []
    for seq, rid, subj, purpose, action, scopes, eff, exp, text, layout in rows:
        entry = sha(prev + sha(b"\x00" + text.encode("utf-8")).digest()).digest()
        out.append((seq, rid, subj, purpose, action, scopes, eff, exp, text, prev, entry, layout))
        prev = entry
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO records (seq, record_id, subject_id, purpose, action, scopes, effective_at, "
                     "expires_at, canonical, prev_hash, entry_hash, layout) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", out)
    for stmt in INDEXES.values():
        conn.execute(stmt)
    conn.execute("COMMIT")
    conn.close()


def verify_floor(path: Path) -> int:
    """Read every record's canonical text and hashes, recompute the SHA-256 chain in plain Python."""
    conn = sqlite3.connect(str(path))
    sha = hashlib.sha256
    prev = bytes(32)
    n = 0
    for text, prev_hash, entry_hash in conn.execute("SELECT canonical, prev_hash, entry_hash FROM records "
                                                    "ORDER BY seq"):
        entry = sha(prev + sha(b"\x00" + text.encode("utf-8")).digest()).digest()
        if prev_hash != prev or entry_hash != entry:
            raise AssertionError(f"chain broken at {n + 1}")
        prev = entry
        n += 1
    conn.close()
    return n


def _steps(enabled: bool) -> dict[str, float] | None:
    timing.STEP_CPU = {} if enabled else None
    return timing.STEP_CPU


def one_size(n: int, args: argparse.Namespace, tmp: Path) -> dict[str, list[float]]:
    """Measure one size ``--repeat`` times; returns every figure's samples."""
    csv = tmp / f"consent-{n}.csv"
    make_consent_csv(csv, n, n)
    extra = []
    for r in range(args.rounds):  # the consent events appended before each later round
        path = tmp / f"consent-{n}-round{r + 1}.csv"
        make_consent_csv(path, args.append, n, seed=100 + r, first=n)
        extra.append(path)
    users = pd.Index(np.char.add("u", np.arange(n).astype(str)), dtype=object)
    out: dict[str, list[float]] = {}
    for rep in range(args.repeat):
        led_path = tmp / f"ledger-{n}.sqlite"
        _fresh(led_path)
        ledger = ConsentLedger.open(led_path, key_path=tmp / "node.key", create=True, controller=CONTROLLER)
        cpu = _steps(args.steps and rep == 0)
        with timed(out, "import"):
            ledger.import_file(csv)
        if cpu:
            print("  import steps (cpu s): " + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()))
        rows = ledger.connection.execute("SELECT seq, record_id, subject_id, purpose, action, scopes, effective_at, "
                                         "expires_at, canonical, layout FROM records ORDER BY seq").fetchall()
        with timed(out, "import floor"):
            import_floor(rows, tmp / "floor.sqlite")
        del rows
        _fresh(tmp / "floor.sqlite")

        cpu = _steps(args.steps and rep == 0)
        with timed(out, "verify"):
            res = ledger.verify()
        assert res.ok, res.describe()
        if cpu:
            print("  verify steps (cpu s): " + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()))
        _steps(False)
        with timed(out, "verify floor"):
            assert verify_floor(led_path) == n

        state = tmp / f"state-{n}"
        state.mkdir(exist_ok=True)
        (state / "verified_head.json").unlink(missing_ok=True)
        checked = _TimedVerify(ledger, state, f"bench-{rep}", out)
        checked.label = "  full verify"
        with timed(out, "decide round 1 (full verify)"):
            decision = decide(checked, PURPOSES[0], AT, users)
        checked.label = "  incremental verify"
        for path in extra:
            ledger.import_file(path)  # consent changed between rounds
            with timed(out, "decide later round"):
                decision = decide(checked, PURPOSES[0], AT, users)
        with timed(out, "  replay"):
            ledger.state_at(PURPOSES[0], AT, subjects=users, size=decision.ledger_size)
        with timed(out, "  replay, uncached"):  # the anchor: every record read and factorized again
            replay_state(log_frame(ledger.connection, PURPOSES[0], AT, size=decision.ledger_size), to_us(AT, "at"),
                         users)
        ledger.close()
    return out


class _TimedVerify(IncrementalLedger):
    """The node's incremental ledger, timing its ``verify`` (the rest of ``decide`` is the replay)."""

    def __init__(self, ledger: ConsentLedger, state: Path, run_id: str, out: dict[str, list[float]]) -> None:
        super().__init__(ledger, state, run_id)
        self.out, self.label = out, ""

    def verify(self, public_key: Any = None) -> Any:
        with timed(self.out, self.label):
            return super().verify(public_key)


def report(n: int, out: dict[str, list[float]], repeat: int) -> None:
    def med(name: str) -> float:
        return statistics.median(out[name])

    def row(name: str, anchor: str | None = None) -> None:
        text = f"  {name:<30}wall {med(name):7.2f} s  cpu {med(name + ' cpu'):7.2f} s  load {med(name + ' load'):4.1f}"
        if anchor:
            text += (f"   / {anchor}: wall x{med(name) / med(anchor):4.2f}, "
                     f"cpu x{med(name + ' cpu') / med(anchor + ' cpu'):4.2f}")
        print(text)

    print(f"{n:,} consent events (median of {repeat}):")
    row("import floor")
    row("import", "import floor")
    row("verify floor")
    row("verify", "verify floor")
    row("decide round 1 (full verify)")
    row("  full verify")
    if "decide later round" in out:
        row("decide later round")
        row("  incremental verify")
    row("  replay", "  replay, uncached")
    row("  replay, uncached")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="100000,1000000", help="comma-separated numbers of consent events "
                    "(as many subjects; every subject is a user to decide)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per size; medians are printed")
    ap.add_argument("--rounds", type=int, default=2, help="later rounds of a run, each after --append new events")
    ap.add_argument("--append", type=int, default=1000, help="consent events appended before each later round")
    ap.add_argument("--steps", action="store_true", help="print the CPU seconds of import/verify steps (1st run)")
    ap.add_argument("--tmp", default=None, help="directory for the temporary files (default: system temp)")
    args = ap.parse_args(argv)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start "
          "(wall time suffers when shared; CPU seconds less so)")
    for n in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            report(n, one_size(n, args, Path(tmp)), args.repeat)


if __name__ == "__main__":
    main()
