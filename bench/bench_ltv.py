"""LTV in money on held-out customers: mean-calibration ratio and normalized Gini per dataset.

    python bench/bench_ltv.py [--datasets cdnow-hash,synth-default,rare-repeat] [--models logreg,mlp]
                              [--rare-scale 3] [--workdir DIR]

For each dataset a non-private federated model (``bench_models.run_none``) is trained on the
training customers; ``fedretain.ltv.MoneyCalibration`` is fitted on the pooled *training*
customers (in deployment each shop fits its own on the node) and judged on the pooled held-out
customers: mean prediction / mean actual spend (target 0.85-1.15) with a 95 % bootstrap interval
over held-out customers (the held-out mean is itself a sample: with 1-3 % returning, a few dozen
buyers move it by ±30 %, hence ``--rare-scale``), the normalized Gini of the calibrated value and
of the LTV head's raw ranking, and the top 1 %'s share of predicted money. ``old`` is the former
single ratio factor (Σ actual / Σ expm1(head)) on the same model: the before/after. Writes
``bench/out/ltv.json``; load average printed next to the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from bench_models import REPO, _as_logreg, load, nodes_of, run_none

from fedretain.ltv import MoneyCalibration, calibration_ratio, normalized_gini
from fedretain.train import predict


def _bootstrap(actual: np.ndarray, value: np.ndarray, n: int = 400, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    ratios = []
    for _ in range(n):
        i = rng.integers(0, len(actual), len(actual))
        if actual[i].sum() > 0:
            ratios.append(value[i].sum() / actual[i].sum())
    return float(np.quantile(ratios, 0.025)), float(np.quantile(ratios, 0.975))


def evaluate(nodes: list[dict], model: torch.nn.Module, horizon_days: float) -> dict:
    """Calibration fitted on the pooled training customers, judged on the pooled held-out ones."""
    x = np.concatenate([n["x"] for n in nodes])
    xt = np.concatenate([n["xt"] for n in nodes])
    spend = np.expm1(np.concatenate([n["y"] for n in nodes])[:, 1].astype(np.float64))
    spend_t = np.expm1(np.concatenate([n["yt"] for n in nodes])[:, 1].astype(np.float64))
    p, raw = predict(model, x)
    pt, raw_t = predict(model, xt)
    cal = MoneyCalibration.fit(raw, spend, horizon_days, p_return=p)
    value = cal.apply(raw_t, pt)
    old = raw_t * spend.sum() / raw.sum()
    low, high = _bootstrap(spend_t, value)
    top = np.sort(value)[::-1]
    top_old = np.sort(old)[::-1]
    return {"train": len(x), "test": len(xt), "test_buyers": int((spend_t > 0).sum()),
            "mean_actual": float(spend_t.mean()), "mean_predicted": float(value.mean()),
            "ratio": calibration_ratio(spend_t, value), "ratio_low": low, "ratio_high": high,
            "gini": normalized_gini(spend_t, value), "gini_head": normalized_gini(spend_t, raw_t),
            "ratio_old": calibration_ratio(spend_t, old), "ratio_old_interval": list(_bootstrap(spend_t, old)),
            "top1_share": float(top[: max(len(top) // 100, 1)].sum() / top.sum()),
            "top1_share_old": float(top_old[: max(len(top_old) // 100, 1)].sum() / top_old.sum()),
            "calibration": cal.as_dict(), "pass": bool(0.85 <= calibration_ratio(spend_t, value) <= 1.15)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default="cdnow-hash,synth-default,rare-repeat")
    ap.add_argument("--models", default="logreg")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--rare-scale", type=float, default=3.0,
                    help="rare-repeat size × this (3: ~170 returning held-out customers)")
    ap.add_argument("--workdir", default="", help="keep silos and prepared data here for reruns")
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "ltv.json"))
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    import tempfile

    rows = []
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="fedretain-ltv-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in args.datasets.split(","):
            silos, s, preps = load(name, work, args.rounds, args.rare_scale if name == "rare-repeat" else 1.0)
            nodes = nodes_of(silos, preps)
            for kind in args.models.split(","):
                t0 = time.time()
                model = run_none(nodes, s if kind == "mlp" else _as_logreg(s), kind, 0)
                row = {"dataset": name, "model": kind, "horizon_days": float(s.horizon_days),
                       **evaluate(nodes, model, float(s.horizon_days)), "seconds": time.time() - t0,
                       "loadavg": os.getloadavg()[0]}
                rows.append(row)
                print(f"{name:14s} {kind:6s} held-out {row['test']:5d} ({row['test_buyers']:4d} buyers)  ratio "
                      f"{row['ratio']:.3f} [{row['ratio_low']:.2f}, {row['ratio_high']:.2f}] "
                      f"{'PASS' if row['pass'] else 'FAIL'}  Gini {row['gini']:.3f} (head {row['gini_head']:.3f})  "
                      f"old ratio {row['ratio_old']:.3f}  top-1% share {row['top1_share']:.2f} "
                      f"(old {row['top1_share_old']:.2f})  load {row['loadavg']:.1f}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows, "seconds": time.time() - t_start,
                               "loadavg": os.getloadavg()}, indent=2, default=float))
    print(f"wrote {out} ({time.time() - t_start:.0f} s, load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
