"""The platform operator's and the merchant's journeys without silent failures (issue 13), fast.

Each test follows a step an operator or a merchant takes from docs/DEPLOYMENT.md and checks
that what they are shown is right: fingerprints that match ``ssh-keygen -lf``, the wrong
one of a merchant's two keys refused by name, relative paths meant from the caller's
folder, node ids named by merchant, run logs without colour codes, round progress on the
node's console, and the exit status of a node that dials TLS in plain text.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedretain import tls
from fedretain.cli import main
from fedretain.clients import preflight
from fedretain.clients.node_settings import NodeSettings, PlatformRefused
from fedretain.clients.round_progress import format_progress
from fedretain.server import deploy
from fedretain.server.run_progress import run_progress


# -- fingerprints ---------------------------------------------------------------------------------
def test_fingerprint_is_the_ssh_keygen_form(tmp_path):
    keys = tls.create_node_key(tmp_path / "shop_a_platform_key", "shop_a-platform-node-auth")
    blob = base64.b64decode(keys.public_key.read_text().split()[1])
    expected = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    assert keys.fingerprint == expected and "=" not in keys.fingerprint
    if shutil.which("ssh-keygen"):
        out = subprocess.run(["ssh-keygen", "-lf", str(keys.public_key)], capture_output=True, text=True,
                             check=True).stdout
        assert out.split()[1] == keys.fingerprint  # "384 SHA256:... comment (ECDSA)"
    r = CliRunner().invoke(main, ["certs", "fingerprint", str(keys.public_key)])
    assert r.exit_code == 0, r.output
    assert r.output.split()[0] == keys.fingerprint
    r = CliRunner().invoke(main, ["certs", "node-key", "--out", str(tmp_path / "other")])
    shown = next(ln for ln in r.output.splitlines() if ln.startswith("fingerprint:")).split()[1]
    assert shown == tls.fingerprint_file(tmp_path / "other.pub")


# -- the merchant's two keys ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def ledger_key_files(tmp_path_factory) -> tuple[Path, Path]:
    """The consent-ledger key pair exactly as `fedretain consent init` writes it (SILO/.node/node_key.pem[.pub])."""
    silo = tmp_path_factory.mktemp("silo")
    r = CliRunner().invoke(main, ["consent", "init", "--silo", str(silo), "--controller", "shop_a"])
    assert r.exit_code == 0, r.output
    return silo / ".node" / "node_key.pem", silo / ".node" / "node_key.pem.pub"


def test_the_ledger_key_is_refused_as_a_platform_key_by_name(ledger_key_files, tmp_path):
    priv, pub = ledger_key_files
    for wrong in (pub, priv):
        with pytest.raises(tls.TLSError) as err:
            tls.load_node_public_key(wrong)
        assert "consent-ledger" in str(err.value) and "certs node-key" in str(err.value)
    with pytest.raises(tls.TLSError, match="PRIVATE key"):
        tls.load_node_public_key(priv)
    r = CliRunner().invoke(main, ["certs", "fingerprint", str(pub)])
    assert r.exit_code == 2 and "Traceback" not in r.output and "consent-ledger signing key" in r.output
    # register-key with the ledger key: one clear line, no traceback, whether or not a platform runs
    cfg = tmp_path / "server.toml"
    cfg.write_text(f'[server]\nstate-dir = "{tmp_path / "state"}"\n[auth]\nenabled = false\n', encoding="utf-8")
    r = CliRunner().invoke(main, ["server", "register-key", "--config", str(cfg), str(pub)])
    assert r.exit_code == 2 and "consent-ledger signing key" in r.output and "Traceback" not in r.output, r.output
    # the folder check at `server start` names the file and the mix-up too
    keys = tmp_path / "node-keys"
    keys.mkdir()
    shutil.copy(pub, keys / "shop_a.pub")
    plat = deploy.Platform(deploy.PlatformConfig.from_dict(
        {"server": {"state-dir": str(tmp_path / "st")}, "auth": {"enabled": True, "node-keys": str(keys)}}, tmp_path))
    with pytest.raises(deploy.PlatformError, match="shop_a.pub .*consent-ledger signing key"):
        plat.node_key_files()


# -- register-key with a relative path --------------------------------------------------------------
def test_register_key_path_is_resolved_from_the_callers_folder(tmp_path, monkeypatch):
    caller = tmp_path / "operator-home"
    caller.mkdir()
    tls.create_node_key(caller / "shop_a", "shop_a-platform-node-auth")
    monkeypatch.chdir(caller)
    args = deploy.register_args(Path("shop_a.pub"))  # DEPLOYMENT.md: `register-key --config ... new_shop.pub`
    key_arg = Path(args[2])
    assert key_arg.is_absolute() and key_arg == caller / "shop_a.pub" and key_arg.is_file()
    # flwr runs in the state folder: the path given there must still name the caller's file
    state = tmp_path / "state"
    state.mkdir()
    monkeypatch.chdir(state)
    assert key_arg.is_file() and not Path("shop_a.pub").exists()
    assert deploy.key_name(key_arg) == "shop_a-platform-node-auth"


# -- server status: which merchant each node is ---------------------------------------------------
def test_status_names_each_node_by_key_and_reported_merchant(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"status": "running", "rounds": [
        {"round": 1, "status": "completed", "nodes": [
            {"phase": "train", "merchant_id": "shop_a", "node_id": 111},
            {"phase": "train", "merchant_id": "shop_b", "node_id": 222}]}]}), encoding="utf-8")
    prog = run_progress(out)
    assert prog["merchant_nodes"] == {"shop_a": {"node_id": "111"}, "shop_b": {"node_id": "222"}}
    keys = {"111": {"name": "shop_a-platform-node-auth", "fingerprint": "SHA256:abc"}}
    a = deploy.node_merchant({"node-id": "111", "owner-name": "none"}, keys, prog["merchant_nodes"])
    assert a == "key shop_a-platform-node-auth (SHA256:abc); merchant shop_a"
    assert deploy.node_merchant({"node-id": "222", "owner-name": "none"}, keys, prog["merchant_nodes"]) \
        == "merchant shop_b"
    unknown = deploy.node_merchant({"node-id": "333", "owner-name": "none"}, keys, prog["merchant_nodes"])
    assert "none" not in unknown and "unknown key" in unknown


# -- run logs ---------------------------------------------------------------------------------------
def test_written_run_log_has_no_ansi_codes(tmp_path):
    flower_out = ("\x1b[92mINFO \x1b[0m:      Starting FedAvg strategy\n"
                  "\x1b[91mERROR \x1b[0m:     only 1 merchant node(s) connected after 300 s\n")
    path = deploy.write_run_log(tmp_path / "run-1.log", flower_out)
    data = path.read_bytes()
    assert b"\x1b" not in data
    assert "INFO :      Starting FedAvg strategy" in data.decode()
    assert "only 1 merchant node(s) connected after 300 s" in data.decode()


# -- merchant console progress ----------------------------------------------------------------------
def test_round_progress_line_shows_round_examples_and_epsilon():
    cfg = {"server-round": 3, "total-rounds": 10, "dp-mode": "local", "target-epsilon": 3.0}
    line = format_progress("train", cfg, {"num-examples": 1812, "epsilon": 1.2345, "delta": 1e-5,
                                          "train_loss": float("nan")}, {"auc": 0.71234})
    assert line == "round 3/10 train, 1,812 examples used, ε spent 1.234 of 3 (δ 1e-05), AUC 0.712"
    plain = format_progress("train", {"server-round": 1, "total-rounds": 2, "dp-mode": "none"},
                            {"num-examples": 40, "train_loss": 0.5})
    assert plain == "round 1/2 train, 40 examples used, ε: no local DP on this node (dp-mode none), loss 0.5000"
    ev = format_progress("evaluate", {"server-round": 2}, {"num-examples": 12, "auc": 0.6})
    assert ev == "round 2 evaluate, 12 examples evaluated, AUC 0.600"


# -- --insecure against a TLS platform: exit 3, as DEPLOYMENT.md says ---------------------------------
@pytest.fixture()
def tls_listener(tmp_path):
    """A TLS-only listener on 127.0.0.1 with a development certificate (stands in for the SuperLink's port)."""
    paths = tls.init_certs(tmp_path / "certs")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(paths.server_cert, paths.server_key)
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except (TimeoutError, OSError):
                continue
            try:
                with ctx.wrap_socket(conn, server_side=True) as tconn:
                    tconn.recv(1)
            except (ssl.SSLError, OSError):
                pass  # a plain-text client: the handshake fails and the connection is closed
            finally:
                conn.close()

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    yield f"127.0.0.1:{srv.getsockname()[1]}", paths
    stop.set()
    th.join(2)
    srv.close()


def test_insecure_node_against_tls_platform_is_a_refusal(tls_listener, tmp_path, synth_silos):
    address, paths = tls_listener
    with pytest.raises(PlatformRefused, match="refused the plain-text connection"):
        preflight.probe_server(NodeSettings(server=address, data=synth_silos[0], insecure=True))
    assert "verified" in preflight.probe_server(NodeSettings(server=address, data=synth_silos[0],
                                                             root_cert=paths.ca_cert))
    silo = tmp_path / "silo"
    shutil.copytree(synth_silos[0], silo)
    r = CliRunner().invoke(main, ["client", "start", "--server", address, "--data", str(silo), "--insecure"])
    assert r.exit_code == 3, r.output
    assert "refused the plain-text connection" in r.output and "Traceback" not in r.output
    doc = (Path(__file__).resolve().parents[1] / "docs" / "DEPLOYMENT.md").read_text(encoding="utf-8")
    assert "exits with status 3" in doc and "--insecure` against a TLS platform" in doc


# -- submitting a run separately from starting the platform -------------------------------------------
def test_server_run_needs_a_running_platform_and_says_how(tmp_path):
    """`server run` submits to a platform started with `server start --no-run`; without one it says so."""
    cfg = tmp_path / "server.toml"
    cfg.write_text(f'[server]\nstate-dir = "{tmp_path / "state"}"\n[auth]\nenabled = false\n'
                   f'[run]\nnum-server-rounds = 2\n', encoding="utf-8")
    r = CliRunner().invoke(main, ["server", "run", "--config", str(cfg)])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "no platform is running" in r.output and "server start --config ... --no-run" in r.output
    r = CliRunner().invoke(main, ["server", "start", "--help"])
    assert "--no-run" in r.output and "node-wait-timeout" in r.output


# -- server status speed: the flwr CLI in this process ------------------------------------------------
def test_flwr_cli_in_process_answers_as_a_process_would_and_prints_nothing(tmp_path, capfd):
    """`server status` asks the SuperLink through the flwr CLI in-process (Flower imported once, not
    once per question); its JSON (which flwr writes "bypassing any redirection") must come back to
    the caller, not leak to the operator's terminal."""
    from fedretain.compat.flower_cli import run_flwr
    from fedretain.procs import flower_env

    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text('[superlink]\ndefault = "fedretain"\n[superlink.fedretain]\n'
                                      'address = "127.0.0.1:9"\ninsecure = true\n', encoding="utf-8")
    res = run_flwr(["supernode", "ls", "fedretain", "--format", "json"], flower_env(home))
    answer = json.loads(res.stdout)
    assert answer["success"] is False and "SuperLink is unavailable" in answer["error-message"]
    assert run_flwr(["--version"], flower_env(home)).stdout.startswith("Flower version: ")
    leaked = capfd.readouterr()
    assert "success" not in leaked.out and "Listing all nodes" not in leaked.out + leaked.err
