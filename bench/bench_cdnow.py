"""CDNOW, 10 merchant silos: federated model vs centralized baselines (issue 2's protocol).

    python bench/bench_cdnow.py [--merchants 10] [--split hash] [--rounds 10] [--seeds 1]

Prints a table of test AUC / log loss and writes bench/out/cdnow.json. The centralized
logistic regression and MLP are trained on the same pooled training customers and
scored on the same held-out customers as the federated model.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from cdnow_protocol import REPO, make_silos, prepared, settings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--merchants", type=int, default=10)
    ap.add_argument("--split", default="hash", choices=["hash", "non-iid", "power-law"])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=1)
    args = ap.parse_args()

    from sklearn.linear_model import LogisticRegression

    from fedretain.centralized import evaluate_bundle, pool, train_centralized
    from fedretain.metrics import log_loss, roc_auc
    from fedretain.models import ModelBundle, Standardizer
    from fedretain.server.simulation import run_in_simulation

    rows = []
    with tempfile.TemporaryDirectory(prefix="fedretain-cdnow-") as tmp:
        silos = make_silos(Path(tmp) / "silos", args.merchants, args.split)
        base = settings(Path(tmp) / "run0", args.rounds)
        pooled = pool(prepared(silos, base))
        print(f"CDNOW: {len(silos)} silos ({args.split}), {len(pooled.x_train)} train / {len(pooled.x_test)} test "
              f"customers, test repurchase rate {pooled.y_test[:, 0].mean():.3f}")
        scaler = Standardizer.fit(pooled.x_train)
        lr = LogisticRegression(max_iter=5000).fit(scaler.transform(pooled.x_train), pooled.y_train[:, 0])
        p = lr.predict_proba(scaler.transform(pooled.x_test))[:, 1]
        rows.append({"model": "centralized logistic regression", "auc": roc_auc(pooled.y_test[:, 0], p),
                     "log_loss": log_loss(pooled.y_test[:, 0], p)})
        for seed in range(args.seeds):
            _, _, mlp = train_centralized(pooled, base.hidden, epochs=args.rounds * base.local_epochs,
                                          learning_rate=base.learning_rate, batch_size=base.batch_size, seed=seed)
            rows.append({"model": f"centralized MLP (seed {seed})", **mlp})
            t0 = time.time()
            s = settings(Path(tmp) / f"run{seed}", args.rounds, seed=seed)
            run_dir = run_in_simulation(s, Path(tmp) / "silos")
            fed = evaluate_bundle(ModelBundle.load(run_dir / "model.pt"), pooled)
            rows.append({"model": f"federated FedAvg (seed {seed})", **fed, "seconds": time.time() - t0})
    print(f"{'model':40s} {'AUC':>7s} {'log loss':>9s}")
    for r in rows:
        print(f"{r['model']:40s} {r['auc']:7.4f} {r['log_loss']:9.4f}")
    fed_auc = np.mean([r["auc"] for r in rows if r["model"].startswith("federated")])
    print(f"mean federated AUC {fed_auc:.4f} vs logistic regression {rows[0]['auc']:.4f}")
    out = REPO / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "cdnow.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2, default=float))


if __name__ == "__main__":
    main()
