"""DP-SGD step cost vs the non-private step, same model, same data, one run.

    python bench/bench_dp_throughput.py [--rows 51200] [--batch 512] [--repeats 5] [--json out.json]

Times the training loop only (no calibration, ledger or imports): the non-private
``LocalTrainer`` (Adam, shuffled mini-batches) against fedretain's DP trainer with
book-keeping clipping (``bk``, the default) and with Opacus's ghost clipping, and —
for context — Opacus's default ``make_private`` (per-sample gradients via hooks,
``DPDataLoader``). One torch thread, as in the ClientApp. Variants are interleaved
and each is repeated; the table gives the median per-step time in CPU seconds
(``process_time``, robust to other jobs on a shared machine) and in wall seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings

import numpy as np
import torch

from fedretain.features import DEFAULT_FEATURES, feature_columns
from fedretain.models import RetentionLoss, RetentionNet
from fedretain.privacy.accountant import Accountant
from fedretain.privacy.budget import RunPlan
from fedretain.privacy.dp_trainer import DPConfig, DPTrainer
from fedretain.train import LocalTrainer, TrainConfig


def _data(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    p = 1 / (1 + np.exp(-(x[:, 0] - 0.5 * x[:, 1])))
    y = np.stack([(rng.random(n) < p).astype(np.float32), np.abs(rng.normal(size=n)).astype(np.float32)], axis=1)
    return x, y


def _timed(fn) -> tuple[float, float]:
    c, w = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c, time.perf_counter() - w


def plain(x, y, batch, epochs):
    model = RetentionNet(x.shape[1])
    trainer = LocalTrainer(TrainConfig(epochs=epochs, batch_size=batch, learning_rate=0.01))
    cpu, wall = _timed(lambda: trainer.fit(model, x, y))
    steps = epochs * -(-len(x) // batch)
    return cpu / steps, wall / steps


def fedretain_dp(x, y, batch, epochs, clipping):
    model = RetentionNet(x.shape[1])
    cfg = TrainConfig(epochs=epochs, batch_size=batch, learning_rate=0.01)
    batches = -(-len(x) // batch)
    # a fixed plan (σ = 1) so the timing excludes calibration; noise cost does not depend on σ
    plan = RunPlan("bench", "retention_modeling", "local", "rdp", 3.0, 1e-6, 1.0, 1 / batches, epochs * batches, len(x))
    trainer = DPTrainer(cfg, DPConfig(clipping=clipping, noise_seed=0), os.devnull, "bench", "retention_modeling", 1)
    steps = epochs * batches
    acc = Accountant("rdp")
    cpu, wall = _timed(lambda: trainer._train(model.train(), x, y, plan, acc, steps, None))
    assert acc.steps == steps
    return cpu / steps, wall / steps


def opacus_default(x, y, batch, epochs):
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    model = RetentionNet(x.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    loader = DataLoader(TensorDataset(torch.as_tensor(x), torch.as_tensor(y)), batch_size=batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gsm, dpo, dl = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
            criterion=RetentionLoss())
    crit = RetentionLoss()
    steps = 0

    def run():
        nonlocal steps
        for _ in range(epochs):
            for xb, yb in dl:
                dpo.zero_grad()
                crit(gsm(xb), yb).backward()
                dpo.step()
                steps += 1

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cpu, wall = _timed(run)
    return cpu / steps, wall / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=51_200)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--features", type=int, default=len(feature_columns(DEFAULT_FEATURES)))
    ap.add_argument("--skip-opacus-default", action="store_true")
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    x, y = _data(args.rows, args.features)
    variants = {
        "non-private (LocalTrainer)": lambda: plain(x, y, args.batch, args.epochs),
        "DP-SGD fedretain bk (default)": lambda: fedretain_dp(x, y, args.batch, args.epochs, "bk"),
        "DP-SGD Opacus ghost clipping": lambda: fedretain_dp(x, y, args.batch, args.epochs, "ghost"),
    }
    if not args.skip_opacus_default:
        variants["DP-SGD Opacus default (hooks)"] = lambda: opacus_default(x, y, args.batch, args.epochs)
    for fn in variants.values():  # warm-up: imports, first-call overheads
        fn()
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            times[name].append(fn())
    base_cpu = statistics.median(t[0] for t in times["non-private (LocalTrainer)"])
    base_wall = statistics.median(t[1] for t in times["non-private (LocalTrainer)"])
    print(f"RetentionNet {args.features}-64-32-2, {args.rows} rows, batch {args.batch}, 1 torch thread, "
          f"median of {args.repeats}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
          f"({platform.processor() or platform.machine()})")
    print(f"{'variant':34s} {'ms/step cpu':>12s} {'× non-private':>14s} {'ms/step wall':>13s} {'× wall':>7s}")
    rows = []
    for name, ts in times.items():
        cpu = statistics.median(t[0] for t in ts)
        wall = statistics.median(t[1] for t in ts)
        rows.append({"variant": name, "ms_per_step_cpu": cpu * 1e3, "ratio_cpu": cpu / base_cpu,
                     "ms_per_step_wall": wall * 1e3, "ratio_wall": wall / base_wall})
        print(f"{name:34s} {cpu * 1e3:12.2f} {cpu / base_cpu:14.2f} {wall * 1e3:13.2f} {wall / base_wall:7.2f}")
    ratio = rows[1]["ratio_cpu"]
    print(f"\nDP step / non-private step (fedretain default, batch {args.batch}): {ratio:.2f}× "
          f"({'within' if ratio <= 2.5 else 'OVER'} the 2.5× limit)")
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as fh:
            json.dump({"args": vars(args), "results": rows, "loadavg": os.getloadavg()[0]}, fh, indent=2)


if __name__ == "__main__":
    main()
