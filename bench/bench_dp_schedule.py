"""DP defaults that fit the data (issue 12): aggregate mode's auto schedule vs the old fixed defaults.

    python bench/bench_dp_schedule.py [--seeds 2] [--epsilon 3] [--datasets cdnow-hash,synth-small]

For each dataset the same aggregate-mode DP-SGD (``bench_dp_utility``: real ledgers, SecAgg+'s own
arithmetic, ``ServerDPSGD``) runs with

* ``fixed B=4096, 5 rounds``  — what ``fedretain simulate --dp-mode aggregate`` did before (its --rounds
  default and the 4096 batch; below 4,096 customers q is clamped to 1);
* ``fixed B=4096, 50 rounds`` — the benchmarked CDNOW working point (docs/PRIVACY.md);
* ``auto``                    — ``fedretain.privacy.schedule.aggregate_schedule`` for the pooled N.

Printed: pooled held-out AUC (exact, the yardstick) and the schedule (B, q, rounds, σ, warnings), with
the load average (2 shared cores). With ``--local``: local DP-SGD with the old fixed batch 256 on
every node vs the batch sized per silo (``local_batch_size``), 10 rounds × ``local-epochs``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from bench_dp_utility import AGGREGATE, PURPOSE, _nodes, _set_budgets, scores, secagg_sum
from cdnow_protocol import make_silos, settings

EVAL_SHARE = 0.1  # as the runs: ε_train = ε − 10% for the evaluation release


def run(nodes, s, seed: int, epsilon: float, batch: float, rounds: int, run_id: str):
    from fedretain.models import RetentionNet
    from fedretain.privacy.aggregate import ServerDPSGD, contribute, plan_aggregate

    n_total = sum(len(n["x"]) for n in nodes)
    plan = plan_aggregate(epsilon, 0.0, n_total, batch, rounds, AGGREGATE["max_grad_norm"])
    torch.manual_seed(seed)
    model = RetentionNet(nodes[0]["x"].shape[1], s.hidden)
    server = ServerDPSGD(model, plan, AGGREGATE["server_learning_rate"], noise_seed=seed)
    for rnd in range(1, plan.rounds + 1):
        vectors = [contribute(n["ledger"], run_id, PURPOSE, rnd, plan, copy.deepcopy(model), n["x"], n["y"],
                              noise_seed=seed * 1_000_003 + rnd * 1009 + i)[0] for i, n in enumerate(nodes)]
        server.step(secagg_sum(vectors, plan))
    return model, plan


def run_local(nodes, s, seed: int, epsilon: float, batches: list[int], run_id: str):
    """Local DP-SGD (``DPTrainer`` with real ledgers), each node with its own batch; unweighted FedAvg."""
    from bench_dp_utility import LOCAL, fedavg

    from fedretain.privacy.dp_trainer import DPConfig, DPTrainer
    from fedretain.train import TrainConfig

    return fedavg(nodes, s, seed, lambda i, r: DPTrainer(
        TrainConfig(epochs=s.local_epochs, batch_size=batches[i], learning_rate=LOCAL["learning_rate"]),
        DPConfig(epsilon, max_grad_norm=LOCAL["max_grad_norm"], total_rounds=s.rounds,
                 noise_seed=seed * 1_000_003 + r * 1009 + i), nodes[i]["ledger"], run_id, PURPOSE, r), False)


def local_rows(name: str, nodes, s, eps: float, seeds: int) -> None:
    from fedretain.privacy.schedule import local_batch_size

    sizes = [len(n["x"]) for n in nodes]
    for label, batches in (("local, fixed batch 256", [256] * len(nodes)),
                           ("local, auto (n/8 in [32, 1024])", [local_batch_size(n) for n in sizes])):
        t0 = time.time()
        aucs = [scores(run_local(nodes, s, seed, eps, batches, f"{name}-{label}-{seed}"), nodes)["auc"]
                for seed in range(seeds)]
        spread = statistics.stdev(aucs) if len(aucs) > 1 else 0.0
        print(f"{label:<32} batches {batches} (n {sizes}), {s.rounds} rounds × {s.local_epochs} epochs  "
              f"AUC {statistics.mean(aucs):.4f} ± {spread:.4f}  ({time.time() - t0:.0f} s)", flush=True)


def load(name: str, tmp: Path):
    if name == "cdnow-hash":
        s = settings(tmp / "unused", 10)
        nodes, _ = _nodes(make_silos(tmp / name, 10, "hash"), s, "public")
    elif name == "synth-small":  # a small pool: 4 synthetic merchants, a few thousand buyers
        nodes, s = synth_nodes(tmp / name)
    else:
        raise SystemExit(f"unknown dataset {name}")
    _set_budgets(nodes, 1e4)
    return s, nodes


def synth_nodes(root: Path):
    """The synthetic default generator's merchants, each node's own split at its own clock (consent now)."""
    from fedretain.clients.node import MerchantNode, NodeConfig
    from fedretain.clients.provision import provision_node
    from fedretain.features import DEFAULT_FEATURES
    from fedretain.synth import generate
    from fedretain.transforms import public_standardizer

    silos = generate(root, n_merchants=4, n_users=1500, seed=11)
    s = settings(root / "unused", 10, cutoff="", horizon_days=30.0, features=DEFAULT_FEATURES)
    scaler = public_standardizer(s.features)
    nodes = []
    for silo in silos:
        provision_node(silo)
        p = MerchantNode(NodeConfig.for_silo(silo)).prepare(s.purpose, list(s.features), s.horizon_days)
        nodes.append(dict(name=silo.name, ledger=silo / ".node" / "privacy.db", x=scaler.transform(p.x_train),
                          y=p.y_train, xt=scaler.transform(p.x_test), yt=p.y_test))
    return nodes, s


def main() -> None:
    from fedretain.privacy.schedule import aggregate_schedule

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--epsilon", type=float, default=3.0)
    ap.add_argument("--datasets", default="cdnow-hash,synth-small")
    ap.add_argument("--local", action="store_true", help="also local DP-SGD: fixed batch 256 vs sized per silo")
    ap.add_argument("--no-aggregate", action="store_true")
    ap.add_argument("--also", default="", help="more fixed schedules to compare, e.g. 143:50,573:50 (B:rounds)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    eps = args.epsilon * (1 - EVAL_SHARE)
    with tempfile.TemporaryDirectory(prefix="fedretain-dp-schedule-") as tmp:
        for name in args.datasets.split(","):
            s, nodes = load(name, Path(tmp))
            n_total = sum(len(n["x"]) for n in nodes)
            auto = aggregate_schedule(eps, 0.0, n_total)
            configs = [("fixed B=4096, 5 rounds", 4096.0, 5), ("fixed B=4096, 50 rounds", 4096.0, 50),
                       ("auto", auto.expected_batch, auto.rounds)]
            configs += [(f"fixed B={b}, {r} rounds", float(b), int(r))
                        for b, r in (x.split(":") for x in args.also.split(",") if x)]
            print(f"\n== {name}: N={n_total} training customers over {len(nodes)} merchants, ε={args.epsilon:g} "
                  f"(training {eps:g}); load average {os.getloadavg()[0]:.1f}")
            if args.local:
                local_rows(name, nodes, s, eps, args.seeds)
            for label, batch, rounds in ([] if args.no_aggregate else configs):
                sched = aggregate_schedule(eps, 0.0, n_total, batch=batch, rounds=rounds)
                aucs, t0 = [], time.time()
                for seed in range(args.seeds):
                    model, plan = run(nodes, s, seed, eps, batch, rounds, f"{name}-{label}-{seed}")
                    aucs.append(scores(model, nodes)["auc"])
                spread = statistics.stdev(aucs) if len(aucs) > 1 else 0.0
                print(f"{label:<24} B={sched.expected_batch:>6.0f} q={sched.sample_rate:.3f} rounds={rounds:>3} "
                      f"σ={sched.noise_multiplier:5.2f}  AUC {statistics.mean(aucs):.4f} ± {spread:.4f}  "
                      f"({time.time() - t0:.0f} s)" + ("  WARN: " + " | ".join(w[:60] for w in sched.warnings)
                                                      if sched.warnings else ""), flush=True)


if __name__ == "__main__":
    main()
