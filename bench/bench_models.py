"""Which model: centralized logistic regression vs federated LR vs federated MLP, with and without DP.

    python bench/bench_models.py [--datasets cdnow-hash,...,rare-repeat] [--dp local,aggregate]
                                 [--eval test|validation] [--workdir DIR]

Datasets: CDNOW in 10 silos (``hash``, ``non-iid``, ``power-law`` splits; the issue-2 protocol of
``cdnow_protocol``), the synthetic default (5 merchants) and the rare-repeat marketplace (a few
large sellers and a long tail of sellers with a few customers each; 1-3 % repeat rate).

Rows per dataset: ``central LR`` (scikit-learn on the pooled training customers, standardised with
their pooled moments — the yardstick; pooling is exactly what fedretain avoids), ``fed LR`` and
``fed MLP``, each

* non-private: FedAvg (example-weighted) of ``LocalTrainer`` updates, ``--rounds`` rounds;
* ``local ε=3``: every node trains with ``DPTrainer`` (its real budget ledger) and sends weight 1,
  as a DP run's nodes do (no exact counts leave a node), so the mean is unweighted;
* ``aggregate ε=3``: one DP-SGD step per round over all merchants through the ServerApp's own
  pieces — ``plan_aggregate``, each node's ``contribute``, SecAgg+'s arithmetic (Flower's
  quantise/sum/dequantise) and ``ServerDPSGD.step_mean`` (what ``server/secagg.py`` calls).

Everything federated sees the run's public input transform (``fedretain.transforms``) and the
model the ServerApp builds (``make_model`` with the dataset's prior rate); DP rows train at the
ServerApp's ε split (ε = 3 in total, ``train_epsilon`` for training, the rest for the evaluation
release). Every model is scored on the pooled held-out customers: AUC, log loss, LTV normalized
Gini and mean-calibration ratio (``fedretain.ltv.holdout_check``: money factor fitted on the
pooled training customers).

Hyper-parameters are fixed for all datasets (``NON_PRIVATE``, ``LOCAL_DP``, ``AGGREGATE``) and
were chosen with ``--eval validation`` (20 % of each node's *training* users held out), never on
the test users. The federation loop runs in this process; ``tests/test_simulation.py`` and
``tests/test_privacy_simulation.py`` run the same trainers through Flower. Targets (issue 12):
the best federated non-private model within 0.01 AUC of central LR on every dataset, the best
ε = 3 model within 0.02. ``--workdir`` keeps silos, ledgers and prepared matrices for reruns
(a tmpfs such as /dev/shm keeps the ledgers' fsyncs cheap). Writes ``bench/out/models.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from cdnow_protocol import CONSENT_AT as CDNOW_CONSENT_AT
from cdnow_protocol import REPO, make_silos, prepared
from cdnow_protocol import settings as cdnow_settings

PURPOSE = "retention_modeling"
DATASETS = ("cdnow-hash", "cdnow-non-iid", "cdnow-power-law", "synth-default", "rare-repeat")
SYNTH_CONSENT_AT = "2026-11-01T00:00:00+00:00"  # after the synthetic data end (2026-10-31)
EPSILON = 3.0  # the run's total ε; training gets ε minus the evaluation release's share, as in a real run
# Fixed defaults for every dataset, chosen on validation users carved out of the training users
# (``--eval validation``; never on the test users). Learning rates are the run's ``learning-rate``:
# a logistic regression steps with SGD at lr × SGD_LR_SCALE (fedretain.train.make_optimizer), with or without DP.
# logreg: plain SGD converges slowly on the uncentred public transform, so it takes 12 local epochs
# (validation AUC gap to central LR at 2 / 6 / 12 epochs: synthetic 0.012 / 0.006 / 0.004, CDNOW hash
# 0.013 / 0.009 / 0.006, rare-repeat 0.015 / -0.003 / -0.002); the MLP keeps the dataset's run settings.
NON_PRIVATE = {"mlp": {}, "logreg": dict(learning_rate=0.01, local_epochs=12)}
LOCAL_DP = {"mlp": dict(max_grad_norm=10.0, learning_rate=0.01), "logreg": dict(max_grad_norm=10.0, learning_rate=0.01)}
# aggregate mode: one DP-SGD step per round over all merchants (rounds = steps), Adam on the server
AGGREGATE = {"mlp": dict(rounds=50, batch=4096, max_grad_norm=10.0, server_learning_rate=0.02),
             "logreg": dict(rounds=50, batch=4096, max_grad_norm=10.0, server_learning_rate=0.02)}


def synth_silos(workdir: Path, mode: str, n_merchants: int, n_users: int, seed: int = 0) -> list[Path]:
    from fedretain.clients.provision import provision_node
    from fedretain.synth import generate

    silos = generate(workdir, n_merchants, n_users, seed, mode=mode)
    for s in silos:
        provision_node(s)
    return silos


def load(name: str, tmp: Path, rounds: int, scale: float):
    """(silos, run settings, per-node prepared data) of one dataset; kept in ``tmp/name`` for reruns."""
    import pickle

    from fedretain.server.settings import RunSettings

    folder = tmp / f"{name}-x{scale:g}"
    cache = folder / "prepared.pkl"
    if name.startswith("cdnow-"):
        s = cdnow_settings(tmp / "unused", rounds)
    else:
        rare = name == "rare-repeat"
        s = RunSettings(rounds=rounds, local_epochs=2, batch_size=128, learning_rate=0.01,
                        hidden=(64, 32), out_dir=str(tmp / "unused"),
                        prior_rate=0.02 if rare else 0.0)  # rare-repeat: the marketplace's known repeat rate
    if cache.is_file():  # --workdir: a rerun reuses the silos, their ledgers and the prepared matrices
        silos, preps = pickle.loads(cache.read_bytes())
        silos = [folder / Path(p).name for p in silos]  # the folder may have been copied (e.g. to /dev/shm)
    else:
        if name.startswith("cdnow-"):
            silos = make_silos(folder, 10, name.removeprefix("cdnow-"))
        else:
            silos = synth_silos(folder, "rare-repeat" if rare else "default", int((400 if rare else 5) * scale),
                                int((16_000 if rare else 10_000) * scale))
        preps = prepared(silos, s, CDNOW_CONSENT_AT if name.startswith("cdnow-") else SYNTH_CONSENT_AT)
        cache.write_bytes(pickle.dumps((silos, preps)))
    keep = [(silo, p) for silo, p in zip(silos, preps) if len(p.x_train)]  # a seller with no train buyer sits out
    return [k[0] for k in keep], s, [k[1] for k in keep]


def nodes_of(silos, preps, s, holdout: str = "test"):
    """Each node's inputs under the run's public transform (``fedretain.transforms``, what runs use).

    ``holdout="validation"``: each node's *training* users are split 80/20 (fixed seed) and the 20 %
    play the held-out users — for choosing hyper-parameters without looking at the test users.
    """
    from fedretain.transforms import public_standardizer

    scaler = public_standardizer(s.features)
    nodes = []
    for i, (silo, p) in enumerate(zip(silos, preps)):
        x, y, xt, yt = p.x_train, p.y_train, p.x_test, p.y_test
        if holdout == "validation":
            val = np.random.default_rng(1000 + i).random(len(x)) < 0.2
            x, y, xt, yt = x[~val], y[~val], x[val], y[val]
        if not len(x):
            continue
        nodes.append(dict(name=silo.name, ledger=silo / ".node" / "privacy.db", raw=x, raw_t=xt,
                          x=scaler.transform(x), y=y, xt=scaler.transform(xt), yt=yt))
    return nodes


def fedavg(nodes, s, kind: str, seed: int, trainer_for, weighted: bool = True) -> torch.nn.Module:
    """Rounds of: every node trains a copy of the global model; mean of the results.

    Example-weighted without DP (Flower's FedAvg on ``num-examples``); unweighted in local DP mode,
    where every node sends the public weight 1 (clients/client_app.py: no exact counts leave a node).
    """
    from fedretain.models import make_model

    torch.manual_seed(seed)
    model = make_model(kind, nodes[0]["x"].shape[1], s.hidden or (64, 32), s.prior_rate)
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


def dp_settings(s, mode: str, **kw):
    """The run settings of a DP run at ε = EPSILON (the ServerApp's ε split applies)."""
    from dataclasses import replace

    return replace(s, dp_mode=mode, target_epsilon=EPSILON, **kw)


def run_none(nodes, s, kind, seed, hp=None):
    from fedretain.train import LocalTrainer, TrainConfig

    hp = hp if hp is not None else NON_PRIVATE[kind]
    lr, epochs = hp.get("learning_rate", s.learning_rate), hp.get("local_epochs", s.local_epochs)
    return fedavg(nodes, s, kind, seed, lambda i, r: LocalTrainer(TrainConfig(
        epochs=epochs, batch_size=s.batch_size, learning_rate=lr, seed=seed * 7919 + r * 101 + i)))


def run_local(nodes, s, kind, seed, run_id, hp=None):
    """Local DP-SGD: every node's ``DPTrainer`` (its real ledger), ε_train as the ServerApp sends it."""
    from fedretain.privacy.dp_trainer import DPConfig, DPTrainer
    from fedretain.server.federation import train_epsilon
    from fedretain.train import TrainConfig

    hp = hp or LOCAL_DP[kind]
    sd = dp_settings(s, "local", max_grad_norm=hp["max_grad_norm"])
    cfg = TrainConfig(epochs=s.local_epochs, batch_size=s.batch_size, learning_rate=hp["learning_rate"])
    return fedavg(nodes, sd, kind, seed, lambda i, r: DPTrainer(
        cfg, DPConfig(train_epsilon(sd), max_grad_norm=sd.max_grad_norm, total_rounds=sd.rounds,
                      noise_seed=seed * 1_000_003 + r * 1009 + i), nodes[i]["ledger"], run_id, PURPOSE, r),
        weighted=False)


def run_aggregate(nodes, s, kind, seed, run_id, hp=None):
    """Aggregate mode in-process, through the ServerApp's own pieces (server/secagg.py).

    Plan: ``plan_aggregate`` at ε_train (``train_epsilon``), the declared population = all training
    customers; nodes: ``contribute`` (real ledgers, the node's own check of the plan); SecAgg+:
    Flower's quantise / sum / dequantise (the pairwise masks cancel exactly and are omitted);
    server: ``ServerDPSGD.step_mean`` — what ``AggregateDPSGD.aggregate_fit`` calls.
    """
    from bench_dp_utility import secagg_sum

    from fedretain.models import make_model
    from fedretain.privacy.aggregate import ServerDPSGD, contribute, plan_aggregate
    from fedretain.server.federation import train_epsilon

    hp = hp or AGGREGATE[kind]
    sd = dp_settings(s, "aggregate", rounds=hp["rounds"], max_grad_norm=hp["max_grad_norm"])
    plan = plan_aggregate(train_epsilon(sd), sd.target_delta, sum(len(n["x"]) for n in nodes), hp["batch"],
                          sd.rounds, sd.max_grad_norm)
    torch.manual_seed(seed)
    model = make_model(kind, nodes[0]["x"].shape[1], s.hidden or (64, 32), s.prior_rate)
    server = ServerDPSGD(model, plan, hp["server_learning_rate"], noise_seed=seed)
    for rnd in range(1, plan.rounds + 1):
        vectors = [contribute(n["ledger"], run_id, PURPOSE, rnd, plan, copy.deepcopy(model), n["x"], n["y"],
                              noise_seed=seed * 1_000_003 + rnd * 1009 + i)[0] for i, n in enumerate(nodes)]
        mean = [a / len(vectors) for a in secagg_sum(vectors, plan)]  # what SecAggPlusWorkflow hands the strategy
        server.step_mean(mean, len(vectors))
    return model


def set_budgets(nodes) -> None:
    from fedretain.privacy.budget import BudgetLedger

    for n in nodes:
        with BudgetLedger.open(n["ledger"], create=True) as ledger:
            ledger.set_budget(PURPOSE, 1e4, note="bench_models")  # the bench composes many runs


def scores(nodes, predict_fn, horizon_days: float) -> dict:
    """Pooled held-out metrics; LTV money factor fitted on the pooled training customers (fedretain.ltv)."""
    from fedretain.ltv import calibration_ratio, holdout_check, normalized_gini
    from fedretain.metrics import log_loss, roc_auc

    p_tr, v_tr = predict_fn(np.concatenate([n["x"] for n in nodes]), np.concatenate([n["raw"] for n in nodes]))
    ytr = np.concatenate([n["y"] for n in nodes])
    p, v = predict_fn(np.concatenate([n["xt"] for n in nodes]), np.concatenate([n["raw_t"] for n in nodes]))
    yt = np.concatenate([n["yt"] for n in nodes])
    spend_tr, spend = np.expm1(ytr[:, 1]), np.expm1(yt[:, 1])
    ltv = holdout_check(v_tr, spend_tr, v, spend, horizon_days) or {"gini": normalized_gini(spend, v),
                                                                    "ratio": float("nan")}
    return {"auc": roc_auc(yt[:, 0], p), "log_loss": log_loss(yt[:, 0], p), "mean_pred": float(p.mean()),
            "base_rate": float(yt[:, 0].mean()), "ltv_gini": float(ltv["gini"]),
            "ltv_ratio_raw": calibration_ratio(spend, v), "ltv_ratio": float(ltv["ratio"])}


def central_lr(nodes):
    """The yardstick: scikit-learn on the pooled training customers, standardised with their own moments."""
    from sklearn.linear_model import LinearRegression, LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.concatenate([n["raw"] for n in nodes])
    y = np.concatenate([n["y"] for n in nodes])
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(x, y[:, 0])
    reg = make_pipeline(StandardScaler(), LinearRegression()).fit(x, y[:, 1])
    return lambda z, raw: (clf.predict_proba(raw)[:, 1], np.expm1(np.clip(reg.predict(raw), 0, 20)))


def torch_predict(model):
    from fedretain.train import predict

    return lambda z, raw: predict(model, z)


def _hp(args, mode: str, kind: str) -> dict:
    base = {"none": NON_PRIVATE, "local": LOCAL_DP, "aggregate": AGGREGATE}[mode][kind]
    return {**base, **json.loads(args.override or "{}").get(mode, {}).get(kind, {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--rounds", type=int, default=10, help="FedAvg rounds (aggregate mode: its own steps)")
    ap.add_argument("--dp", default="local,aggregate",
                    help="comma list of DP modes at ε=3: local, aggregate ('' for none)")
    ap.add_argument("--no-plain", action="store_true", help="skip the non-private federated rows")
    ap.add_argument("--models", default="logreg,mlp")
    ap.add_argument("--eval", default="test", choices=("test", "validation"),
                    help="held-out users: the test users, or 20 %% of the training users (to choose settings)")
    ap.add_argument("--override", default="", help='JSON {"none"|"local"|"aggregate": {"logreg"|"mlp": {...}}}')
    ap.add_argument("--scale", type=float, default=1.0, help="synthetic sizes × this (e.g. 0.3 for a quick run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default="", help="keep silos and prepared data here for reruns (default: temp)")
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "models.json"))
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dp_modes = [m for m in args.dp.split(",") if m]
    kinds = args.models.split(",")
    rows: list[dict] = []
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="fedretain-models-") as tmp:
        tmp = args.workdir or tmp
        Path(tmp).mkdir(parents=True, exist_ok=True)
        for name in args.datasets.split(","):
            t0 = time.time()
            silos, s, preps = load(name, Path(tmp), args.rounds, args.scale)
            nodes = nodes_of(silos, preps, s, args.eval)
            set_budgets(nodes)
            info = {"dataset": name, "nodes": len(nodes), "train": sum(len(n["x"]) for n in nodes),
                    "heldout": sum(len(n["xt"]) for n in nodes), "eval": args.eval,
                    "base_rate": float(np.concatenate([n["y"][:, 0] for n in nodes]).mean())}
            print(f"\n== {name}: {info['nodes']} nodes, {info['train']} train / {info['heldout']} {args.eval} "
                  f"customers, base rate {info['base_rate']:.3f} (loaded in {time.time() - t0:.0f} s)", flush=True)

            def add(model: str, dp: str, fn, t0: float, info: dict = info, nodes: list = nodes, s=s) -> None:
                rows.append({**info, "model": model, "dp": dp, **scores(nodes, fn, s.horizon_days),
                             "seconds": time.time() - t0})
                _log(rows[-1])

            t0 = time.time()
            add("central LR", "none", central_lr(nodes), t0)
            for kind in kinds:
                label = {"logreg": "fed LR", "mlp": "fed MLP"}[kind]
                sk = s if kind == "mlp" else _as_logreg(s)
                if not args.no_plain:
                    t0 = time.time()
                    add(label, "none", torch_predict(run_none(nodes, sk, kind, args.seed, _hp(args, "none", kind))), t0)
                for mode in dp_modes:
                    t0 = time.time()
                    run = run_local if mode == "local" else run_aggregate
                    model = run(nodes, sk, kind, args.seed, f"{mode}-{name}-{kind}-{args.seed}-{time.time_ns()}",
                                _hp(args, mode, kind))
                    add(label, f"{mode} ε={EPSILON:g}", torch_predict(model), t0)
    verdicts = verdict(rows)
    print_table(rows, verdicts)
    load_avg = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "local_dp": LOCAL_DP, "aggregate": AGGREGATE,
                               "non_private": NON_PRIVATE, "rows": rows, "verdicts": verdicts,
                               "seconds": time.time() - t_start, "loadavg": load_avg}, indent=2, default=float))
    print(f"\nwrote {out} ({time.time() - t_start:.0f} s, load average {load_avg[0]:.1f} / {load_avg[1]:.1f} / "
          f"{load_avg[2]:.1f} on {os.cpu_count()} CPUs)")


