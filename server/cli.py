"""``fedretain server start|run|status|stop|register-key`` and ``fedretain certs init|node-key|fingerprint``.

The platform operator's commands. ``server start`` runs in the background by default
(the SuperLink keeps running after the command returns; ``server stop`` ends it) or,
with ``--foreground``, follows the run round by round and stops everything when the run
ends or on Ctrl-C. Exit status of ``server start --foreground``: 0 when the run
completed, 1 when it failed, 2 when the platform could not start.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

EXIT_OK, EXIT_RUN_FAILED, EXIT_SETUP = 0, 1, 2


def _platform(config: Path, insecure: bool = False):
    from fedretain.server.deploy import Platform, PlatformConfig

    return Platform(PlatformConfig.load(config), insecure=insecure)


def _fail(exc: Exception, code: int = EXIT_SETUP) -> None:
    click.echo(f"error: {exc}", err=True)
    click.get_current_context().exit(code)


@click.group()
def server() -> None:
    """Run the platform's aggregation server (Flower SuperLink + the fedretain ServerApp)."""


@server.command("start")
@click.option("--config", "config", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="Server config (TOML): [server] host/port/state-dir, [tls], [auth], [run].")
@click.option("--foreground", is_flag=True, help="Follow the run and stop everything when it ends.")
@click.option("--resume", is_flag=True,
              help="Resume the last run from its newest checkpoint (same out-dir and run id).")
@click.option("--run-id", default=None, help="Run id (default: [run] run-id, the last run when resuming, or new).")
@click.option("--insecure", is_flag=True, help="Plain HTTP, no node authentication (local experiments only).")
@click.option("--timeout", type=float, default=None, help="With --foreground: give up after this many seconds.")
@click.option("--no-run", "no_run", is_flag=True,
              help="Start the platform only; submit a run later with `fedretain server run` (merchants can connect "
                   "first: a submitted run waits only [run] node-wait-timeout seconds for them).")
def start(config: Path, foreground: bool, resume: bool, run_id: str | None, insecure: bool,
          timeout: float | None, no_run: bool) -> None:
    """Start the SuperLink, register merchant keys and submit the training run (unless --no-run).

    The run waits [run] node-wait-timeout seconds for min-nodes merchants, then fails: start
    with --no-run and submit with `fedretain server run` once the merchants are online.
    """
    from fedretain.server.deploy import PlatformError

    if insecure:
        click.echo("WARNING: --insecure: nothing is encrypted and any node may join.", err=True)
    try:
        platform = _platform(config, insecure)
        platform.start(resume=resume, run_id=run_id, echo=click.echo, submit=not no_run)
    except PlatformError as exc:
        _fail(exc)
        return
    if no_run:
        if foreground:
            click.echo("--foreground is ignored with --no-run: nothing to follow yet", err=True)
        click.echo(f"platform running without a run; `fedretain server status --config {config}` shows who is "
                   f"online, `fedretain server run --config {config}` submits the run")
        return
    _follow(platform, config, foreground, timeout)


def _follow(platform, config: Path, foreground: bool, timeout: float | None) -> None:
    from fedretain.procs import stop_signal_handlers

    if not foreground:
        click.echo(f"running in the background; `fedretain server status --config {config}` to follow, "
                   f"`fedretain server stop --config {config}` to stop")
        return
    stop_signal_handlers(lambda: platform.stop(echo=click.echo))
    try:
        status = platform.wait(timeout=timeout, echo=click.echo)
    finally:
        platform.stop(echo=click.echo)
    click.echo(f"run {status}")
    click.get_current_context().exit(EXIT_OK if status == "completed" else EXIT_RUN_FAILED)


@server.command("run")
@click.option("--config", "config", required=True, type=click.Path(path_type=Path, dir_okay=False))
@click.option("--resume", is_flag=True, help="Resume the last run from its newest checkpoint.")
@click.option("--run-id", default=None, help="Run id (default: [run] run-id, the last run when resuming, or new).")
@click.option("--foreground", is_flag=True, help="Follow the run until it ends (the platform keeps running).")
@click.option("--timeout", type=float, default=None, help="With --foreground: give up after this many seconds.")
def run(config: Path, resume: bool, run_id: str | None, foreground: bool, timeout: float | None) -> None:
    """Submit a training run to a platform that is already running (`server start --no-run`)."""
    from fedretain.server.deploy import PlatformError

    try:
        platform = _platform(config, _started_insecure(config))
        platform.submit_run(resume=resume, run_id=run_id, echo=click.echo)
    except PlatformError as exc:
        _fail(exc)
        return
    if not foreground:
        click.echo(f"`fedretain server status --config {config}` to follow")
        return
    status = platform.wait(timeout=timeout, echo=click.echo)
    click.echo(f"run {status}")
    click.get_current_context().exit(EXIT_OK if status == "completed" else EXIT_RUN_FAILED)


def _started_insecure(config: Path) -> bool:
    """Was the running platform started with --insecure (its connection must match)?"""
    from fedretain.server.deploy import Platform, PlatformConfig

    return bool((Platform(PlatformConfig.load(config)).read_state() or {}).get("insecure"))


