"""The two demos behind ``fedretain demo``: a simulation (here), and a whole deployment on one
machine (:mod:`fedretain.demo.deployment`).

A composition root (like ``fedretain.cli``): it wires the merchant node, the platform and
the core together, so it may import all of them; the CLI command is ``fedretain/cli/demo.py``.

:func:`run_demo` synthesizes silos, provisions nodes, trains in Flower's Simulation
Engine, trains a centralized yardstick, scores users and writes ``report.html``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedretain.report import write_demo_report


@dataclass(frozen=True)
class DemoPlan:
    workspace: Path
    merchants: int = 6
    users: int = 30000
    rounds: int = 6
    local_epochs: int = 3
    seed: int = 0


def run_demo(plan: DemoPlan, say: Callable[[str], Any] = print, ensure_nodes: Callable | None = None) -> dict[str, Any]:
    """Synthesize → provision nodes → simulate → centralized yardstick → score → report."""
    from fedretain.centralized import evaluate_bundle, pool, train_centralized
    from fedretain.clients.node import MerchantNode, NodeConfig
    from fedretain.ingest import write_table
    from fedretain.models import ModelBundle
    from fedretain.scoring import fit_money_calibration, merchant_currency, score_users
    from fedretain.server.run_record import write_json_atomic
    from fedretain.server.settings import RunSettings
    from fedretain.server.simulation import run_in_simulation
    from fedretain.synth import generate
    from fedretain.train import predict

    ws = plan.workspace
    data = ws / "silos"
    say(f"[1/5] synthesising {plan.merchants} merchants with {plan.users} users in {data}")
    silos = generate(data, plan.merchants, plan.users, plan.seed)
    say("[2/5] provisioning merchant nodes: node keys and consent ledgers from each silo's consent.csv")
    if ensure_nodes is not None:
        ensure_nodes(data)
    settings = RunSettings(rounds=plan.rounds, local_epochs=plan.local_epochs, out_dir=str(ws / "run"),
                           seed=plan.seed, min_nodes=plan.merchants)
    say(f"[3/5] federated training: {plan.rounds} rounds over {len(silos)} simulated merchant nodes")
    run_dir = run_in_simulation(settings, data)
    record = json.loads((run_dir / "run.json").read_text())
    bundle = ModelBundle.load(run_dir / "model.pt")

    say("[4/5] yardstick: the same model on the pooled data (what federation avoids), same users held out")
    nodes = [MerchantNode(NodeConfig.for_silo(s)) for s in silos]
    at = None
    prepared = [n.prepare(settings.purpose, list(settings.features), settings.horizon_days, at=at) for n in nodes]
    pooled = pool(prepared)
    central_model, central_scaler, central = train_centralized(
        pooled, settings.hidden, epochs=plan.rounds * plan.local_epochs, learning_rate=settings.learning_rate,
        seed=plan.seed)
    federated = evaluate_bundle(bundle, pooled)

    say(f"[5/5] scoring {nodes[0].merchant_id}'s users locally, checking value in money and the value of joining")
    horizon = float(settings.horizon_days)
    notes: list[str] = []
    try:
        currency = merchant_currency(nodes[0].silo.merchant)
    except ValueError as exc:
        currency = ""
        notes.append(f"{exc}; money shown without a currency")
    try:  # the shop's own factor, as `fedretain score` fits it (its labelled customers of the last horizon)
        calibration = fit_money_calibration(bundle, prepared[0], horizon, currency)
    except ValueError as exc:
        calibration = None
        notes.append(f"Predicted value not calibrated in money: {exc}.")
    decision, gated = nodes[0].gate(settings.purpose)
    scores = score_users(bundle, gated, nodes[0].data_end(), calibration=calibration)
    scores_csv = write_table(scores, ws / f"scores_{nodes[0].merchant_id}.csv")
    ltv = ltv_check(bundle, prepared[0], horizon, currency)
    if ltv is None:
        notes.append(f"No LTV decile check for {nodes[0].merchant_id}: too few buyers among its training customers "
                     f"to fit a money factor on them and check it on the held-out ones.")
    joining = value_of_joining(bundle, nodes, prepared, settings, epochs=plan.rounds * plan.local_epochs)

    coverage = {}
    for node, prep in zip(nodes, prepared):
        coverage[node.merchant_id] = {"candidates": prep.decision.n_candidates,
                                      "consented": len(prep.decision.grants), "used": len(prep.used_users)}
    last = record["rounds"][-1]
    per_merchant = {n["merchant_id"]: {"auc": n["metrics"].get("auc"), "num_examples": n["num_examples"]}
                    for n in last["nodes"] if n["phase"] == "evaluate" and not n.get("error")}
    y_test, fed_model = pooled.y_test[:, 0], bundle.build_model()
    federated.update(auc_interval(y_test, predict(fed_model, bundle.standardizer.transform(pooled.x_test))[0],
                                  plan.seed))
    central.update(auc_interval(y_test, predict(central_model, central_scaler.transform(pooled.x_test))[0], plan.seed))
    summary = {
        "workspace": str(ws), "merchants": [n.merchant_id for n in nodes],
        "federated": federated, "centralized": central, "auc_gap": central["auc"] - federated["auc"],
        "mean_merchant_auc": last.get("evaluate", {}).get("auc"),
        "consent_coverage": coverage, "per_merchant_auc": per_merchant,
        "segments": scores["segment"].value_counts().to_dict(),
        "currency": currency, "horizon_days": horizon,
        "money_calibration": calibration.as_dict() if calibration else None,
        "ltv_check": {k: v for k, v in ltv.items() if k != "deciles"} if ltv else None,
        "joining": joining,
        "scores_csv": str(scores_csv), "run_json": str(ws / "run.json"), "report_html": str(ws / "report.html"),
    }
    shutil.copyfile(run_dir / "run.json", ws / "run.json")
    write_json_atomic(ws / "summary.json", summary)
    write_demo_report(ws / "report.html", record, summary, scores, currency=currency, horizon_days=horizon,
                      calibrated=calibration is not None, ltv=ltv, joining=joining, notes=notes)
    return summary


def auc_interval(y: np.ndarray, prob: np.ndarray, seed: int = 0, resamples: int = 200) -> dict[str, float]:
    """95 % percentile-bootstrap interval of the pooled held-out AUC (empty when a class has < 5 customers)."""
    from scipy.stats import bootstrap

    from fedretain.metrics import roc_auc

    y = np.asarray(y, np.float64)
    if min(y.sum(), len(y) - y.sum()) < 5:
        return {}
    res = bootstrap((y, np.asarray(prob, np.float64)), roc_auc, paired=True, vectorized=False,
                    n_resamples=resamples, method="percentile", random_state=seed)
    return {"auc_low": float(res.confidence_interval.low), "auc_high": float(res.confidence_interval.high)}


def ltv_check(bundle, prep, horizon_days: float, currency: str) -> dict[str, Any] | None:
    """Money calibration fitted on the node's training customers, checked on held-out ones (None: too few buyers)."""
    from fedretain.ltv import holdout_check
    from fedretain.train import predict

    model, tr = bundle.build_model(), bundle.standardizer.transform
    (p_tr, raw_tr), (p_te, raw_te), spend = predict(model, tr(prep.x_train)), predict(model, tr(prep.x_test)), np.expm1
    return holdout_check(raw_tr, spend(prep.y_train[:, 1].astype(np.float64)), raw_te,
                         spend(prep.y_test[:, 1].astype(np.float64)), horizon_days, currency, p_train=p_tr, p_test=p_te)


def value_of_joining(bundle, nodes, prepared, settings, epochs: int) -> list[dict[str, Any]]:
    """Per merchant, on its own node: local-only vs global vs fine-tuned (``fedretain.joining``), nothing sent."""
    from fedretain.joining import compare
    from fedretain.train import TrainConfig

    cfg = TrainConfig(epochs=1, batch_size=settings.batch_size, learning_rate=settings.learning_rate,
                      seed=settings.seed)
    out = []
    for node, prep in zip(nodes, prepared):
        if len(prep.x_train) == 0 or len(prep.x_test) == 0:
            continue
        tr = bundle.standardizer.transform
        res = compare(node.merchant_id, bundle.build_model(), tr(prep.x_train), prep.y_train, tr(prep.x_test),
                      prep.y_test, cfg, local_epochs=epochs)
        out.append(res.as_dict())
    return out
