"""Value of joining: per merchant, local-only vs the federated model vs the federated model fine-tuned.

    python bench/bench_joining.py [--datasets synth-default,rare-repeat] [--workdir DIR] [--model logreg]

Each node compares, on its own held-out users (``fedretain.joining``), a model trained on its data
alone, the global model of a non-private FedAvg run (``bench_models.run_none``) and that model
fine-tuned for one epoch on its own data. Prints the share of merchants and of their customers for
whom the federated or personalised model beats local-only, and writes ``bench/out/joining.json``.
Target (issue 12): merchants holding at least 80 % of customers gain.

Rule (``fedretain.joining``): held-out log loss (proper, defined without positives); gain = local −
best shared with a 95 % paired interval; the local-only model starts at the merchant's own repeat
rate (Jeffreys), not the run's prior rate. Merchants whose held-out users hold no returning customer
are counted by their point estimate but also reported as undecidable (the comparison there only says
which model predicts lower chances), with the share among the decidable merchants beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch
from bench_models import REPO, load, nodes_of, run_none

from fedretain.joining import compare, summarize
from fedretain.train import TrainConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default="synth-default,rare-repeat")
    ap.add_argument("--model", default="logreg", choices=["logreg", "mlp"])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--workdir", default="")
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "joining.json"))
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    t_start = time.time()
    out: dict = {"args": vars(args), "datasets": {}}
    with tempfile.TemporaryDirectory(prefix="fedretain-joining-") as tmp:
        tmp = Path(args.workdir or tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        for name in args.datasets.split(","):
            silos, s, preps = load(name, tmp, args.rounds, 1.0)
            nodes = nodes_of(silos, preps)
            from dataclasses import replace

            sk = replace(s, model=args.model) if args.model == "logreg" else s
            model = run_none(nodes, sk, args.model, 0)
            cfg = TrainConfig(epochs=1, batch_size=s.batch_size, learning_rate=s.learning_rate)
            results = [compare(n["name"], model, n["x"], n["y"], n["xt"], n["yt"], cfg,
                               local_epochs=s.rounds * s.local_epochs)
                       for n in nodes if len(n["xt"])]
            summary = summarize(results)
            out["datasets"][name] = {"summary": summary, "nodes": [r.as_dict() for r in results]}
            print(f"\n== {name}: {summary['merchants']} merchants with held-out users")
            print(f"joining beats local-only for {summary['share_merchants_joining_helps']:.0%} of merchants, "
                  f"holding {summary['share_customers_joining_helps']:.0%} of customers "
                  f"(significant at 95 %, where a returning customer was held out, for "
                  f"{summary['share_merchants_significant']:.0%}; "
                  f"personalised best for {summary['share_merchants_personalised_best']:.0%}; local-only "
                  f"significantly better for {summary['share_merchants_local_significant']:.0%} of merchants, "
                  f"{summary['share_customers_local_significant']:.0%} of customers) "
                  f"— target ≥ 80 % of customers: "
                  f"{'PASS' if summary['share_customers_joining_helps'] >= 0.8 else 'FAIL'}")
            print(f"rule: held-out log loss, gain = local − best shared (95 % paired interval); local-only starts at "
                  f"the merchant's own repeat rate. Undecidable (no returning customer held out): "
                  f"{summary.get('share_merchants_undecidable', float('nan')):.0%} of merchants, "
                  f"{summary.get('share_customers_undecidable', float('nan')):.0%} of customers; among the decidable, "
                  f"joining beats local-only for "
                  f"{summary.get('share_customers_joining_helps_decidable', float('nan')):.0%} of customers "
                  f"(load average {os.getloadavg()[0]:.1f})")
            big = sorted(results, key=lambda r: -(r.n_train + r.n_test))[:5]
            print(f"{'merchant':14s} {'users':>6s} {'local':>7s} {'global':>7s} {'personal':>8s} {'gain':>8s} "
                  "95% interval")
            for r in big:
                ll = r.log_loss
                print(f"{r.merchant:14s} {r.n_train + r.n_test:6d} {ll['local']:7.4f} {ll['global']:7.4f} "
                      f"{ll['personalised']:8.4f} {r.gain:+8.4f} [{r.gain_low:+.4f}, {r.gain_high:+.4f}]")
    out["seconds"] = time.time() - t_start
    out["loadavg"] = os.getloadavg()
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=float))
    print(f"\nwrote {path} ({out['seconds']:.0f} s, load average {out['loadavg'][0]:.1f})")


if __name__ == "__main__":
    main()