@server.command("status")
@click.option("--config", "config", required=True, type=click.Path(path_type=Path, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(config: Path, as_json: bool) -> None:
    """Show the SuperLink, connected merchant nodes, and the current run's rounds and metrics."""
    from fedretain.server.deploy import PlatformError, format_round

    try:
        info = _platform(config).status(progress=lambda m: click.echo(m, err=True))
    except PlatformError as exc:
        _fail(exc)
        return
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    if "message" in info:
        click.echo(info["message"])
        return
    click.echo(f"platform {'RUNNING' if info['running'] else 'STOPPED'} at {info['address']} "
               f"({'insecure' if info['insecure'] else 'TLS'}, node auth {'on' if info['auth'] else 'off'})")
    for p in info["processes"]:
        click.echo(f"  {p['name']}: pid {p['pid']} {'alive' if p['alive'] else 'gone'}")
    if info.get("nodes") is not None:
        online = [n for n in info["nodes"] if str(n.get("status", "")).lower() == "online"]
        click.echo(f"nodes: {len(online)} online of {len(info['nodes'])} registered")
        for n in info["nodes"]:
            click.echo(f"  {n.get('node-id')}  {n.get('status')}  {n.get('merchant')}")
    elif info.get("nodes_error"):
        click.echo(f"nodes: unknown ({info['nodes_error']})")
    run = info.get("run")
    if run:
        fr = info.get("flower_run") or {}
        click.echo(f"run {run['run_id']} (Flower run {run['flower_run_id']}, {fr.get('status', 'status unknown')}): "
                   f"record {run.get('status') or 'not written yet'}, "
                   f"{run.get('last_round', 0)}/{run.get('rounds_total') or '?'} rounds done")
        for r in run.get("rounds_done", []):
            click.echo("  " + format_round(r, run.get("rounds_total")))
        if run.get("error"):
            click.echo(f"  error: {run['error']}")


@server.command("stop")
@click.option("--config", "config", required=True, type=click.Path(path_type=Path, dir_okay=False))
@click.option("--grace", type=float, default=10.0, show_default=True,
              help="Seconds between SIGTERM and SIGKILL.")
def stop(config: Path, grace: float) -> None:
    """Stop the SuperLink, the run and the log streamer started by `server start`."""
    from fedretain.server.deploy import PlatformError

    try:
        _platform(config).stop(grace=grace, echo=click.echo)
    except PlatformError as exc:
        _fail(exc)


@server.command("register-key")
@click.option("--config", "config", required=True, type=click.Path(path_type=Path, dir_okay=False))
@click.argument("public_key", type=click.Path(path_type=Path, dir_okay=False, exists=True, resolve_path=True))
def register_key(config: Path, public_key: Path) -> None:
    """Register one more merchant's platform node-auth key (the ECDSA `.pub` from `certs node-key`).

    Not the consent-ledger key (SILO/.node/node_key.pem.pub). Check the fingerprint the
    merchant read to you first: `fedretain certs fingerprint FILE.pub`.
    """
    from fedretain import tls
    from fedretain.server.deploy import PlatformError

    try:
        tls.fingerprint_file(public_key)  # the wrong key (e.g. the consent-ledger key) is named before anything
    except tls.TLSError as exc:
        _fail(exc)
        return
    try:
        platform = _platform(config, _started_insecure(config))
        if platform.running() is None:
            raise PlatformError("the platform is not running; add the key to the node-keys folder instead")
        click.echo(platform.register_key(public_key))
    except PlatformError as exc:
        _fail(exc)


@click.group()
def certs() -> None:
    """Create development TLS certificates and node authentication keys."""


@certs.command("init")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path, file_okay=False))
@click.option("--host", "hosts", multiple=True,
              help="Extra DNS name or IP the merchants dial (repeatable); 127.0.0.1 and localhost are always in.")
@click.option("--days", type=int, default=365, show_default=True)
def certs_init(out: Path, hosts: tuple[str, ...], days: int) -> None:
    """Create a development CA (ca.crt, ca.key) and a server certificate (server.pem, server.key)."""
    from fedretain import tls

    try:
        paths = tls.init_certs(out, hosts, days=days)
    except tls.TLSError as exc:
        _fail(exc)
        return
    click.echo(f"CA certificate:     {paths.ca_cert}   (give this to every merchant: --root-cert)")
    click.echo(f"CA key:             {paths.ca_key}   (keep offline; mode 0600)")
    click.echo(f"server certificate: {paths.server_cert}")
    click.echo(f"server key:         {paths.server_key}   (mode 0600)")
    click.echo("This is a development CA; for production point [tls] at certificates from your own CA.")


@certs.command("node-key")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="Private key file; the public key goes to OUT.pub.")
@click.option("--comment", default="fedretain-platform-node-auth", show_default=True,
              help="Key comment; the platform shows it as the merchant's name (e.g. shop_a-platform-node-auth).")
def certs_node_key(out: Path, comment: str) -> None:
    """Create a merchant node's PLATFORM node-auth key pair (ECDSA P-384, OpenSSH format).

    Not the consent-ledger signing key (Ed25519, SILO/.node/node_key.pem, made by
    `fedretain consent init`): this one authenticates the node to the platform.
    """
    from fedretain import tls

    try:
        paths = tls.create_node_key(out, comment)
    except tls.TLSError as exc:
        _fail(exc)
        return
    click.echo(f"private key: {paths.private_key}   (stays on the merchant's machine; mode 0600)")
    click.echo(f"public key:  {paths.public_key}   (send to the platform: its node-keys folder)")
    click.echo(f"fingerprint: {paths.fingerprint}   (read it to the platform operator; same as `ssh-keygen -lf`)")


@certs.command("fingerprint")
@click.argument("public_key", type=click.Path(path_type=Path, dir_okay=False))
def certs_fingerprint(public_key: Path) -> None:
    """Show a platform node-auth `.pub` file's fingerprint (as `ssh-keygen -lf` prints it) before registering it."""
    from fedretain import tls

    try:
        fp = tls.fingerprint_file(public_key)
    except tls.TLSError as exc:
        _fail(exc)
        return
    click.echo(f"{fp}  {public_key}")
