"""Per-round overhead of a deployed fedretain run: 3 merchant nodes + platform on loopback.

Starts the platform (SuperLink, TLS, node authentication) and the merchant nodes as
separate processes (the same :class:`fedretain.demo.deployment.LocalDeployment` the
demo and the end-to-end tests use), runs R rounds per configuration and prints, for
rounds 2..R (round 1 includes first-time ingest and imports):

* ``wall``: time between consecutive round checkpoints (``checkpoints/round_NNNN.pt``);
* ``compute``: local ClientApp work on the critical path: the slowest node's train
  handler (which also evaluates the model it received, see ``fedretain.protocol``) plus
  the slowest evaluate-only handler if there is one, from the warm executor's log
  (``node.log``: "train done in ... (app X s)"); a configuration without a warm
  executor is charged the median compute of the warm configurations of this invocation;
* ``overhead = wall - compute``: what the engine adds to a round;
* ``cpu``: CPU seconds per round of every process this deployment started (SuperLink,
  SuperExec, ServerApp, SuperNodes, executors / flwr-clientapp processes).

Configurations: ``flower`` (Flower's node-side defaults: ``flwr-clientapp`` process per
message, SuperNode idle poll 3 s) and ``warm`` (warm executor + ``--poll-interval``).
The ServerApp polls replies every 0.1 s in both (``fedretain.server.federation``).
The load average is printed: on a shared machine the wall figures move with it, the
CPU figures much less.

    python bench/bench_round_latency.py --rounds 6 --configs flower,warm
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from fedretain.demo.deployment import LocalDeployment
from fedretain.procs import descendants

CONFIGS = {
    "flower": {"executor": "subprocess", "poll_interval": None},
    "warm": {"executor": "warm", "poll_interval": 0.2},
    "warm-0.5": {"executor": "warm", "poll_interval": 0.5},
    "subprocess-fastpoll": {"executor": "subprocess", "poll_interval": 0.2},
}
_DONE = re.compile(
    r"^(\S+ \S+) INFO fedretain\.node: (\S+) (?:done|FAILED) in [\d.]+ s \(pull [\d.]+ s, app ([\d.]+) s")


def cpu_seconds(pids: list[int]) -> float:
    """utime+stime (+ reaped children) of ``pids`` and their descendants, zombies included."""
    tick = os.sysconf("SC_CLK_TCK")
    seen, total = set(), 0.0
    for root in pids:
        for pid in [root, *descendants(root)]:
            if pid in seen:
                continue
            seen.add(pid)
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += sum(int(f) for f in fields[11:15]) / tick
    return total


def checkpoint_times(out_dir: Path) -> dict[int, float]:
    folder = out_dir / "checkpoints"
    if not folder.is_dir():
        return {}
    return {int(p.stem.split("_")[1]): p.stat().st_mtime for p in folder.glob("round_*.pt")}


def app_times(silos: list[Path]) -> list[tuple[float, str, float, int]]:
    """(timestamp, message type, handler seconds, node index) from every node.log."""
    out = []
    for i, silo in enumerate(silos):
        log = silo / ".node" / "logs" / "node.log"
        if not log.is_file():
            continue
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            m = _DONE.match(line)
            if m:
                ts = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                out.append((ts, m.group(2), float(m.group(3)), i))
    return out


def compute_per_round(ckpt: dict[int, float], apps: list[tuple[float, str, float, int]]) -> dict[int, float]:
    """Slowest train handler (it evaluates the received model first) + slowest evaluate-only
    handler (nodes not sampled for training; none when every node trains) within each round."""
    out = {}
    for r in sorted(ckpt):
        if r - 1 not in ckpt:
            continue
        lo, hi = ckpt[r - 1], ckpt[r]
        train = [a for ts, t, a, _ in apps if t == "train" and lo < ts <= hi]
        evals = [a for ts, t, a, _ in apps if t == "evaluate" and lo < ts <= hi]
        if train:
            out[r] = max(train) + max(evals, default=0.0)
    return out


def run_config(name: str, root: Path, rounds: int, users: int, project_dir: Path | None) -> dict:
    spec = CONFIGS[name]
    dep = LocalDeployment(root / name, users=users, rounds=rounds, executor=spec["executor"],
                          poll_interval=spec["poll_interval"], project_dir=project_dir,
                          echo=lambda m: None)
    dep.prepare()
    load0 = os.getloadavg()[0]
    with dep:
        dep.start_platform()
        for i in range(len(dep.silos)):
            dep.start_node(i)
        dep.wait_round(1, timeout=600)
        roots = [p.pid for p in dep.platform.processes()] + [n.proc.pid for n in dep.nodes.values()]
        cpu1, t1 = cpu_seconds(roots), time.monotonic()
        dep.wait_round(rounds, timeout=120 * rounds)
        cpu2, t2 = cpu_seconds(roots), time.monotonic()
    ckpt = checkpoint_times(dep.out_dir)
    walls = {r: ckpt[r] - ckpt[r - 1] for r in sorted(ckpt) if r - 1 in ckpt}
    compute = compute_per_round(ckpt, app_times(dep.silos))
    return {"config": name, **spec, "rounds": rounds, "wall": walls, "compute": compute,
            "cpu_per_round": (cpu2 - cpu1) / max(1, rounds - 1), "elapsed_rounds_2_on": t2 - t1,
            "load_before": load0, "load_after": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--users", type=int, default=1500, help="synthetic users in total (over the 3 merchants)")
    ap.add_argument("--configs", default="flower,warm", help=f"comma-separated, from {', '.join(CONFIGS)}")
    ap.add_argument("--workdir", type=Path, default=None, help="keep workspaces here (default: a temp dir)")
    ap.add_argument("--project-dir", type=Path, default=None, help="fedretain source root for `flwr run`")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    args = ap.parse_args(argv)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown config(s): {', '.join(unknown)}")
    root = args.workdir or Path(tempfile.mkdtemp(prefix="fedretain-bench-latency-"))
    print(f"3 nodes + platform on 127.0.0.1, TLS + node auth, {args.rounds} rounds, "
          f"{args.users} synthetic users in total; "
          f"{os.cpu_count()} CPUs; workspaces in {root}")
    results = [run_config(n, root, args.rounds, args.users, args.project_dir) for n in names]
    warm_compute = [c for r in results if r["executor"] == "warm" for c in r["compute"].values()]
    fallback = statistics.median(warm_compute) if warm_compute else None
    print(f"\n{'config':<22}{'wall s/round':>14}{'compute s':>11}{'overhead s':>12}{'CPU s/round':>13}{'load':>12}")
    for r in results:
        walls = list(r["wall"].values())
        comp = list(r["compute"].values()) or ([fallback] if fallback is not None else [])
        wall, c = statistics.median(walls), (statistics.median(comp) if comp else float("nan"))
        r["summary"] = {"wall_median": wall, "compute_median": c, "overhead_median": wall - c,
                        "compute_source": "own log" if r["compute"] else "warm configs' median"}
        print(f"{r['config']:<22}{wall:>14.2f}{c:>11.2f}{wall - c:>12.2f}{r['cpu_per_round']:>13.2f}"
              f"{r['load_before']:>6.1f}->{r['load_after']:<4.1f}")
        print(f"{'':<22}per round: " + ", ".join(f"r{k} {v:.2f}" for k, v in r["wall"].items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
