"""The demo pipeline behind ``fedretain demo`` (kept out of the CLI so tests can call it)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedretain.report import (img_tag, plot_consent_coverage, plot_merchant_auc, plot_rounds,
                              plot_score_distribution, table_html, write_html)


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
    from fedretain.scoring import score_users
    from fedretain.server.run_record import write_json_atomic
    from fedretain.server.settings import RunSettings
    from fedretain.server.simulation import run_in_simulation
    from fedretain.synth import generate

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
    _, _, central = train_centralized(pooled, settings.hidden, epochs=plan.rounds * plan.local_epochs,
                                      learning_rate=settings.learning_rate, seed=plan.seed)
    federated = evaluate_bundle(bundle, pooled)

    say(f"[5/5] scoring {nodes[0].merchant_id}'s users locally and writing the report")
    decision, gated = nodes[0].gate(settings.purpose)
    scores = score_users(bundle, gated, nodes[0].data_end())
    scores_csv = write_table(scores, ws / f"scores_{nodes[0].merchant_id}.csv")

    coverage = {}
    for node, prep in zip(nodes, prepared):
        coverage[node.merchant_id] = {"candidates": prep.decision.n_candidates,
                                      "consented": len(prep.decision.grants), "used": len(prep.used_users)}
    last = record["rounds"][-1]
    per_merchant = {n["merchant_id"]: {"auc": n["metrics"].get("auc"), "num_examples": n["num_examples"]}
                    for n in last["nodes"] if n["phase"] == "evaluate" and not n.get("error")}
    summary = {
        "workspace": str(ws), "merchants": [n.merchant_id for n in nodes],
        "federated": federated, "centralized": central, "auc_gap": central["auc"] - federated["auc"],
        "consent_coverage": coverage, "per_merchant_auc": per_merchant,
        "segments": scores["segment"].value_counts().to_dict(),
        "scores_csv": str(scores_csv), "run_json": str(ws / "run.json"), "report_html": str(ws / "report.html"),
    }
    shutil.copyfile(run_dir / "run.json", ws / "run.json")
    write_json_atomic(ws / "summary.json", summary)
    _write_report(ws / "report.html", record, summary, scores)
    return summary


def _write_report(path: Path, record: dict, summary: dict, scores) -> Path:
    fed, cen = summary["federated"], summary["centralized"]
    comparison = [
        {"model": "federated (global model, FedAvg)", **{k: fed[k] for k in ("auc", "log_loss", "brier", "ece", "ltv_spearman")}},
        {"model": "centralized on pooled data (yardstick)", **{k: cen[k] for k in ("auc", "log_loss", "brier", "ece", "ltv_spearman")}},
    ]
    rounds = [{"round": r["round"], **{k: r["evaluate"].get(k) for k in ("auc", "log_loss", "ece", "ltv_spearman")},
               "train_loss": r["train"].get("train_loss")} for r in record["rounds"]]
    coverage_rows = [{"merchant": m, **c, "used share": c["used"] / max(c["candidates"], 1)}
                     for m, c in summary["consent_coverage"].items()]
    sections = [
        ("Summary", f"<p>Run <code>{record['run_id']}</code>: {len(record['rounds'])} rounds over "
                    f"{len(summary['merchants'])} merchants; status <b>{record['status']}</b>. No raw data left a node: "
                    "the server received model arrays and aggregate counts only.</p>" + table_html(comparison)),
        ("Global model per round", img_tag(plot_rounds(record["rounds"]), "metrics per round") + table_html(rounds)),
        ("Per-merchant AUC", img_tag(plot_merchant_auc(summary["per_merchant_auc"], cen["auc"]), "per-merchant AUC")),
        ("Consent coverage", img_tag(plot_consent_coverage(summary["consent_coverage"]), "consent coverage")
         + table_html(coverage_rows)),
        ("Scores (win-back list)", img_tag(plot_score_distribution(scores["churn_probability"].to_numpy(np.float64),
                                                                   scores["segment"].tolist(), summary["merchants"][0]),
                                           "score distribution")
         + table_html(scores.head(15).to_dict("records"))),
    ]
    return write_html(path, "fedretain demo report", sections)
