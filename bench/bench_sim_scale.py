"""Simulation at scale: N rare-repeat merchants x R rounds in one ``fedretain simulate``-equivalent run.

For each N (``--merchants 10,100,1000``) it generates N long-tail sellers
(``fedretain.synth`` mode ``rare-repeat``: most with < 50 customers), provisions their nodes
(key + consent ledger; not timed), then runs, each in a child process whose whole process tree
(driver, Ray's raylet/GCS and workers) is sampled with psutil for CPU time:

* ``anchor``: Flower's Simulation Engine with trivial apps — a ServerApp sending R rounds of
  one message to every node, a ClientApp replying an empty message. This is Flower's own
  per-client cost on this machine now (issue 14 measured ≈ 0.03 CPU-s per client-round);
* ``fedretain``: :func:`fedretain.server.simulation.run_in_simulation` with the real apps
  (R rounds, 1 local epoch; every round also evaluates the received model, plus a final
  evaluate exchange).

It prints wall, CPU-s, and ``(CPU fedretain − CPU anchor) / (N·R)``: what fedretain adds per
merchant-round, training included. The load average is printed beside every row: on a
shared machine wall moves with it, CPU much less.

``--profile-sim N`` runs the fedretain simulation on N merchants with cProfile on the ServerApp's
thread (the driver process) and on every ClientApp call in each Ray worker (stats merged from
all workers), and prints the top of both: where the per-merchant-round overhead of a real run is.

``--profile-node N`` instead profiles, in this process with cProfile, the node-side work of
R rounds on N merchants (consent decision, features, usage records — what every ClientApp
message does before training), the place where per-merchant overheads live.

    python bench/bench_sim_scale.py --merchants 10,100 --rounds 3
    python bench/bench_sim_scale.py --profile-sim 200
    python bench/bench_sim_scale.py --profile-node 100
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

USERS_PER_MERCHANT = 30  # total customers = 30·N; marketplace_sizes gives a long tail, most sellers < 50


# -- the anchor: Flower with trivial apps ----------------------------------------------------------
def _trivial_apps(rounds: int):  # type: ignore[no-untyped-def]
    from flwr.app import Context, Message, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp

    client = ClientApp()

    @client.train()
    def _train(msg: Message, context: Context) -> Message:
        return Message(RecordDict(), reply_to=msg)

    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        for _ in range(rounds):
            nodes = list(grid.get_node_ids())
            replies = grid.send_and_receive([Message(RecordDict(), dst_node_id=n, message_type="train") for n in nodes])
            if sum(1 for r in replies if not r.has_error()) != len(nodes):
                raise RuntimeError("anchor: a trivial client failed")

    return server, client


def child_anchor(n: int, rounds: int) -> None:
    from fedretain.server.settings import RunSettings
    from fedretain.server.simulation import run_in_simulation

    data = Path(tempfile.mkdtemp(prefix="anchor-silos-"))
    for i in range(n):  # run_in_simulation counts silos to size the federation; the trivial app reads none
        (data / f"s{i:05d}").mkdir()
        (data / f"s{i:05d}" / "merchant.json").write_text("{}")
    server, client = _trivial_apps(rounds)
    try:
        run_in_simulation(RunSettings(rounds=rounds, out_dir=str(data / "run")), data, server_app=server,
                          client_app=client)
    finally:
        shutil.rmtree(data, ignore_errors=True)


def child_fedretain(data: str, n: int, rounds: int, out: str) -> None:
    from fedretain.server import progress
    from fedretain.server.progress import MerchantsDone
    from fedretain.server.settings import RunSettings
    from fedretain.server.simulation import run_in_simulation

    obs = MerchantsDone(total=n, echo=True)
    progress.add_observer(obs)
    settings = RunSettings(rounds=rounds, local_epochs=1, min_nodes=max(1, n // 2), out_dir=out,
                           run_id=f"scale{n}")
    run_in_simulation(settings, data)
    import json

    rec = json.loads((Path(out) / "run.json").read_text())
    print(f"status={rec['status']} merchants/round={obs.done_per_round}", flush=True)


# -- profiling a real run: the ServerApp thread and every ClientApp call ------------------------------
def _profiled_apps(stats_dir: str):  # type: ignore[no-untyped-def]
    """The fedretain apps, each call run under cProfile; stats land in ``stats_dir`` (one file per process)."""
    import cProfile

    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    from fedretain.clients.client_app import app as fed_client
    from fedretain.server.server_app import main as fed_main

    class ProfiledClientApp(ClientApp):  # pickled by value into the Ray workers (defined in __main__)
        def __call__(self, message, context):  # type: ignore[no-untyped-def]
            import cProfile as cp
            import os as _os
            import sys as _sys

            g = _sys.__dict__  # one profile per worker process (this class is unpickled per message)
            prof = g.setdefault("_fedretain_bench_prof", cp.Profile(time.thread_time))  # CPU, not wall
            prof.enable()
            try:
                return super().__call__(message, context)
            finally:
                prof.disable()
                g["_fedretain_bench_calls"] = calls = g.get("_fedretain_bench_calls", 0) + 1
                if calls % 25 == 0 or message.metadata.message_type.startswith("query.deliver"):
                    prof.dump_stats(_os.path.join(stats_dir, f"client-{_os.getpid()}.prof"))

    client = ProfiledClientApp.__new__(ProfiledClientApp)
    client.__dict__.update(fed_client.__dict__)
    server = ServerApp()

    @server.main()
    def _main(grid, context):  # type: ignore[no-untyped-def]
        prof = cProfile.Profile(time.thread_time)  # this thread's CPU time: sleeps and waits do not count
        prof.enable()
        try:
            fed_main(grid, context)
        finally:
            prof.disable()
            prof.dump_stats(os.path.join(stats_dir, "server.prof"))

    return server, client


def profile_sim(n: int, rounds: int, top: int, keep: bool = False) -> None:
    import pstats

    root = Path(tempfile.mkdtemp(prefix="bench-sim-prof-"))
    try:
        data = make_silos(root, n)
        stats_dir = root / "prof"
        stats_dir.mkdir()
        t0 = time.perf_counter()
        wall, cpu, out = measure(["--child", "profiled", str(data), str(n), str(rounds), str(root / "run"),
                                  str(stats_dir)])
        print("\n".join(x for x in out.splitlines() if x.startswith(("profiled run done", "CPU-s by process"))))
        print(f"profiled run, {n} merchants x {rounds} rounds: {wall:.1f} s wall, {cpu:.1f} CPU-s (whole tree, "
              f"profiling included; load {_load()}); {time.perf_counter() - t0:.0f} s")
        server = pstats.Stats(str(stats_dir / "server.prof"))
        print(f"\n== ServerApp thread: {server.total_tt:.2f} s profiled ==")  # type: ignore[attr-defined]
        server.sort_stats("cumulative").print_stats(top)
        server.sort_stats("tottime").print_stats(top)
        clients = sorted(stats_dir.glob("client-*.prof"))
        merged = pstats.Stats(*map(str, clients))
        print(f"\n== ClientApp calls, {len(clients)} worker(s): {merged.total_tt:.2f} s profiled, "  # type: ignore[attr-defined]
              f"{merged.total_tt / (n * rounds):.4f} s per merchant-round ==")  # type: ignore[attr-defined]
        merged.sort_stats("cumulative").print_stats(top)
        merged.sort_stats("tottime").print_stats(top)
    finally:
        if keep:
            print(f"kept {root} (profiles in {root / 'prof'})")
        else:
            shutil.rmtree(root, ignore_errors=True)


def child_profiled(data: str, n: int, rounds: int, out: str, stats_dir: str) -> None:
    from fedretain.server.settings import RunSettings
    from fedretain.server.simulation import run_in_simulation

    server, client = _profiled_apps(stats_dir)
    settings = RunSettings(rounds=rounds, local_epochs=1, min_nodes=max(1, n // 2), out_dir=out,
                           run_id=f"prof{n}")
    run_in_simulation(settings, data, server_app=server, client_app=client)
    print("profiled run done", flush=True)


# -- measuring a child's whole process tree --------------------------------------------------------
class TreeCPU:
    """Sum of user+system CPU seconds of a process and all its descendants, sampled until it exits."""

    def __init__(self, pid: int, every: float = 0.25) -> None:
        self.root, self.every, self.seen = psutil.Process(pid), every, {}
        self.names: dict[tuple[int, float], str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        for p in procs:
            try:
                t = p.cpu_times()
                self.seen[(p.pid, p.create_time())] = t.user + t.system
                self.names.setdefault((p.pid, p.create_time()), p.name())
            except psutil.Error:
                pass

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every)

    def total(self) -> float:
        self._stop.set()
        self._thread.join()
        return sum(self.seen.values())

    def by_name(self) -> dict[str, float]:
        """CPU seconds per process name (driver, Ray's raylet/gcs_server, ray::ClientAppActor workers...)."""
        out: dict[str, float] = {}
        for key, cpu in self.seen.items():
            out[self.names.get(key, "?")] = out.get(self.names.get(key, "?"), 0.0) + cpu
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def measure(args: list[str]) -> tuple[float, float, str]:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    cpu = TreeCPU(proc.pid)
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    total = cpu.total()
    if proc.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{out[-3000:]}")
    split = ", ".join(f"{name} {sec:.1f}" for name, sec in list(cpu.by_name().items())[:6])
    return wall, total, out + f"\nCPU-s by process: {split}\n"


def make_silos(root: Path, n: int, seed: int = 0) -> Path:
    from fedretain.cli.train import ensure_nodes
    from fedretain.synth import generate

    data = root / f"silos{n}"
    generate(data, n_merchants=n, n_users=USERS_PER_MERCHANT * n, seed=seed, mode="rare-repeat")
    ensure_nodes(data)
    return data


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def scale(ns: list[int], rounds: int, keep: bool) -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-sim-scale-"))
    rows = []
    try:
        for n in ns:
            data = make_silos(root, n)
            sizes = sorted(sum(1 for _ in open(p / "users.csv")) - 1 for p in data.iterdir() if p.is_dir())
            print(f"N={n}: customers per merchant median {sizes[len(sizes) // 2]}, "
                  f"{sum(s < 50 for s in sizes)}/{n} below 50, largest {sizes[-1]}", flush=True)
            aw, ac, _ = measure(["--child", "anchor", str(n), str(rounds)])
            la_a = _load()
            # each N in its own folder: the platform's witness store (witness.db beside the run folder)
            # pins every merchant's ledger key, and seller_0000.. of another N is a different ledger
            fw, fc, out = measure(["--child", "fedretain", str(data), str(n), str(rounds),
                                   str(root / f"n{n}" / "run")])
            la_f = _load()
            print("\n".join(x for x in out.splitlines() if x.startswith(("status=", "CPU-s by process"))), flush=True)
            extra = (fc - ac) / (n * rounds)
            rows.append((n, aw, ac, ac / (n * rounds), fw, fc, extra, la_a, la_f))
            print(f"N={n}: anchor {aw:.1f} s / {ac:.1f} CPU-s; fedretain {fw:.1f} s / {fc:.1f} CPU-s; "
                  f"beyond anchor {extra:.3f} CPU-s per merchant-round (load {la_f})", flush=True)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n{'merchants':>9} {'anchor wall':>11} {'anchor CPU':>10} {'anchor CPU/cr':>13} {'fedretain wall':>14} "
          f"{'fedretain CPU':>13} {'+CPU/merchant-round':>19}  load (1/5/15 min, after anchor | after run)")
    for n, aw, ac, acr, fw, fc, extra, la_a, la_f in rows:
        print(f"{n:>9} {aw:>10.1f}s {ac:>9.1f}s {acr:>13.3f} {fw:>13.1f}s {fc:>12.1f}s {extra:>19.3f}  {la_a} | {la_f}")
    # the per-merchant (marginal) cost: fixed costs (Ray start, each worker importing torch) cancel out
    for (n0, _, ac0, _, _, fc0, *_), (n1, _, ac1, _, _, fc1, *_) in zip(rows, rows[1:]):
        print(f"marginal {n0}->{n1} merchants: anchor {(ac1 - ac0) / ((n1 - n0) * rounds):.3f} CPU-s per "
              f"client-round, fedretain {(fc1 - fc0) / ((n1 - n0) * rounds):.3f}, beyond the anchor "
              f"{((fc1 - fc0) - (ac1 - ac0)) / ((n1 - n0) * rounds):.3f} CPU-s per merchant-round")
    print(f"(rounds={rounds}, cores={os.cpu_count()}, RAY_worker_niceness="
          f"{os.environ.get('RAY_worker_niceness', 'unset: fedretain sets 0')})")


