"""Fast checks of the deployment pieces: certificates and keys, configs, command lines,
node pre-flight checks and process-tree handling (no Flower process is started)."""

from __future__ import annotations

import ipaddress
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from cryptography.x509.verification import DNSName, IPAddress, PolicyBuilder, Store, VerificationError

from fedretain import procs, tls
from fedretain.cli import main
from fedretain.clients import preflight, supervisor
from fedretain.clients.node_settings import NodeSettings, NodeSetupError, write_node_config
from fedretain.compat import flower
from fedretain.server import deploy, platform_config

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


# -- certificates -----------------------------------------------------------------------------------
def _verify(ca: Path, cert: Path, name) -> int:
    store = Store([x509.load_pem_x509_certificate(ca.read_bytes())])
    verifier = PolicyBuilder().store(store).build_server_verifier(name)
    return len(verifier.verify(x509.load_pem_x509_certificate(cert.read_bytes()), []))


def test_certs_chain_verifies_for_loopback_and_extra_hosts(tmp_path):
    paths = tls.init_certs(tmp_path, ["platform.example.com", "10.1.2.3"])
    for name in (DNSName("localhost"), IPAddress(ipaddress.ip_address("127.0.0.1")),
                 DNSName("platform.example.com"), IPAddress(ipaddress.ip_address("10.1.2.3"))):
        assert _verify(paths.ca_cert, paths.server_cert, name) == 2  # leaf + CA
    with pytest.raises(VerificationError):
        _verify(paths.ca_cert, paths.server_cert, DNSName("evil.example.com"))
    for key in (paths.ca_key, paths.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert tls.check_server_tls(paths.ca_cert, paths.server_cert, paths.server_key, "10.1.2.3")


def test_certs_refuse_overwrite_and_bad_hosts(tmp_path):
    tls.init_certs(tmp_path / "a")
    before = (tmp_path / "a" / "ca.key").read_bytes()
    with pytest.raises(tls.TLSError, match="refusing to overwrite"):
        tls.init_certs(tmp_path / "a")
    assert (tmp_path / "a" / "ca.key").read_bytes() == before
    with pytest.raises(tls.TLSError, match="not a host name"):
        tls.init_certs(tmp_path / "b", ["bad host/x"])
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())


def test_check_server_tls_catches_mismatches(tmp_path):
    a, b = tls.init_certs(tmp_path / "a"), tls.init_certs(tmp_path / "b")
    with pytest.raises(tls.TLSError, match="not issued by CA|bad signature"):
        tls.check_server_tls(b.ca_cert, a.server_cert, a.server_key)
    with pytest.raises(tls.TLSError, match="does not belong to certificate"):
        tls.check_server_tls(a.ca_cert, a.server_cert, b.server_key)
    with pytest.raises(tls.TLSError, match="not valid for 192.0.2.7"):
        tls.check_server_tls(a.ca_cert, a.server_cert, a.server_key, "192.0.2.7")
    os.chmod(a.server_key, 0o644)
    with pytest.raises(tls.TLSError, match="chmod 600"):
        tls.check_server_tls(a.ca_cert, a.server_cert, a.server_key)


def test_node_key_is_what_flower_loads(tmp_path):
    keys = tls.create_node_key(tmp_path / "node0", "merchant-a")
    assert stat.S_IMODE(keys.private_key.stat().st_mode) == 0o600
    priv = load_ssh_private_key(keys.private_key.read_bytes(), password=None)  # flower-supernode's loader
    pub_line = keys.public_key.read_text()
    assert pub_line.startswith("ecdsa-sha2-nistp384 ") and pub_line.rstrip().endswith(" merchant-a")
    pub = load_ssh_public_key(pub_line.encode())
    assert priv.public_key().public_numbers() == pub.public_numbers()
    assert priv.curve.name == "secp384r1"
    assert flower.flwr_register_accepts(keys.public_key)  # `flwr supernode register`'s own loader
    assert tls.public_key_fingerprint(priv) == tls.public_key_fingerprint(pub) == keys.fingerprint
    with pytest.raises(tls.TLSError, match="already exists"):
        tls.create_node_key(tmp_path / "node0")


