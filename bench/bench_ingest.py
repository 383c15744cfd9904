"""Benchmark: chunked ingest throughput and peak memory relative to the file size.

Writes an N-row events CSV (chunk by chunk, so generation itself stays small) with a few bad
rows and duplicates, then ingests it in a *fresh child process* so that ``ru_maxrss`` measures
the ingest alone. Prints rows/s and peak RSS as a multiple of the file size; the claim to check
is that memory stays bounded (well under 10x the file size) because the reader never holds the
raw text of the whole file.

    python bench/bench_ingest.py --rows 2000000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# numpy/pandas are imported inside the functions that run in child processes: Linux carries a
# process's peak RSS across exec, so the parent must stay small for the child's figure to be its own.

GEN_CHUNK = 250_000


def generate(path: Path, rows: int, seed: int = 0, bad_fraction: float = 0.001) -> dict[str, int]:
    """Write ``rows`` events to ``path``; about ``bad_fraction`` of them are bad, as many are exact copies."""
    import numpy as np
    import pandas as pd

    from fedretain.schema import CHANNELS, EVENT_COLUMN_NAMES

    rng = np.random.default_rng(seed)
    events = np.array(["view", "like", "comment", "share", "favorite", "cart", "purchase", "refund"])
    p_events = np.array([0.6, 0.12, 0.03, 0.02, 0.04, 0.1, 0.08, 0.01])
    start = np.datetime64("2025-01-01T00:00:00")
    written = bad = 0
    with path.open("w", newline="") as fh:
        fh.write(",".join(EVENT_COLUMN_NAMES) + "\n")
        while written < rows:
            n = min(GEN_CHUNK, rows - written)
            ev = rng.choice(events, size=n, p=p_events)
            monetary = np.isin(ev, ["purchase", "refund"])
            ts = start + rng.integers(0, 300 * 86_400, size=n).astype("timedelta64[s]")
            df = pd.DataFrame({
                "user_id": np.char.add("u", rng.integers(0, max(rows // 40, 1), size=n).astype(str)),
                "ts": np.datetime_as_string(ts, unit="s"),
                "event": ev,
                "item_id": np.char.add("i", rng.integers(0, 5000, size=n).astype(str)),
                "category": rng.choice(np.array(["beauty", "apparel", "snacks", "home"]), size=n),
                "amount": np.where(monetary, np.round(rng.gamma(2.0, 30.0, size=n) + 1, 2), 0.0),
                "watch_seconds": np.where(ev == "view", np.round(rng.exponential(20.0, size=n), 1), 0.0),
                "channel": rng.choice(np.array(CHANNELS), size=n),
            })
            k = rng.random(n) < bad_fraction  # bad rows: unparseable time, unknown label
            df.loc[k, "ts"] = "not-a-time"
            k2 = rng.random(n) < bad_fraction
            df.loc[k2, "event"] = "teleport"
            bad += int((k | k2).sum())
            n_dup = int(n * bad_fraction)
            if n_dup:  # exact copies of earlier rows of this chunk, appended at the end
                dups = df.iloc[rng.integers(0, n - n_dup, size=n_dup)]
                df = pd.concat([df.iloc[: n - n_dup], dups], ignore_index=True)
            df.to_csv(fh, header=False, index=False)
            written += n
    return {"rows": rows, "bad_rows_approx": bad}


def _vm_hwm() -> int:
    """Peak RSS of this process image from /proc (a cross-check of ru_maxrss), in bytes; 0 if unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def ingest_child(path: Path, chunksize: int) -> None:
    """Run in a fresh process: ingest ``path`` and print timings and memory as JSON."""
    import fedretain.ingest as ingest

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0, c0 = time.perf_counter(), time.process_time()
    df, report = ingest.read_events(path, chunksize=chunksize, now="2026-01-01",
                                    quarantine_path=path.parent / "events.rejected.csv")
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({
        "seconds": elapsed, "cpu_seconds": cpu, "peak_rss": peak, "baseline_rss": base, "vm_hwm": _vm_hwm(),
        "output_bytes": int(df.memory_usage(deep=True).sum()),
        "chunksize": chunksize, "rows_read": report.rows_read, "rows_accepted": report.rows_accepted,
        "rows_rejected": report.rows_rejected, "rejected_by_reason": report.rejected_by_reason,
    }))


def _child(*args: str) -> str:
    """Run this script in a fresh interpreter and return the last line it printed."""
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--chunksize", type=int, default=None, help="rows per chunk (default: ingest's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--generate", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        if args.chunksize == 0:
            from fedretain.ingest import DEFAULT_CHUNKSIZE

            args.chunksize = DEFAULT_CHUNKSIZE
        ingest_child(args.child, args.chunksize)
        return
    if args.generate is not None:
        print(json.dumps(generate(args.generate, args.rows, args.seed)))
        return

    with tempfile.TemporaryDirectory(prefix="bench_ingest_") as tmp:
        path = Path(tmp) / "events.csv"
        t0 = time.perf_counter()
        gen = json.loads(_child("--generate", str(path), "--rows", str(args.rows), "--seed", str(args.seed)))
        gen_s = time.perf_counter() - t0
        size = path.stat().st_size
        r = json.loads(_child("--child", str(path), "--chunksize", str(args.chunksize or 0)))
    if not args.chunksize:
        args.chunksize = r["chunksize"]
    mb = 1024 * 1024
    print(f"file:            {args.rows:,} rows, {size / mb:,.1f} MiB CSV (generated in {gen_s:.1f} s, "
          f"~{gen['bad_rows_approx']:,} bad rows + duplicates)")
    print(f"chunksize:       {args.chunksize:,} rows")
    print(f"ingest:          {r['seconds']:.2f} s, {r['rows_read'] / r['seconds']:,.0f} rows/s, "
          f"{size / mb / r['seconds']:.1f} MiB/s; CPU {r['cpu_seconds']:.2f} s = "
          f"{r['rows_read'] / r['cpu_seconds']:,.0f} rows per CPU-second (steadier on a shared machine)")
    print(f"rows:            read {r['rows_read']:,} = accepted {r['rows_accepted']:,} + rejected "
          f"{r['rows_rejected']:,} {r['rejected_by_reason']}")
    print(f"peak RSS:        {r['peak_rss'] / mb:,.0f} MiB = {r['peak_rss'] / size:.2f}x file size "
          f"(VmHWM {r['vm_hwm'] / mb:,.0f} MiB) "
          f"(interpreter + imports before ingest: {r['baseline_rss'] / mb:,.0f} MiB; "
          f"ingest's own: {(r['peak_rss'] - r['baseline_rss']) / size:.2f}x file size)")
    print(f"output frame:    {r['output_bytes'] / mb:,.0f} MiB = {r['output_bytes'] / size:.2f}x file size "
          "(canonical dtypes; the part that must stay in memory)")
    ratio = r["peak_rss"] / size
    print(f"bounded (<10x):  {'yes' if ratio < 10 else 'NO'}")


if __name__ == "__main__":
    main()