def profile_node(n: int, rounds: int, top: int) -> None:
    """cProfile of the node-side work of ``rounds`` rounds on ``n`` merchants, in this process."""
    import cProfile
    import pstats

    from flwr.app import ConfigRecord

    from fedretain.clients.client_app import node_for, prepare_from_config, record_usage
    from fedretain.features import FEATURES

    root = Path(tempfile.mkdtemp(prefix="bench-node-prof-"))
    try:
        data = make_silos(root, n)
        silos = sorted(p for p in data.iterdir() if p.is_dir())
        from flwr.app import Context, RecordDict

        ctxs = [Context(run_id=0, node_id=i, node_config={"data-path": str(s)}, state=RecordDict(), run_config={})
                for i, s in enumerate(silos)]
        names = list(FEATURES)

        def work() -> int:
            done = 0
            for rnd in range(1, rounds + 1):
                cfg = ConfigRecord({"server-round": rnd, "run-id": "prof", "purpose": "retention_modeling",
                                    "features": names, "horizon-days": 30.0})
                for ctx in ctxs:
                    node = node_for(ctx)
                    prep = prepare_from_config(node, cfg)
                    if prep.n_train:
                        record_usage(node, prep, cfg, "train")
                    done += 1
            return done

        prof = cProfile.Profile()
        t0, c0 = time.perf_counter(), time.process_time()
        prof.enable()
        done = work()
        prof.disable()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(f"node-side work, {n} merchants x {rounds} rounds: {wall:.2f} s wall, {cpu:.2f} CPU-s, "
              f"{cpu / done:.4f} CPU-s per merchant-round (profiled; load {_load()})")
        pstats.Stats(prof).sort_stats("cumulative").print_stats(top)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--merchants", default="10,100", help="comma-separated N (e.g. 10,100,1000)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the generated silos and run folders")
    ap.add_argument("--profile-node", type=int, default=0, metavar="N")
    ap.add_argument("--profile-sim", type=int, default=0, metavar="N")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        kind, *rest = a.child
        if kind == "anchor":
            child_anchor(int(rest[0]), int(rest[1]))
        elif kind == "profiled":
            child_profiled(rest[0], int(rest[1]), int(rest[2]), rest[3], rest[4])
        else:
            child_fedretain(rest[0], int(rest[1]), int(rest[2]), rest[3])
        return
    if a.profile_sim:
        profile_sim(a.profile_sim, a.rounds, a.top, a.keep)
        return
    if a.profile_node:
        profile_node(a.profile_node, a.rounds, a.top)
        return
    scale([int(x) for x in a.merchants.split(",") if x.strip()], a.rounds, a.keep)


if __name__ == "__main__":
    main()
