"""Real deployment on 127.0.0.1: SuperLink and three SuperNodes as separate processes.

TLS and node authentication on; each test's deployment is stopped by a finalizer, also
when the test fails (every node runs in its own process group, the platform's
processes are tracked by pid and start time).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from fedretain.demo.deployment import LocalDeployment

pytestmark = pytest.mark.heavy

def _deployment(root: Path, silos: list[Path], request: pytest.FixtureRequest, **kw) -> LocalDeployment:
    shutil.copytree(silos[0].parent, root / "silos")  # own copy: nodes append usage records to the ledgers
    dep = LocalDeployment(root, echo=lambda _m: None, **kw)
    request.addfinalizer(dep.stop_all)
    dep.prepare()
    return dep


def _all_stopped(dep: LocalDeployment) -> None:
    """Nothing the deployment started is left (platform tree and node process groups)."""
    for ref in dep.platform.processes() if dep.platform else []:
        assert not ref.alive(), f"{ref.name} (pid {ref.pid}) still running"
    assert len(dep.started) >= len(dep.silos)
    for node in dep.started:
        assert node.proc.poll() is not None
        with pytest.raises(ProcessLookupError):
            os.killpg(node.proc.pid, 0)


def _round(record: dict, n: int) -> dict:
    return next(r for r in record["rounds"] if r["round"] == n)


def _trained(entry: dict) -> set[str]:
    return {n["merchant_id"] for n in entry["nodes"] if n["phase"] == "train" and not n["error"]}


def _wait_log(path: Path, pattern: str, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if len(re.findall(pattern, text)) >= count:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{pattern!r} did not appear {count}x in {path} within {timeout} s")


# -- one platform, three rounds; the refusal tests reuse it -------------------------------------------
@pytest.fixture(scope="module")
def tls_run(tmp_path_factory, synth_silos, request):
    """One platform and three nodes shared by every test of it; stopping it is checked at teardown.

    The stop check runs whatever order the tests ran in (it used to be a test that had to come last):
    if anything the deployment started is left running, the teardown fails the module.
    """
    dep = _deployment(tmp_path_factory.mktemp("deploy"), synth_silos, request, rounds=3)
    dep.start_platform()
    for i in range(3):
        dep.start_node(i)
    progress = dep.wait_done(timeout=420)
    yield dep, progress
    dep.stop_all()
    _all_stopped(dep)


def test_three_rounds_with_tls_and_node_auth(tls_run):
    dep, progress = tls_run
    assert progress["status"] == "completed", progress
    record = json.loads((dep.out_dir / "run.json").read_text())
    assert [r["round"] for r in record["rounds"]] == [1, 2, 3]
    merchants = {s.name for s in dep.silos}
    for entry in record["rounds"]:
        assert _trained(entry) == merchants
        assert Path(entry["checkpoint"]).is_file()
        assert 0.5 < entry["evaluate"]["auc"] <= 1.0
    assert set(record["merchants"]) == merchants
    assert all(m["rounds"] == [1, 2, 3] for m in record["merchants"].values())
    # lineage: each merchant reported the head of its own consent ledger
    from fedretain.consent.ledger import ConsentLedger

    for silo in dep.silos:
        with ConsentLedger.open(silo / ".node" / "consent.db") as ledger:
            head = ledger.head()
        reported = {n["lineage"]["ledger-root"] for e in record["rounds"] for n in e["nodes"]
                    if n["merchant_id"] == silo.name}
        assert reported == {head.root_hex}
    # it really was TLS + node auth: the SuperLink was started that way and each node used its key
    state = json.loads((dep.workspace / "platform" / "platform.json").read_text())
    assert state["insecure"] is False and state["auth"] is True
    for i in range(3):
        out = dep.nodes[i].output()
        assert "TLS to 127.0.0.1" in out and "verified" in out
        assert "connected to the platform as SuperNode" in out
        # the merchant sees each round on the console, not only in the node log
        assert re.search(r"round 3/3 train, [\d,]+ examples used, ", out), out[-2000:]


def test_each_node_received_the_final_model_and_scores_its_users_with_it(tls_run, tmp_path):
    import hashlib

    import pandas as pd
    from click.testing import CliRunner

    from fedretain.cli.train import score

    dep, _ = tls_run
    record = json.loads((dep.out_dir / "run.json").read_text())
    final = _round(record, 3)["model_sha256"]
    assert record["delivery"]["model_sha256"] == final
    assert {n["merchant_id"] for n in record["delivery"]["nodes"] if n["acknowledged"]} == {s.name for s in dep.silos}
    for node in dep.nodes.values():  # `client start`'s end-of-run summary: the model kept and what joining gained
        assert f"final model of run {record['run_id']} received (sha256 {final[:16]})" in node.output()
        assert re.search(r"value of joining, on \d+ held-out customers \(computed here, not sent\)", node.output())
    for silo in dep.silos:
        latest = silo / ".node" / "models" / "latest.pt"
        assert hashlib.sha256(latest.read_bytes()).hexdigest() == final
        out = tmp_path / f"{silo.name}.csv"
        res = CliRunner().invoke(score, ["--silo", str(silo), "--out", str(out)])
        assert res.exit_code == 0, res.output
        scores = pd.read_csv(out)
        assert len(scores) > 0 and list(scores["rank"]) == list(range(1, len(scores) + 1))
        from fedretain.consent.ledger import ConsentLedger

        with ConsentLedger.open(silo / ".node" / "consent.db") as ledger:  # scoring left its usage record
            uses = [u for u in ledger.usages() if u.feature_set.startswith("score:")]
        assert any(u.run_id == record["run_id"] and u.round == 3 and u.n_users == len(scores) for u in uses)


def test_status_lists_nodes_and_rounds(tls_run):
    from click.testing import CliRunner

    from fedretain.cli import main

    dep, _ = tls_run
    res = CliRunner().invoke(main, ["server", "status", "--config", str(dep.config_path)])
    assert res.exit_code == 0, res.output
    assert "platform RUNNING" in res.output and "TLS, node auth on" in res.output
    assert "nodes: 3 online of 3 registered" in res.output
    assert "3/3 rounds done" in res.output and "round 3/3: 3 merchant(s)" in res.output
    link_log = (dep.workspace / "platform" / "logs" / "superlink.log").read_bytes()
    assert b"Starting Flower SuperLink" in link_log and b"Starting Flower SuperExec" in link_log
    assert b"\x1b" not in link_log  # started through fedretain.compat.superlink: plain log lines
    # each node is named: the registered key (comment) and the merchant id it reported
    for silo in dep.silos:
        assert re.search(rf"online\s+key {silo.name} \(SHA256:[A-Za-z0-9+/]+\); merchant {silo.name}\b",
                         res.output), res.output
    assert " none" not in res.output
    # the ServerApp's log saved by `status` carries no colour codes
    run_logs = list((dep.workspace / "platform" / "logs").glob("run-*.log"))
    assert run_logs and all(b"\x1b" not in p.read_bytes() for p in run_logs)
    assert b"\x1b" not in (dep.silos[0] / ".node" / "logs" / "supernode.log").read_bytes()


def test_register_key_with_a_relative_path(tls_run, tmp_path, monkeypatch):
    """DEPLOYMENT.md: `fedretain server register-key --config ... new_shop.pub`, typed in the operator's folder."""
    from click.testing import CliRunner

    from fedretain import tls
    from fedretain.cli import main

    dep, _ = tls_run
    new = tls.create_node_key(tmp_path / "new_shop", "new_shop-platform-node-auth")
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["server", "register-key", "--config", str(dep.config_path), "new_shop.pub"])
    assert res.exit_code == 0, res.output
    assert f"registered node key new_shop.pub ({new.fingerprint}) as SuperNode" in res.output


