"""Benchmark: reading an order-line export through mapping v2, against reading the same events plainly.

Generates one synthetic order-line export (``fedretain.synth_exports``), reads it with ``load_silo``
(mapping v2: derive, skip rules, grouping of lines into invoices, users with value maps, then the
usual validation), and as the anchor reads the resulting canonical events and users written as a
plain silo, in the same process. Prints lines/s and the ratio v2 / plain, with the load average.

    python bench/bench_exports.py --users 40000
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def best_of(n: int, fn) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=40_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    from fedretain.ingest import load_silo, write_table
    from fedretain.synth_exports import generate_exports

    with tempfile.TemporaryDirectory() as tmp:
        (silo,) = generate_exports(Path(tmp) / "ol", "orderlines", n_merchants=1, n_users=args.users, seed=0)
        now = "2030-01-01"
        mapped = load_silo(silo, now=now)
        lines = mapped.export_report.sources[0].rows_read
        plain = Path(tmp) / "plain"
        plain.mkdir()
        write_table(mapped.events, plain / "events.csv")
        write_table(mapped.users, plain / "users.csv")
        (plain / "merchant.json").write_text(json.dumps(mapped.merchant))
        t_v2 = best_of(args.repeat, lambda: load_silo(silo, now=now))
        t_plain = best_of(args.repeat, lambda: load_silo(plain, now=now))
    load = os.getloadavg()
    print(f"order-line export: {lines:,} lines -> {len(mapped.events):,} events, {len(mapped.users):,} users")
    print(f"mapping v2 load_silo : {t_v2:7.3f} s  ({lines / t_v2:,.0f} lines/s)")
    print(f"plain load_silo      : {t_plain:7.3f} s  (anchor: same events and users as canonical CSV)")
    print(f"ratio v2 / plain     : {t_v2 / t_plain:7.2f}")
    print(f"load average         : {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
