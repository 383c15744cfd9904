"""``fedretain client start``: run a merchant's node (Flower SuperNode + the fedretain ClientApp).

Runs in the foreground (use a service manager to keep it up); Ctrl-C or SIGTERM stops
the SuperNode too. Exit status (docs/DEPLOYMENT.md says the same): 0 after a requested
stop; 2 when a check on this machine failed before connecting (data, consent ledger, key,
or the platform's certificate does not verify against --root-cert); 3 when the platform
refused this node, with a one-line reason (its key is not registered, or --insecure
against a TLS platform / TLS against a plain-HTTP one).
"""

from __future__ import annotations

from pathlib import Path

import click

EXIT_SETUP = 2
EXIT_REFUSED = 3  # = fedretain.clients.supervisor.EXIT_SUPERNODE_FAILED


@click.group()
def client() -> None:
    """Run a merchant node that joins the platform's federated runs."""


@client.command("start")
@click.option("--server", "server", required=True, metavar="HOST:PORT", help="The platform's SuperLink address.")
@click.option("--data", "data", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="The merchant's silo folder.")
@click.option("--consent-db", type=click.Path(path_type=Path, dir_okay=False),
              help="Consent ledger (default: SILO/.node/consent.db).")
@click.option("--key", "key", type=click.Path(path_type=Path, dir_okay=False),
              help="The platform node-auth private key (ECDSA, `fedretain certs node-key`); not the "
                   "consent-ledger signing key.")
@click.option("--root-cert", type=click.Path(path_type=Path, dir_okay=False),
              help="CA certificate that signed the platform's TLS certificate (default: system CAs).")
@click.option("--insecure", is_flag=True, help="Plain HTTP without node authentication (local experiments only).")
@click.option("--signing-key", type=click.Path(path_type=Path, dir_okay=False),
              help="The node's consent-ledger signing key (Ed25519; default: SILO/.node/node_key.pem); "
                   "not the platform node-auth key.")
@click.option("--state-dir", type=click.Path(path_type=Path, file_okay=False),
              help="Node state and logs (default: SILO/.node).")
@click.option("--runtime-port", type=int, default=0, help="Local Runtime API port (default: a free one).")
@click.option("--executor", type=click.Choice(["warm", "subprocess"]), default="warm", show_default=True,
              help="warm: one long-lived ClientApp process; subprocess: Flower's one process per message.")
@click.option("--poll-interval", type=float, default=0.2, show_default=True,
              help="SuperNode idle poll in seconds; 0 keeps Flower's 3 s.")
@click.option("--heartbeat-interval", type=click.FloatRange(10, 1800), default=None,
              help="Seconds between this node's heartbeats (default: Flower's 30). The platform drops a node "
                   "after 2 missed heartbeats, so a shorter interval lets a round stop waiting for a dead node sooner.")
@click.option("--max-wait", type=float, default=None,
              help="Give up if the platform cannot be reached for this many seconds (default: keep trying).")
def start(server: str, data: Path, consent_db: Path | None, key: Path | None, root_cert: Path | None,
          insecure: bool, signing_key: Path | None, state_dir: Path | None, runtime_port: int, executor: str,
          poll_interval: float, heartbeat_interval: float | None, max_wait: float | None) -> None:
    """Check the silo and consent ledger, then start the SuperNode and serve the platform's runs."""
    from fedretain.clients.node_settings import NodeSettings, NodeSetupError, PlatformRefused
    from fedretain.clients.supervisor import run_node
    from fedretain.compat import CompatError

    if insecure:
        click.echo("WARNING: --insecure: traffic is not encrypted and this node is not authenticated.", err=True)
    try:
        settings = NodeSettings(
            server=server, data=data, consent_db=consent_db, auth_key=key, root_cert=root_cert, insecure=insecure,
            state_dir=state_dir, signing_key=signing_key, runtime_port=runtime_port, executor=executor,
            poll_interval=poll_interval or None, heartbeat_interval=heartbeat_interval, max_wait_time=max_wait,
        )
        code = run_node(settings, echo=lambda m: click.echo(m, err=True))
    except (NodeSetupError, CompatError) as exc:
        click.echo(f"error: {exc}", err=True)
        click.get_current_context().exit(EXIT_REFUSED if isinstance(exc, PlatformRefused) else EXIT_SETUP)
        return
    click.get_current_context().exit(code)