def test_no_private_key_in_any_log(tls_run):
    dep, _ = tls_run
    keys = [dep.key(i) for i in range(3)] + [dep.workspace / "certs" / "server.key", dep.workspace / "certs" / "ca.key"]
    secrets = ["".join(k.read_text().split("-----")[2].split())[-60:-8] for k in keys]  # private part of the body
    logs = [p for p in dep.workspace.rglob("*.log")] + [dep.workspace / "platform" / "platform.json"]
    assert len(logs) >= 5
    for path in logs:
        text = path.read_text(errors="replace")
        for secret in secrets:
            assert secret not in text, f"private key material in {path}"


def test_unregistered_key_is_refused(tls_run, tmp_path):
    from fedretain import tls

    dep, _ = tls_run
    stranger = tls.create_node_key(tmp_path / "stranger").private_key
    (tmp_path / "state").mkdir()  # a separate state dir needs the node's ledger-key pin (node.json)
    shutil.copy(dep.silos[0] / ".node" / "node.json", tmp_path / "state" / "node.json")
    node = dep.start_node(0, key=stranger, extra=("--state-dir", str(tmp_path / "state"),
                                                  "--consent-db", str(dep.silos[0] / ".node" / "consent.db")))
    assert node.proc.wait(120) == 3
    out = node.output()
    assert "the platform refused this node: its public key is not registered" in out
    assert "[code: 2004] Failed to activate SuperNode" in (tmp_path / "state" / "logs" / "supernode.log").read_text()


def test_plain_text_node_is_refused_by_tls_server(tls_run, tmp_path):
    dep, _ = tls_run
    (tmp_path / "state").mkdir()  # a separate state dir needs the node's ledger-key pin (node.json)
    shutil.copy(dep.silos[1] / ".node" / "node.json", tmp_path / "state" / "node.json")
    node = dep.start_node(1, insecure=True, extra=("--state-dir", str(tmp_path / "state"),
                                                   "--consent-db", str(dep.silos[1] / ".node" / "consent.db")))
    assert node.proc.wait(60) == 3  # the platform refused the plain-text connection
    out = node.output()
    assert "refused the plain-text connection" in out
    assert "Server disconnected without sending a response" in out
    assert "it serves TLS only" in out


