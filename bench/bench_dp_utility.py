"""Utility vs privacy on CDNOW: test AUC (and log loss, calibration) against ε per merchant.

    python bench/bench_dp_utility.py [--seeds 3] [--epsilons 1,3,8] [--splits hash,power-law]
                                     [--variants before,after] [--eval-epsilon 0.3]

Protocol of issue 2 (``cdnow_protocol``): CDNOW in 10 merchant silos, purchase-history
features at 1997-10-01, label = any purchase up to 1998-06-30, each node's fixed 70/30
customer split; every model is scored on the pooled held-out customers (and per merchant).

Two variants run in the same process (issue 10): ``before`` — pooled exact standardisation
moments, example-weighted FedAvg, the whole ε to training; ``after`` — what runs do now: the
public transforms of ``fedretain.transforms``, unweighted FedAvg in DP modes, ε_train = ε −
``--eval-epsilon`` and a DP evaluation release (``fedretain.dp_evaluation``, charged to each
node's real ledger) whose pooled AUC and interval are printed beside the exact one.

Rows, each over ``--seeds`` seeds (model init, sampling and — for reproducibility here
only — the DP noise):

* ``federated, no DP``   — FedAvg of ``LocalTrainer`` updates (the issue-2 model);
* ``local DP``           — every node trains with ``DPTrainer`` (DP-SGD, ε per merchant
  for the whole run, δ = 1/(10 n) per node), budget reserved in each node's real ledger;
* ``aggregate DP``       — one DP-SGD step per round over all merchants: nodes run
  ``fedretain.privacy.aggregate.contribute`` (real ledgers), their vectors are summed with
  SecAgg+'s own arithmetic (Flower's ``quantize``/``dequantize``; the pairwise masks cancel
  exactly and are omitted) and ``ServerDPSGD`` adds the noise and steps;
* ``centralized, no DP`` — the same MLP on the pooled training customers, and a logistic
  regression, as yardsticks.

The federation loop runs in this process (same trainers, same example-weighted mean as
Flower's FedAvg) so that 3 seeds × 4 ε × 2 modes × 2 splits finish in tens of minutes on
2 cores; ``tests/test_privacy_simulation.py`` runs the same modes through Flower and Ray.
Writes ``bench/out/dp_utility.json`` and ``bench/out/dp_utility.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from cdnow_protocol import REPO, make_silos, prepared, settings

PURPOSE = "retention_modeling"
# DP hyper-parameters (chosen on seed 0 of the hash split, see docs/PRIVACY.md): a clipping
# norm above most per-customer gradient norms keeps the model calibrated (with C = 1 the
# LTV head's large gradients get clipped, positives are under-weighted and log loss jumps
# from 0.49 to 0.71 while AUC barely moves).
LOCAL = dict(max_grad_norm=10.0, learning_rate=0.01)
AGGREGATE = dict(max_grad_norm=10.0, server_learning_rate=0.02, batch=4096, steps=50)


def _nodes(silos, s, transform: str = "public"):
    """Each node's inputs under the run's transform: ``public`` (fedretain.transforms, what runs use)
    or ``moments`` (the pooled exact mean/std that runs used before issue 10; for comparison)."""
    from fedretain.models import Standardizer
    from fedretain.transforms import public_standardizer

    preps = prepared(silos, s)
    if transform == "public":
        scaler = public_standardizer(s.features)
    else:
        count = sum(len(p.x_train) for p in preps)
        scaler = Standardizer.from_moments(count, sum(p.x_train.sum(axis=0) for p in preps),
                                           sum((p.x_train ** 2).sum(axis=0) for p in preps))
    nodes = [dict(name=silo.name, ledger=silo / ".node" / "privacy.db", x=scaler.transform(p.x_train), y=p.y_train,
                  xt=scaler.transform(p.x_test), yt=p.y_test) for silo, p in zip(silos, preps)]
    return nodes, preps


def _set_budgets(nodes, epsilon: float) -> None:
    from fedretain.privacy.budget import BudgetLedger

    for n in nodes:
        with BudgetLedger.open(n["ledger"], create=True) as ledger:
            ledger.set_budget(PURPOSE, epsilon, note="bench_dp_utility")


def fedavg(nodes, s, seed: int, trainer_for, weighted: bool = True) -> torch.nn.Module:
    """Rounds of: every node trains a copy of the global model; example-weighted mean (Flower's FedAvg),
    or the unweighted mean (what DP modes do since issue 10: nodes send the public weight 1)."""
    from fedretain.models import RetentionNet

    torch.manual_seed(seed)
    model = RetentionNet(nodes[0]["x"].shape[1], s.hidden)
    for rnd in range(1, s.rounds + 1):
        states, weights = [], []
        for i, n in enumerate(nodes):
            local = copy.deepcopy(model)
            res = trainer_for(i, rnd).fit(local, n["x"], n["y"], [p.detach().clone() for p in model.parameters()])
            states.append(local.state_dict())
            weights.append(res.num_examples if weighted else 1)
        w = np.asarray(weights, float) / sum(weights)
        model.load_state_dict({k: sum(wi * st[k] for wi, st in zip(w, states)) for k in states[0]})
    return model


def run_none(nodes, s, seed):
    from fedretain.train import LocalTrainer, TrainConfig

    return fedavg(nodes, s, seed, lambda i, r: LocalTrainer(TrainConfig(
        epochs=s.local_epochs, batch_size=s.batch_size, learning_rate=s.learning_rate, seed=seed * 7919 + r * 101 + i)))


def run_local(nodes, s, seed, epsilon, run_id, weighted=True):
    from fedretain.privacy.dp_trainer import DPConfig, DPTrainer
    from fedretain.train import TrainConfig

    cfg = TrainConfig(epochs=s.local_epochs, batch_size=s.batch_size, learning_rate=LOCAL["learning_rate"])
    return fedavg(nodes, s, seed, lambda i, r: DPTrainer(
        cfg, DPConfig(epsilon, max_grad_norm=LOCAL["max_grad_norm"], total_rounds=s.rounds,
                      noise_seed=seed * 1_000_003 + r * 1009 + i),
        nodes[i]["ledger"], run_id, PURPOSE, r), weighted)


def secagg_sum(vectors: list[list[np.ndarray]], plan) -> list[np.ndarray]:
    """What SecAggPlusWorkflow hands the strategy for weight-1 vectors × count: Flower's quantise/sum/dequantise."""
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    q = [quantize(v, plan.clipping_range, plan.quantization_range) for v in vectors]
    total = [sum(parts) for parts in zip(*q)]
    deq = dequantize(total, plan.clipping_range, plan.quantization_range)
    return [a - (len(vectors) - 1) * plan.clipping_range for a in deq]


def run_aggregate(nodes, s, seed, epsilon, run_id):
    from fedretain.models import RetentionNet
    from fedretain.privacy.aggregate import ServerDPSGD, contribute, plan_aggregate

    n_total = sum(len(n["x"]) for n in nodes)
    plan = plan_aggregate(epsilon, 0.0, n_total, AGGREGATE["batch"], AGGREGATE["steps"], AGGREGATE["max_grad_norm"])
    torch.manual_seed(seed)
    model = RetentionNet(nodes[0]["x"].shape[1], s.hidden)
    server = ServerDPSGD(model, plan, AGGREGATE["server_learning_rate"], noise_seed=seed)
    eps = []
    for rnd in range(1, plan.rounds + 1):
        vectors, metrics = [], []
        for i, n in enumerate(nodes):
            v, m = contribute(n["ledger"], run_id, PURPOSE, rnd, plan, copy.deepcopy(model), n["x"], n["y"],
                              noise_seed=seed * 1_000_003 + rnd * 1009 + i)
            vectors.append(v)
            metrics.append(m["epsilon"])
        eps.append(server.step(secagg_sum(vectors, plan)))
        assert max(metrics) == min(metrics) and abs(metrics[0] - eps[-1]) < 1e-9  # nodes and server agree
    return model, plan


def scores(model, nodes, eval_epsilon: float = 0.0, run_id: str = "") -> dict:
    """Exact pooled held-out metrics (the yardstick) and, with ``eval_epsilon``, what the server gets
    from the nodes' DP evaluation releases (``fedretain.dp_evaluation``, charged to each node's ledger)."""
    from fedretain.dp_evaluation import dp_release, exact_release, pooled_metrics
    from fedretain.train import evaluate, predict

    xt = np.concatenate([n["xt"] for n in nodes])
    yt = np.concatenate([n["yt"] for n in nodes])
    rep = evaluate(model, xt, yt)
    rep["per_merchant_auc"] = {n["name"]: evaluate(model, n["xt"], n["yt"])["auc"] for n in nodes}
    releases = []
    for n in nodes:
        prob = predict(model, n["xt"])[0]
        r = (dp_release(n["ledger"], run_id, PURPOSE, 0, n["yt"][:, 0], prob, eval_epsilon) if eval_epsilon > 0
             else exact_release(n["yt"][:, 0], prob))
        releases.append((r.pos, r.neg, r.sd))
    pooled = pooled_metrics(releases)
    rep.update({f"released_{k}": pooled[k] for k in ("auc", "auc-low", "auc-high", "log_loss") if k in pooled})
    return {k: (float(v) if not isinstance(v, dict) else v) for k, v in rep.items()}


def centralized(preps, s, seed) -> dict:
    from fedretain.centralized import pool, train_centralized

    pooled = pool(preps)
    _, _, rep = train_centralized(pooled, s.hidden, epochs=s.rounds * s.local_epochs, learning_rate=s.learning_rate,
                                  batch_size=s.batch_size, seed=seed)
    return {k: float(v) for k, v in rep.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epsilons", default="1,3,8")
    ap.add_argument("--splits", default="hash,power-law")
    ap.add_argument("--modes", default="local,aggregate")
    ap.add_argument("--power-law-epsilons", default="3", help="ε values run on the power-law split")
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "dp_utility"))
    ap.add_argument("--eval-epsilon", type=float, default=0.3,
                    help="ε of the held-out evaluation release, taken out of each run's total ε")
    ap.add_argument("--variants", default="before,after",
                    help="before: pooled exact moments, example-weighted FedAvg, all ε to training (the code "
                         "before issue 10); after: public transforms, unweighted FedAvg in DP modes, "
                         "ε_train = ε - eval-epsilon and a DP evaluation release")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    modes = args.modes.split(",")
    rows: list[dict] = []
    t_start = time.time()
    variants = args.variants.split(",")
    with tempfile.TemporaryDirectory(prefix="fedretain-dp-utility-") as tmp:
        for split in args.splits.split(","):
            silos = make_silos(Path(tmp) / split, 10, split)
            s = settings(Path(tmp) / "unused", 10)
            epsilons = [float(e) for e in (args.epsilons if split == "hash" else args.power_law_epsilons).split(",")]
            for variant in variants:
                after = variant == "after"
                nodes, preps = _nodes(silos, s, "public" if after else "moments")
                _set_budgets(nodes, 1e4)  # the bench composes many runs on the same merchants
                sizes = {n["name"]: len(n["x"]) + len(n["xt"]) for n in nodes}
                print(f"\n== {split} / {variant}: {len(nodes)} silos, customers per merchant "
                      f"{sorted(sizes.values(), reverse=True)}", flush=True)
                eval_eps = args.eval_epsilon if after else 0.0
                tag = f" [{variant}]"
                for seed in range(args.seeds):
                    if not after:
                        t0 = time.time()
                        rows.append({"split": split, "model": "centralized MLP, no DP", "epsilon": None, "seed": seed,
                                     **centralized(preps, s, seed), "seconds": time.time() - t0})
                    t0 = time.time()
                    rows.append({"split": split, "model": "federated, no DP" + tag, "epsilon": None, "seed": seed,
                                 **scores(run_none(nodes, s, seed), nodes), "seconds": time.time() - t0})
                    _log(rows[-1])
                    for eps in epsilons:
                        rid = f"{variant}-{split}-{eps}-{seed}"
                        if "local" in modes:
                            t0 = time.time()
                            model = run_local(nodes, s, seed, eps - eval_eps, "local-" + rid, weighted=not after)
                            rows.append({"split": split, "model": "local DP" + tag, "epsilon": eps, "seed": seed,
                                         "epsilon_train": eps - eval_eps, "epsilon_eval": eval_eps,
                                         **scores(model, nodes, eval_eps, "local-eval-" + rid),
                                         "seconds": time.time() - t0})
                            _log(rows[-1])
                        if "aggregate" in modes:
                            t0 = time.time()
                            model, plan = run_aggregate(nodes, s, seed, eps - eval_eps, "agg-" + rid)
                            rows.append({"split": split, "model": "aggregate DP" + tag, "epsilon": eps, "seed": seed,
                                         "epsilon_train": eps - eval_eps, "epsilon_eval": eval_eps,
                                         "noise_multiplier": plan.noise_multiplier,
                                         **scores(model, nodes, eval_eps, "agg-eval-" + rid),
                                         "seconds": time.time() - t0})
                            _log(rows[-1])
                rows.append({"split": split, "model": "_sizes", "sizes": sizes})
    summary = summarize(rows)
    print_summary(summary, rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "local": LOCAL, "aggregate": AGGREGATE,
                                                    "rows": rows, "summary": summary,
                                                    "seconds": time.time() - t_start}, indent=2, default=float))
    plot(summary, out.with_suffix(".png"))
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.png')} ({time.time() - t_start:.0f} s)")


