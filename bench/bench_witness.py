"""Cost of ledger witnessing per reply, next to the full ledger verify the gate runs (same process).

    python bench/bench_witness.py [--records 100000] [--repeats 5]

Node: building the ``witness`` record when the ledger did not change since the platform last
saw it (no proof to compute) and when it grew by one record (a consistency proof over all
leaves). Platform: judging one reply (signature + proof). Anchor: ``ConsentLedger.verify()``
on the same ledger. Also the incremental gate verify of a later round (one appended record).
Prints medians and the load average.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def _median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from fedretain.clients.node import NodeConfig
    from fedretain.clients.witnessing import _PROOFS, witness_values
    from fedretain.consent.incremental import verify_incremental
    from fedretain.consent.ledger import ConsentLedger
    from fedretain.consent.records import ConsentRecord
    from fedretain.consent.witness_record import decode
    from fedretain.server.witness import WitnessStore

    with tempfile.TemporaryDirectory(prefix="fedretain-witness-") as tmp:
        silo = Path(tmp) / "silo"
        silo.mkdir()
        (silo / "merchant.json").write_text(json.dumps({"merchant_id": "m1", "data_end": "2024-06-30"}))
        cfg = NodeConfig.for_silo(silo)
        src = Path(tmp) / "consent.csv"
        with src.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["subject_id", "controller", "purpose", "scopes", "action", "effective_at"])
            for i in range(args.records):
                w.writerow([f"u{i}", "m1", "retention_modeling", "purchase_history;engagement", "grant",
                            f"2024-01-{1 + i % 28:02d}T10:00:00Z"])
        with ConsentLedger.create(cfg.consent_db, controller="m1", key_path=cfg.node_key) as ledger:
            ledger.import_file(src)
        store = WitnessStore(Path(tmp) / "witness.db")
        first = decode(witness_values(cfg))
        store.witness("m1", first.claims, "bench")
        n = first.claims["consent"].head.size

        with ConsentLedger.open(cfg.consent_db, key_path=cfg.node_key) as ledger:
            full = _median(lambda: ledger.verify(), args.repeats)
            verify_incremental(ledger, cfg.state_dir, "bench")  # the run's first decision (full)
        steady = _median(lambda: witness_values(cfg, {"consent": n}), args.repeats)
        judge_steady = _median(lambda: store.witness("m1", decode(witness_values(cfg, {"consent": n})).claims,
                                                     "bench"), args.repeats)
        grown, incr = [], []
        for k in range(args.repeats):
            with ConsentLedger.open(cfg.consent_db, key_path=cfg.node_key) as ledger:
                ledger.append(ConsentRecord.withdraw(f"u{k}", "m1", "retention_modeling", "2024-03-01T00:00:00Z"))
                t = time.perf_counter()
                assert verify_incremental(ledger, cfg.state_dir, "bench").ok
                incr.append(time.perf_counter() - t)
            _PROOFS.clear()
            seen = store.seen("m1")
            t = time.perf_counter()
            values = witness_values(cfg, seen)
            grown.append(time.perf_counter() - t)
            refused, _ = store.witness("m1", decode(values).claims, "bench")
            assert not refused, refused
        store.close()

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"ledger of {args.records:,} records; median of {args.repeats}; load average {load}")
    print(f"{'step':<58}{'seconds':>10}{'x full verify':>15}")
    rows = [("anchor: full ledger verify (ConsentLedger.verify)", full),
            ("node: witness record, ledger unchanged (no proof)", steady),
            ("node: witness record after +1 record (consistency proof)", statistics.median(grown)),
            ("node + platform: record and judgement, unchanged", judge_steady),
            ("node: incremental gate verify after +1 record", statistics.median(incr))]
    for name, secs in rows:
        print(f"{name:<58}{secs:>10.4f}{secs / full:>15.3f}")


if __name__ == "__main__":
    main()