def test_node_key_loaders_reject_wrong_keys(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    ed = tmp_path / "ed"
    ed.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    os.chmod(ed, 0o600)
    with pytest.raises(tls.TLSError, match="needs an ECDSA key"):
        tls.load_node_private_key(ed)
    pub = tmp_path / "ed.pub"
    pub.write_bytes(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    with pytest.raises(tls.TLSError, match="needs an ECDSA key"):
        tls.load_node_public_key(pub)
    p256 = tmp_path / "p256.pub"  # another NIST curve: accepted, as by Flower
    p256.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    assert tls.load_node_public_key(p256).curve.name == "secp256r1"
    loose = tls.create_node_key(tmp_path / "loose").private_key
    os.chmod(loose, 0o644)
    with pytest.raises(tls.TLSError, match="chmod 600"):
        tls.load_node_private_key(loose)


def test_certs_cli(tmp_path):
    r = CliRunner().invoke(main, ["certs", "init", "--out", str(tmp_path / "c"), "--host", "10.0.0.9"])
    assert r.exit_code == 0, r.output
    assert "ca.crt" in r.output and "-----BEGIN" not in r.output
    assert "10.0.0.9" in tls.san_names(x509.load_pem_x509_certificate((tmp_path / "c" / "server.pem").read_bytes()))
    r = CliRunner().invoke(main, ["certs", "init", "--out", str(tmp_path / "c")])
    assert r.exit_code == 2 and "refusing to overwrite" in r.output
    r = CliRunner().invoke(main, ["certs", "node-key", "--out", str(tmp_path / "k" / "m0")])
    assert r.exit_code == 0 and "SHA256:" in r.output and "PRIVATE KEY" not in r.output
    assert (tmp_path / "k" / "m0.pub").is_file()


# -- server config ----------------------------------------------------------------------------------
def _write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "server.toml"
    path.write_text(text)
    return path


def test_config_resolves_paths_against_its_folder(tmp_path):
    cfg = deploy.PlatformConfig.load(_write_config(tmp_path, """
[server]
port = 9555
[tls]
ca-cert = "certs/ca.crt"
server-cert = "/abs/server.pem"
server-key = "certs/server.key"
[auth]
node-keys = "keys"
[run]
num-server-rounds = 4
out-dir = "runs/a"
"""))
    assert cfg.port == 9555 and cfg.host == "127.0.0.1" and cfg.auth is True and cfg.database == "memory"
    assert cfg.ca_cert == tmp_path / "certs" / "ca.crt" and cfg.server_cert == Path("/abs/server.pem")
    assert cfg.state_dir == tmp_path / "platform-state" and cfg.node_keys == tmp_path / "keys"
    assert cfg.run == {"num-server-rounds": 4, "out-dir": str(tmp_path / "runs" / "a")}
    assert cfg.cli_address == "127.0.0.1:9555"
    wildcard = deploy.PlatformConfig.from_dict({"server": {"host": "0.0.0.0"}}, tmp_path)
    assert wildcard.cli_address == f"127.0.0.1:{deploy.DEFAULT_PORT}"


@pytest.mark.parametrize("text, message", [
    ("[server]\nhots = 1\n", "unknown key(s) in [server]: hots"),
    ("[servr]\n", "unknown section(s) servr"),
    ("[server]\ninsecure = true\n", "pass --insecure explicitly"),
    ("[server]\nport = 70000\n", "port must be an integer in 1..65535"),
    ("[auth]\nenabled = \"yes\"\n", "enabled must be true or false"),
    ("[server\n", "server.toml"),
])
def test_config_errors_name_the_problem(tmp_path, text, message):
    with pytest.raises(deploy.PlatformError, match=message.replace("[", r"\[").replace("(", r"\(").replace(
            ")", r"\)").replace(".", r"\.")):
        deploy.PlatformConfig.load(_write_config(tmp_path, text))


def test_run_config_is_checked_against_the_app_and_run_settings(tmp_path):
    project = platform_config.project_dir()
    keys = platform_config.app_config_defaults(project)
    assert "num-server-rounds" in keys and "out-dir" in keys

    def build(run):
        return platform_config.build_run_config(deploy.PlatformConfig.from_dict({"run": run}, tmp_path), project)

    assert build({"num-server-rounds": 2})["num-server-rounds"] == 2
    with pytest.raises(deploy.PlatformError, match="not run-config keys of the fedretain app"):
        build({"num-server-roundz": 2})
    with pytest.raises(deploy.PlatformError, match="unknown strategy"):
        build({"strategy": "fedsgd"})
    with pytest.raises(deploy.PlatformError, match="wrong type"):
        build({"strategy": 3})


def test_project_dir_is_the_source_root():
    import fedretain

    root = platform_config.project_dir()
    assert (root / "pyproject.toml").is_file() and Path(fedretain.__file__).resolve().is_relative_to(root)
    with pytest.raises(deploy.PlatformError, match="cannot find the fedretain source root"):
        platform_config.project_dir(Path("/nonexistent"))


def _platform(tmp_path: Path, *, auth: bool = True, insecure: bool = False) -> deploy.Platform:
    paths = tls.init_certs(tmp_path / "certs")
    (tmp_path / "keys").mkdir()
    tls.create_node_key(tmp_path / "m0")
    (tmp_path / "keys" / "m0.pub").write_bytes((tmp_path / "m0.pub").read_bytes())
    cfg = deploy.PlatformConfig.from_dict({
        "server": {"port": 9777, "database": "link.db"},
        "tls": {"ca-cert": str(paths.ca_cert), "server-cert": str(paths.server_cert),
                "server-key": str(paths.server_key)},
        "auth": {"enabled": auth, "node-keys": "keys"},
    }, tmp_path)
    return deploy.Platform(cfg, insecure=insecure)


def test_superlink_command_tls_auth_and_insecure(tmp_path):
    p = _platform(tmp_path)
    cmd = p.superlink_command()
    assert cmd[1:3] == ["-m", "fedretain.compat.superlink"]  # flower-superlink, with plain log lines
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth",
                 "--disable-runtime-dependency-installation"):
        assert flag in cmd
    assert cmd[cmd.index("--port") + 1] == "9777" and cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--database") + 1] == str(tmp_path / "link.db")
    assert "--insecure" not in cmd
    notes = p.check()
    assert any("1 registered merchant key" in n for n in notes)
    insecure = deploy.Platform(p.config, insecure=True).superlink_command()
    assert "--insecure" in insecure and "--enable-supernode-auth" not in insecure
    assert not any(a.startswith("--ssl") for a in insecure)


def test_connection_file_and_env(tmp_path):
    p = _platform(tmp_path)
    conf = tomllib.loads(p.write_connection().read_text())
    assert conf["superlink"]["default"] == deploy.CONNECTION
    assert conf["superlink"][deploy.CONNECTION] == {"address": "127.0.0.1:9777",
                                                    "root-certificates": str(p.config.ca_cert)}
    env = p.env()
    assert env["FLWR_HOME"] == str(tmp_path / "platform-state" / "flwr-home")
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"


def test_check_refuses_missing_tls_and_bad_keys(tmp_path):
    p = _platform(tmp_path)
    (tmp_path / "keys" / "junk.pub").write_text("not a key\n")
    with pytest.raises(deploy.PlatformError, match="junk.pub is not an OpenSSH public key"):
        p.check()
    bare = deploy.Platform(deploy.PlatformConfig.from_dict({}, tmp_path))
    with pytest.raises(deploy.PlatformError, match="ca-cert, server-cert, server-key not set"):
        bare.check()
    assert deploy.Platform(bare.config, insecure=True).check() == ["node authentication is off: it needs TLS"]


def test_server_start_fails_before_starting_anything(tmp_path):
    cfg = _write_config(tmp_path, "[run]\nnum-server-rounds = 2\n")  # no [tls]
    r = CliRunner().invoke(main, ["server", "start", "--config", str(cfg)])
    assert r.exit_code == 2 and "ca-cert, server-cert, server-key not set" in r.output
    assert not (tmp_path / "platform-state" / "platform.json").exists()
    r = CliRunner().invoke(main, ["server", "status", "--config", str(cfg)])
    assert r.exit_code == 0 and "no platform was started here" in r.output


def test_format_round_and_progress(tmp_path):
    import json

    entry = {"round": 2, "train": {"train_loss": 0.5}, "evaluate": {"auc": 0.75},
             "nodes": [{"merchant_id": "a", "phase": "train", "error": None},
                       {"merchant_id": "b", "phase": "train", "error": "timeout"}]}
    line = deploy.format_round(entry, 3)
    assert line == "round 2/3: 1 merchant(s) (a); no answer from b; train_loss 0.5000, eval_auc 0.7500"
    (tmp_path / "run.json").write_text(json.dumps({"status": "running", "config": {"rounds": 3},
                                                   "rounds": [{**entry, "status": "completed"}],
                                                   "merchants": {"a": {"rounds": [2]}}, "events": []}))
    prog = deploy.run_progress(tmp_path)
    assert prog["last_round"] == 2 and prog["rounds_total"] == 3 and prog["merchants"] == {"a": [2]}
    assert deploy.run_progress(tmp_path / "missing") == {}


# -- process trees ----------------------------------------------------------------------------------
def test_stop_tree_stops_children_in_other_sessions():
    # a parent that starts a child in its own session (as the SuperLink starts flower-superexec)
    code = ("import subprocess,sys,time; subprocess.Popen([sys.executable,'-c','import time; time.sleep(60)'],"
            "start_new_session=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not procs.descendants(parent.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        kids = procs.descendants(parent.pid)
        assert len(kids) == 1
        ref = procs.ProcRef.of("parent", parent.pid)
        assert ref.alive()
        assert procs.stop_tree(ref, grace=2)
        parent.wait(5)
        assert not ref.alive()
        assert not procs.running(kids[0])
        assert procs.stop_tree(ref) is False  # already gone
    finally:
        if parent.poll() is None:
            parent.kill()


def test_procref_ignores_a_reused_pid():
    ref = procs.ProcRef("x", os.getpid(), start=(procs.proc_start_time(os.getpid()) or 0) + 1)
    assert not ref.alive()  # same pid, other start time: not ours, never signalled
    assert procs.stop_tree(ref) is False


# -- merchant node ----------------------------------------------------------------------------------
def test_node_settings_validation(tmp_path):
    with pytest.raises(NodeSetupError, match="HOST:PORT"):
        NodeSettings(server="localhost", data=tmp_path)
    with pytest.raises(NodeSetupError, match="node authentication needs TLS"):
        NodeSettings(server="h:1", data=tmp_path, insecure=True, auth_key=tmp_path / "k")
    with pytest.raises(NodeSetupError, match="executor must be"):
        NodeSettings(server="h:1", data=tmp_path, executor="fork")
    with pytest.raises(NodeSetupError, match="poll interval"):
        NodeSettings(server="h:1", data=tmp_path, poll_interval=10)
    with pytest.raises(NodeSetupError, match="heartbeat interval must be in"):
        NodeSettings(server="h:1", data=tmp_path, heartbeat_interval=5)


def test_node_config_file_and_command_line(tmp_path):
    s = NodeSettings(server="platform:9443", data=tmp_path / "silo", auth_key=tmp_path / "k",
                        root_cert=tmp_path / "ca.crt", state_dir=tmp_path / "st", consent_db=tmp_path / "c.db")
    node_toml = write_node_config(s)
    cfg = tomllib.loads(node_toml.read_text())
    assert cfg == {"data-path": str(tmp_path / "silo"), "consent-db": str(tmp_path / "c.db"),
                   "state-dir": str(tmp_path / "st")}
    from fedretain.clients.node import NodeConfig

    nc = NodeConfig.from_flower(cfg, {})
    assert nc.data_path == tmp_path / "silo" and nc.consent_db == tmp_path / "c.db"
    cmd = supervisor.supernode_command(s, node_toml, 19001, parent_pid=42)
    assert cmd[:3] == [sys.executable, "-m", "fedretain.clients.supernode"]
    assert cmd[cmd.index("--poll-interval") + 1] == "0.2" and cmd[cmd.index("--parent-pid") + 1] == "42"
    assert "--heartbeat-interval" not in cmd  # Flower's default unless asked
    fast = supervisor.supernode_command(NodeSettings(server="h:1", data=tmp_path, heartbeat_interval=10), node_toml, 1)
    hb = fast.index("--heartbeat-interval")
    assert fast[hb + 1] == "10" and hb < fast.index("--")
    flwr_args = cmd[cmd.index("--") + 1:]
    assert flwr_args[flwr_args.index("--superlink") + 1] == "platform:9443"
    assert flwr_args[flwr_args.index("--root-certificates") + 1] == str(tmp_path / "ca.crt")
    assert flwr_args[flwr_args.index("--auth-supernode-private-key") + 1] == str(tmp_path / "k")
    assert flwr_args[flwr_args.index("--isolation") + 1] == "process"
    assert flwr_args[flwr_args.index("--port") + 1] == "19001" and "--insecure" not in flwr_args
    stock = supervisor.supernode_command(NodeSettings(server="h:1", data=tmp_path, insecure=True, executor="subprocess",
                                                 poll_interval=None), node_toml, 19002)
    assert Path(stock[0]).name == "flower-supernode"
    assert "--insecure" in stock and stock[stock.index("--isolation") + 1] == "subprocess"


def test_preflight_refuses_missing_or_broken_inputs(tmp_path, synth_silos):
    import shutil

    silo = tmp_path / "silo"
    shutil.copytree(synth_silos[0], silo)
    ok = preflight.preflight(NodeSettings(server="h:1", data=silo))
    assert ok.merchant_id == synth_silos[0].name and ok.ledger_size > 0 and ok.n_events > 0
    with pytest.raises(NodeSetupError, match="silo folder .* does not exist"):
        preflight.preflight(NodeSettings(server="h:1", data=tmp_path / "nope"))
    with pytest.raises(NodeSetupError, match="consent ledger: .* does not exist"):
        preflight.preflight(NodeSettings(server="h:1", data=silo, consent_db=tmp_path / "none.db"))
    with pytest.raises(NodeSetupError, match="node key: node key .*badkey is not an unencrypted OpenSSH"):
        bad = tmp_path / "badkey"
        bad.write_text("nope")
        os.chmod(bad, 0o600)
        preflight.preflight(NodeSettings(server="h:1", data=silo, auth_key=bad))
    broken = tmp_path / "broken"
    shutil.copytree(silo, broken)
    (broken / "events.csv").write_text("not,the,right,columns\n1,2,3,4\n")
    with pytest.raises(NodeSetupError, match="data: .*events"):
        preflight.preflight(NodeSettings(server="h:1", data=broken))


def test_preflight_refuses_a_tampered_ledger(tmp_path, synth_silos):
    import shutil
    import sqlite3

    silo = tmp_path / "silo"
    shutil.copytree(synth_silos[0], silo)
    db = silo / ".node" / "consent.db"
    con = sqlite3.connect(db)
    for t in [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='trigger'")]:
        con.execute(f"DROP TRIGGER {t}")  # an attacker with file access removes the append-only guard
    con.execute("UPDATE records SET purpose = 'advertising' WHERE seq = 3")
    con.commit()
    con.close()
    with pytest.raises(NodeSetupError, match="consent ledger: .* failed verification at record 3: .*purpose"):
        preflight.preflight(NodeSettings(server="h:1", data=silo))


def test_client_start_reports_setup_errors(tmp_path):
    r = CliRunner().invoke(main, ["client", "start", "--server", "127.0.0.1:9", "--data", str(tmp_path / "x")])
    assert r.exit_code == 2 and "silo folder" in r.output and "does not exist" in r.output


def test_explain_failure_maps_flower_errors():
    assert "not registered" in supervisor.explain_failure(["x", "[code: 2004] Failed to activate SuperNode."])
    assert "--key" in supervisor.explain_failure(["[code: 2001] SuperNode authentication is enabled."])
    assert supervisor.is_refusal(["[code: 2004] Failed to activate SuperNode."])
    assert not supervisor.is_refusal(["INFO: SuperNode terminated gracefully."])
    assert supervisor.explain_failure(["a", "ERROR boom", "b"]) == "ERROR boom"


def test_probe_server_reports_unreachable_platform(tmp_path):
    port = procs.free_port()
    note = preflight.probe_server(NodeSettings(server=f"127.0.0.1:{port}", data=tmp_path))
    assert "not reachable yet" in note


def test_capped_sleep_only_shortens_flowers_waits():
    capped = flower.CappedSleep(0.05)
    t = time.perf_counter()
    capped.sleep(3)  # the SuperNode's idle wait
    capped.sleep(0.5)  # its wait on its own in-memory state
    assert time.perf_counter() - t < 0.5
    assert capped.monotonic is time.monotonic  # everything else is the real time module
    try:
        flower.cap_supernode_poll(0.2)
        sleeper, pull = flower.supernode_poll_waits()
        assert isinstance(sleeper, flower.CappedSleep) and pull.keywords["initial_backoff"] == 0.1
    finally:
        flower.restore_supernode_poll()
    assert flower.supernode_poll_waits()[0] is time


def test_heartbeat_interval_reaches_what_the_node_declares_and_how_often_it_beats():
    beats: list[float] = []
    try:
        flower.set_heartbeat_interval(10)
        assert flower.heartbeat_intervals() == (10.0, 10.0)  # declared at activation and in every heartbeat
        # Flower's own heartbeat sender now beats every (10 - 5 s call timeout) x 0.7..0.9 = 3.5..4.5 s
        # (at Flower's 30 s: 17.5..22.5 s)
        sender = flower.heartbeat_sender(lambda: beats.append(time.monotonic()) is None)
        sender.start()
        deadline = time.monotonic() + 8
        while len(beats) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        sender.stop()
    finally:
        flower.set_heartbeat_interval(flower.HEARTBEAT_DEFAULT_S)
    assert len(beats) >= 2, "the second heartbeat did not come within 8 s"
    assert 3.0 <= beats[1] - beats[0] <= 5.0
    assert flower.heartbeat_intervals() == (30.0, 30.0)
    # a crashed node waits for the platform to release it: 2 missed intervals plus a margin
    assert supervisor._Session(Path("/nonexistent/s.json"), "h:1", "k", 10).linger_s == 35
    assert supervisor._Session(Path("/nonexistent/s.json"), "h:1", "k").linger_s == 75


def test_supernode_status_comes_from_flowers_records_not_its_log_text(tmp_path):
    status = flower.SupernodeStatus(tmp_path / "status.json")
    log = flower_logger()
    log.addHandler(status)
    level = log.level
    log.setLevel("INFO")  # as the launcher makes sure; another test may have left Flower's logger quieter
    try:
        log.info("SuperNode ID: %s", 1234567)
        log.error("Exit Code: 305\nConnection to the SuperLink failed")
    finally:
        log.removeHandler(status)
        log.setLevel(level)
    assert flower.read_supernode_status(tmp_path / "status.json") == {"node_id": "1234567", "exit_code": 305}


def flower_logger():
    import logging

    return logging.getLogger("flwr")


def test_free_ports_avoid_the_ephemeral_range():
    lo, _ = procs._ephemeral_range()
    ports = {procs.free_port() for _ in range(5)}
    assert all(p < lo for p in ports)  # no self-connect theft while a server restarts


def test_can_bind_and_port_owner():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", procs.free_port()))
        s.listen()
        port = s.getsockname()[1]
        assert not procs.can_bind("127.0.0.1", port)
        assert f"by pid {os.getpid()}" in procs.port_owner(port)
    assert procs.can_bind("127.0.0.1", port)
