"""Benchmark the consent ledger and gate: bulk import, verify, point-in-time replay, gating.

    python bench/bench_consent.py                # 1M consent events, 1M users
    python bench/bench_consent.py --n 100000     # quicker

Prints one line per measured step (wall-clock seconds and a rate). Everything is written
to a temporary directory that is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from fedretain.consent import timing
from fedretain.consent.gate import apply_gate, decide
from fedretain.consent.ledger import ConsentLedger
from fedretain.consent.vocab import PURPOSES, SCOPES
from fedretain.schema import EVENT_TYPES, canonical_events, canonical_users


def make_consent_csv(path: Path, n: int, n_subjects: int, seed: int = 0) -> None:
    """``n`` consent events over ``n_subjects`` subjects: grants, some expiring, ~15% withdrawals."""
    rng = np.random.default_rng(seed)
    subj = rng.integers(0, n_subjects, n)
    subj[:n_subjects] = np.arange(min(n, n_subjects))  # every subject has at least one event
    action = np.where(rng.random(n) < 0.15, "withdraw", "grant")
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
        "controller": "bench-merchant",
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


class Timer:
    """Wall-clock and CPU seconds of a block (CPU shows the cost when the machine is shared)."""

    wall = cpu = 0.0


@contextmanager
def timed():
    t = Timer()
    w, c = time.perf_counter(), time.process_time()
    yield t
    t.wall, t.cpu = time.perf_counter() - w, time.process_time() - c


def line(step: str, n: int, unit: str, t: Timer, rate_unit: str = "", extra: str = "") -> None:
    rate = f"{n / t.wall:12,.0f} {rate_unit}/s" if rate_unit else " " * 20
    print(f"{step:<11}{n:>10,} {unit:<15} wall {t.wall:7.2f} s  cpu {t.cpu:7.2f} s  {rate}  {extra}".rstrip())


@contextmanager
def steps():
    """Collect the CPU seconds of the ledger's internal steps (``timing.STEP_CPU``) for a block."""
    timing.STEP_CPU = {}
    try:
        yield timing.STEP_CPU
    finally:
        timing.STEP_CPU = None


def step_lines(cpu: dict[str, float]) -> None:
    for name, sec in cpu.items():
        print(f"  {name:<28}cpu {sec:7.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="consent events to import")
    ap.add_argument("--users", type=int, default=1_000_000, help="users to gate")
    ap.add_argument("--events-per-user", type=int, default=3)
    ap.add_argument("--tmp", default=None, help="directory for the temporary files (default: system temp)")
    args = ap.parse_args()
    n_subjects = min(args.users, args.n)

    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (wall time suffers when shared)")
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp_p = Path(tmp)
        csv = tmp_p / "consent.csv"
        with timed() as t:
            make_consent_csv(csv, args.n, n_subjects)
        line("generate", args.n, "consent events", t, extra=f"({csv.stat().st_size / 1e6:.0f} MB CSV)")

        ledger = ConsentLedger.open(tmp_p / "ledger.sqlite", key_path=tmp_p / "node.key", create=True,
                                    controller="bench-merchant")
        with timed() as t, steps() as cpu:
            added = ledger.import_file(csv)
        line("import", added, "consent events", t, "events",
             f"({(tmp_p / 'ledger.sqlite').stat().st_size / 1e6:.0f} MB ledger, load {os.getloadavg()[0]:.1f})")
        step_lines(cpu)

        with timed() as t, steps() as cpu:
            res = ledger.verify()
        assert res.ok, res.describe()
        line("verify", res.n_records, "records", t, "records", f"(load {os.getloadavg()[0]:.1f})")
        step_lines(cpu)

        at = "2024-09-01T00:00:00Z"
        with timed() as t:
            state = ledger.state_at(PURPOSES[0], at)
        line("state_at", len(state), "subjects", t, extra="(replay of one purpose's log)")

        rng = np.random.default_rng(1)
        user_ids = np.char.add("u", np.arange(args.users).astype(str))
        n_ev = args.users * args.events_per_user
        events = canonical_events(pd.DataFrame({
            "user_id": user_ids[rng.integers(0, args.users, n_ev)],
            "ts": np.datetime64("2024-06-01", "s") + rng.integers(0, 90 * 86400, n_ev).astype("timedelta64[s]"),
            "event": np.array(EVENT_TYPES)[rng.integers(0, len(EVENT_TYPES), n_ev)],
            "amount": rng.random(n_ev) * 100,
        }))
        users = canonical_users(pd.DataFrame({
            "user_id": user_ids,
            "referral": np.array(["friend_share", "organic"])[rng.integers(0, 2, args.users)],
            "member_tier": np.array(["none", "silver", "gold", "platinum"])[rng.integers(0, 4, args.users)],
            "city_tier": rng.integers(1, 6, args.users),
        }))

        with timed() as t:
            decision = decide(ledger, PURPOSES[0], at, users["user_id"])
        line("decide", args.users, "users", t, "users",
             f"(verify + replay; {len(decision.grants):,} admitted)")
        with timed() as t:
            ledger.state_at(PURPOSES[0], at, subjects=users["user_id"], size=decision.ledger_size)
        line("  replay", args.users, "users", t, "users", "(decide without its verify)")
        with timed() as t:
            gated = apply_gate(decision, events, users)
        line("apply_gate", args.users, "users", t, "users", f"({n_ev:,} events in, {len(gated.events):,} out)")
        ledger.close()


if __name__ == "__main__":
    main()