def _as_logreg(s):
    from dataclasses import replace

    return replace(s, model="logreg")


def _log(r: dict) -> None:
    print(f"  {r['model']:10s} {r['dp']:12s} AUC {r['auc']:.4f}  log loss {r['log_loss']:.4f}  "
          f"LTV Gini {r['ltv_gini']:.3f}  LTV ratio {r['ltv_ratio']:.3f} (raw {r['ltv_ratio_raw']:.3f})  "
          f"({r['seconds']:.0f} s)", flush=True)


def verdict(rows: list[dict]) -> list[dict]:
    out = []
    for name in dict.fromkeys(r["dataset"] for r in rows):
        rs = [r for r in rows if r["dataset"] == name]
        central = next(r["auc"] for r in rs if r["model"] == "central LR")
        fed = [r for r in rs if r["model"] != "central LR" and r["dp"] == "none"]
        private = [r for r in rs if r["dp"] != "none"]
        v = {"dataset": name, "central_lr_auc": central}
        for key, group, limit in (("non_private", fed, 0.01), ("epsilon_3", private, 0.02)):
            if group:
                best = max(group, key=lambda r: r["auc"])
                v[key] = {"best": f"{best['model']} {best['dp']}", "auc": best["auc"], "gap": central - best["auc"],
                          "limit": limit, "pass": central - best["auc"] <= limit}
        out.append(v)
    return out


