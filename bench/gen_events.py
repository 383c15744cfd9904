"""Generate an N-row events CSV for the ingest benchmark (never stored in git: write to bench/out/ or /tmp).

Shape: short-video shop events (views dominate), ~40 events per user, 0.1% unparseable timestamps,
0.1% unknown labels and 0.1% exact copies of earlier rows (some far from their original), written
in chunks so generation itself stays small in memory.

    python bench/gen_events.py --rows 10000000 --out bench/out/events_10m.csv
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import polars as pl

GEN_CHUNK = 500_000
COLUMNS = ("user_id", "ts", "event", "item_id", "category", "amount", "watch_seconds", "channel")
EVENTS = np.array(["view", "like", "comment", "share", "favorite", "cart", "purchase", "refund"])
P_EVENTS = np.array([0.6, 0.12, 0.03, 0.02, 0.04, 0.1, 0.08, 0.01])
CHANNELS = np.array(["short_video", "live", "search", "shelf"])
CATEGORIES = np.array(["beauty", "apparel", "snacks", "home"])


def generate(path: Path, rows: int, seed: int = 0, bad_fraction: float = 0.001) -> dict[str, int]:
    """Write ``rows`` events to ``path``; about ``bad_fraction`` are bad and as many are exact copies."""
    rng = np.random.default_rng(seed)
    start = np.datetime64("2025-01-01T00:00:00", "s")
    users = max(rows // 40, 1)
    written = bad = dups = 0
    previous: pl.DataFrame | None = None
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        fh.write((",".join(COLUMNS) + "\n").encode())
        while written < rows:
            n = min(GEN_CHUNK, rows - written)
            ev = rng.choice(EVENTS, size=n, p=P_EVENTS)
            monetary = np.isin(ev, ["purchase", "refund"])
            ts = (start + rng.integers(0, 300 * 86_400, size=n).astype("timedelta64[s]")).astype(str)
            ts[rng.random(n) < bad_fraction] = "not-a-time"
            k2 = rng.random(n) < bad_fraction
            ev_out = np.where(k2, "teleport", ev)
            bad += int(((ts == "not-a-time") | k2).sum())
            df = pl.DataFrame({
                "user_id": np.char.add("u", rng.integers(0, users, size=n).astype(str)),
                "ts": ts, "event": ev_out,
                "item_id": np.char.add("i", rng.integers(0, 5000, size=n).astype(str)),
                "category": rng.choice(CATEGORIES, size=n),
                "amount": np.where(monetary, np.round(rng.gamma(2.0, 30.0, size=n) + 1, 2), 0.0),
                "watch_seconds": np.where(ev == "view", np.round(rng.exponential(20.0, size=n), 1), 0.0),
                "channel": rng.choice(CHANNELS, size=n),
            })
            n_dup = int(n * bad_fraction)
            if n_dup:  # copies of rows of this chunk and of the previous one (across batch boundaries)
                pool = df if previous is None else pl.concat([previous, df.head(n - n_dup)])
                copies = pool[rng.integers(0, pool.height, size=n_dup).tolist()]
                df = pl.concat([df.head(n - n_dup), copies])
                dups += n_dup
            df.write_csv(fh, include_header=False)
            previous = df
            written += n
    return {"rows": rows, "bad_rows_approx": bad, "copies": dups, "bytes": path.stat().st_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(json.dumps(generate(args.out, args.rows, args.seed)))


if __name__ == "__main__":
    main()