def _log(r: dict) -> None:
    eps = "∞" if r["epsilon"] is None else f"{r['epsilon']:g}"
    released = (f"  released AUC {r['released_auc']:.4f} [{r['released_auc-low']:.4f}, {r['released_auc-high']:.4f}]"
                if "released_auc-low" in r else "")
    print(f"  seed {r['seed']} {r['model']:18s} ε={eps:>3s}  AUC {r['auc']:.4f}  log loss {r['log_loss']:.4f}  "
          f"ECE {r['ece']:.4f}{released}  ({r['seconds']:.0f} s)", flush=True)


def summarize(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["model"] != "_sizes":
            groups.setdefault((r["split"], r["model"], r["epsilon"]), []).append(r)
    out = []
    for (split, model, eps), rs in groups.items():
        entry = {"split": split, "model": model, "epsilon": eps, "seeds": len(rs)}
        for k in ("auc", "log_loss", "brier", "ece", "mean_pred", "base_rate", "released_auc", "released_auc-low",
                  "released_auc-high"):
            vals = [r[k] for r in rs if k in r]
            if vals:
                entry[k] = statistics.mean(vals)
                entry[f"{k}_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        if "per_merchant_auc" in rs[0]:
            names = list(rs[0]["per_merchant_auc"])
            entry["per_merchant_auc"] = {m: statistics.mean(r["per_merchant_auc"][m] for r in rs) for m in names}
        out.append(entry)
    return out


def print_summary(summary: list[dict], rows: list[dict]) -> None:
    print(f"\n{'split':10s} {'model':32s} {'ε':>4s} {'AUC':>15s} {'log loss':>9s} {'Brier':>7s} {'ECE':>7s} "
          f"{'released AUC [95% interval]':>28s}")
    for e in summary:
        eps = "∞" if e["epsilon"] is None else f"{e['epsilon']:g}"
        rel = (f"{e['released_auc']:.4f} [{e['released_auc-low']:.4f}, {e['released_auc-high']:.4f}]"
               if "released_auc-low" in e else "")
        print(f"{e['split']:10s} {e['model']:32s} {eps:>4s} {e['auc']:.4f} ± {e['auc_sd']:.4f} {e['log_loss']:9.4f} "
              f"{e.get('brier', float('nan')):7.4f} {e.get('ece', float('nan')):7.4f} {rel:>28s}")
    for split in sorted({e["split"] for e in summary}):
        def find(model: str, eps, split: str = split):
            return next((e for e in summary if e["split"] == split and e["model"] == model and e["epsilon"] == eps),
                        None)

        print(f"\n{split}: issue 10 utility check (ε = 3 total for the run, evaluation release included)")
        for model, eps in (("federated, no DP", None), ("local DP", 3.0), ("aggregate DP", 3.0)):
            before, after = find(model + " [before]", eps), find(model + " [after]", eps)
            if before is None or after is None:
                continue
            loss = before["auc"] - after["auc"]
            verdict = "" if eps is None else (" PASS" if loss <= 0.005 else " FAIL") + " (loss ≤ 0.005)"
            print(f"  {model:18s} before {before['auc']:.4f}  after {after['auc']:.4f}  change {-loss:+.4f}{verdict}")


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    split = "hash"
    for ax, metric, label in ((axes[0], "auc", "test AUC"), (axes[1], "log_loss", "test log loss")):
        for model, marker in (("local DP [after]", "o"), ("aggregate DP [after]", "s")):
            pts = sorted((e["epsilon"], e[metric], e[f"{metric}_sd"]) for e in summary
                         if e["split"] == split and e["model"] == model)
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker=marker,
                            capsize=3, label=model)
        for model, style in (("federated, no DP [after]", "--"), ("centralized MLP, no DP", ":")):
            e = next((e for e in summary if e["split"] == split and e["model"] == model), None)
            if e:
                ax.axhline(e[metric], linestyle=style, color="grey", label=f"{model} (ε = ∞)")
        ax.set_xscale("log")
        ticks = sorted({e["epsilon"] for e in summary if e["split"] == split and e["epsilon"] is not None})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("ε (δ < 1/n), whole run")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("CDNOW, 10 merchant silos: utility vs privacy (mean ± sd over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