# -- fault tolerance ----------------------------------------------------------------------------------
def test_node_killed_in_round_2_run_completes_and_node_rejoins(tmp_path, synth_silos, request):
    rounds = 10  # a round takes about a second: enough later rounds for the restarted node to be back
    dep = _deployment(tmp_path, synth_silos, request, rounds=rounds, min_nodes=2, heartbeat_interval=10,
                      run={"round-timeout": 120.0, "node-wait-timeout": 60.0})
    # with min-nodes 2 a run submitted at once may start round 1 before the third node is up:
    # start the platform without a run, wait for all three nodes, then submit (`server run`)
    dep.start_platform(submit=False)
    for i in range(3):
        dep.start_node(i)
    dep.wait_online(3, timeout=180)
    dep.submit_run()
    victim = 2
    log = dep.silos[victim] / ".node" / "logs" / "supernode.log"
    _wait_log(log, r"Receiving: train message", 2, timeout=300)  # round 2's train message arrived
    dep.kill_node(victim)  # SIGKILL the whole node (supervisor, SuperNode, executor) before it replies
    # The merchant restarts its node at once. The SuperLink still lists the node as online until it
    # misses 2 heartbeats (20 s with --heartbeat-interval 10; 60 s with Flower's default): round 2
    # waits for that, gets "node unavailable" for it and goes on with the other two; the restarted
    # node is admitted again right after.
    dep.start_node(victim)
    progress = dep.wait_done(timeout=400)
    assert progress["status"] == "completed", progress
    record = json.loads((dep.out_dir / "run.json").read_text())
    name, others = dep.silos[victim].name, {s.name for s in dep.silos} - {dep.silos[victim].name}
    assert _trained(_round(record, 1)) == others | {name}
    round2 = _round(record, 2)
    assert _trained(round2) == others  # round 2 finished without the killed node's update ...
    # the killed node's round-2 train message is recorded as failed (Flower's "node unavailable", or the
    # restarted node's late answer refused), never silently dropped
    errors = [n["error"] for n in round2["nodes"] if n["phase"] == "train" and n["error"]]
    assert errors, round2["nodes"]
    assert _trained(_round(record, rounds)) == others | {name}  # ... and the node rejoined for later rounds
    assert 2 not in record["merchants"][name]["rounds"] and rounds in record["merchants"][name]["rounds"]
    assert "still lists this node as online" in dep.nodes[victim].output()


def test_server_restart_resumes_from_checkpoint(tmp_path, synth_silos, request):
    dep = _deployment(tmp_path, synth_silos, request, rounds=3)
    dep.start_platform()
    for i in range(3):
        dep.start_node(i)
    dep.wait_round(2, timeout=300)
    dep.kill_platform()  # SIGKILL: SuperLink, SuperExec, ServerApp
    before = json.loads((dep.out_dir / "run.json").read_text())
    assert before["status"] == "running" and [r["round"] for r in before["rounds"]][:2] == [1, 2]
    ckpt2 = (dep.out_dir / "checkpoints" / "round_0002.pt").stat().st_mtime_ns
    dep.start_platform(resume=True)
    progress = dep.wait_done(timeout=300)
    assert progress["status"] == "completed", progress
    record = json.loads((dep.out_dir / "run.json").read_text())
    assert record["run_id"] == before["run_id"]
    resumed = [e for e in record["events"] if e["kind"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["from_round"] == 2
    assert [r["round"] for r in record["rounds"]] == [1, 2, 3]
    assert _round(record, 1) == _round(before, 1)  # kept, not redone
    # round 2 was trained before the kill; its model's evaluation came with round 3's exchange
    kept = ("train", "checkpoint", "started", "finished")
    assert {k: _round(record, 2)[k] for k in kept} == {k: _round(before, 2)[k] for k in kept}
    assert not _round(before, 2)["evaluate"] and _round(record, 2)["evaluated_in_round"] == 3
    assert 0.5 < _round(record, 2)["evaluate"]["auc"] <= 1.0
    assert (dep.out_dir / "checkpoints" / "round_0002.pt").stat().st_mtime_ns == ckpt2
    assert _trained(_round(record, 3)) == {s.name for s in dep.silos}  # the nodes survived the restart
    assert _round(record, 3)["started"] >= resumed[0]["at"]
    dep.stop_all()
    _all_stopped(dep)
    # two Flower runs were submitted to two SuperLinks; both are in the platform state
    state = json.loads((dep.workspace / "platform" / "platform.json").read_text())
    assert [r["resume"] for r in state["runs"]] == [False, True]
    assert len({r["run_id"] for r in state["runs"]}) == 1


def test_deploy_demo_stops_everything(tmp_path, synth_silos):
    """``run_deploy_demo`` leaves no process behind (checked by pid start times from its state)."""
    from fedretain.demo.deployment import run_deploy_demo

    shutil.copytree(synth_silos[0].parent, tmp_path / "silos")
    summary = run_deploy_demo(tmp_path, rounds=1, echo=lambda _m: None)
    assert summary["status"] == "completed" and summary["rounds"] == 1
    state = json.loads((tmp_path / "platform" / "platform.json").read_text())
    assert state["processes"] == [] and "stopped" in state
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert leftover == [], f"processes still running for {tmp_path}: {leftover}"