def print_table(rows: list[dict], verdicts: list[dict]) -> None:
    print(f"\n{'dataset':16s} {'model':10s} {'DP':12s} {'AUC':>7s} {'log loss':>9s} {'LTV Gini':>9s} "
          f"{'LTV ratio':>10s}")
    for r in rows:
        print(f"{r['dataset']:16s} {r['model']:10s} {r['dp']:12s} {r['auc']:7.4f} {r['log_loss']:9.4f} "
              f"{r['ltv_gini']:9.3f} {r['ltv_ratio']:10.3f}")
    cols = list(dict.fromkeys((r["model"], r["dp"]) for r in rows))
    print(f"\nAUC ({rows[0]['eval'] if rows else 'test'} users)\n{'dataset':16s} "
          + " ".join(f"{(m + ' ' + d.split(' ')[0]):>17s}" for m, d in cols))
    for name in dict.fromkeys(r["dataset"] for r in rows):
        got = {(r["model"], r["dp"]): r["auc"] for r in rows if r["dataset"] == name}
        print(f"{name:16s} " + " ".join(f"{got[c]:17.4f}" if c in got else f"{'-':>17s}" for c in cols))
    print()
    for v in verdicts:
        for key in ("non_private", "epsilon_3"):
            if key in v:
                e = v[key]
                print(f"{v['dataset']:16s} best {key:11s}: {e['best']:22s} AUC {e['auc']:.4f}, "
                      f"{e['gap']:+.4f} behind central LR {v['central_lr_auc']:.4f} "
                      f"(limit {e['limit']}) {'PASS' if e['pass'] else 'FAIL'}")


if __name__ == "__main__":
    main()
