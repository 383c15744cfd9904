"""Checks a merchant node makes before it connects: silo, consent ledger, keys, the platform's TLS.

:func:`preflight` fails closed on an unusable silo, a consent ledger that does not
verify, an unreadable node key or CA certificate; :func:`probe_server` turns a platform
that refuses the node's TLS settings into one clear error instead of Flower's endless
"Connection attempt failed".
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from fedretain.clients.node_settings import NodeSettings, NodeSetupError, PlatformRefused, split_address


@dataclass(frozen=True)
class Preflight:
    """What the checks found (logged at start; no secrets)."""

    merchant_id: str
    n_events: int
    n_users: int
    ledger_size: int
    ledger_head: str
    key_fingerprint: str | None


def preflight(settings: NodeSettings) -> Preflight:
    """Fail before connecting if the silo, the ledger, the key or the CA certificate is unusable."""
    from fedretain import tls
    from fedretain.clients.node import NodeConfig
    from fedretain.ingest import IngestError, load_silo

    silo_path = Path(settings.data)
    if not silo_path.is_dir():
        raise NodeSetupError(f"data: silo folder {silo_path} does not exist")
    try:
        silo = load_silo(silo_path)
    except IngestError as exc:
        raise NodeSetupError(f"data: {exc}") from None
    if len(silo.events) == 0:
        raise NodeSetupError(f"data: silo {silo_path} has no accepted events (see `fedretain data check {silo_path}`)")
    cfg = NodeConfig.for_silo(silo_path, settings.consent_db, settings.signing_key, settings.state)
    size, head = _check_ledger(cfg.consent_db, cfg.state_dir)
    fp = None
    if settings.auth_key is not None:
        try:
            fp = tls.public_key_fingerprint(tls.load_node_private_key(settings.auth_key))
        except tls.TLSError as exc:
            raise NodeSetupError(f"node key: {exc}") from None
    if settings.root_cert is not None:
        try:
            tls.check_root_cert(settings.root_cert)
        except tls.TLSError as exc:
            raise NodeSetupError(f"root certificate: {exc}") from None
    return Preflight(
        merchant_id=str(silo.merchant.get("merchant_id", silo_path.name)),
        n_events=int(len(silo.events)), n_users=int(silo.events["user_id"].nunique()),
        ledger_size=size, ledger_head=head, key_fingerprint=fp,
    )


def _check_ledger(path: Path, state_dir: Path | None = None) -> tuple[int, str]:
    """Open and verify the consent ledger (signatures and hash chain) under the node's pinned key; fail closed."""
    from fedretain.consent.identity import require_pin
    from fedretain.consent.ledger import ConsentLedger

    if not Path(path).is_file():
        raise NodeSetupError(
            f"consent ledger: {path} does not exist (create it with `fedretain consent init` and import the "
            f"merchant's consent records, or pass --consent-db)"
        )
    try:
        pin = require_pin(state_dir, path) if state_dir is not None else None
        with ConsentLedger.open(path, pinned=pin) as ledger:
            result = ledger.verify()
            head = ledger.head()
    except Exception as exc:  # a corrupt file, a missing key, a schema mismatch: all mean "do not use"
        raise NodeSetupError(f"consent ledger: cannot open {path}: {type(exc).__name__}: {exc}") from None
    if not result.ok:
        raise NodeSetupError(
            f"consent ledger: {path} failed verification at record {result.first_bad_seq}: {result.reason}"
        )
    return int(head.size), str(head.root_hex)


def probe_server(settings: NodeSettings, timeout: float = 5.0) -> str:
    """Check how the platform answers before the SuperNode dials it; raise on a refusal.

    Flower's SuperNode retries a refused TLS handshake forever with only "Connection
    attempt failed" in its log; this makes the same kind of connection once and turns
    a refusal into a clear error. An unreachable platform is not an error (nodes may
    start first and wait); the returned note says so.
    """
    import ssl

    import httpx

    host, port = split_address(settings.server)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        return f"the platform at {settings.server} is not reachable yet ({exc.strerror or exc}); waiting for it"
    if settings.insecure:
        sock.close()
        try:
            httpx.post(f"http://{settings.server}/v1/fleet/pull-messages", content=b"", timeout=timeout)
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.ConnectError) as exc:
            raise PlatformRefused(
                f"the platform at {settings.server} refused the plain-text connection ({exc}): it serves TLS only. "
                f"Start the node with --root-cert CA (and --key) instead of --insecure"
            ) from None
        except httpx.HTTPError as exc:
            return f"plain-text connection to {settings.server}: {exc}"
        return f"the platform at {settings.server} answers plain HTTP"
    if settings.root_cert is not None:
        ctx = ssl.create_default_context(cafile=str(settings.root_cert))
    else:
        ctx = ssl.create_default_context()
    try:
        with ctx.wrap_socket(sock, server_hostname=host) as tls_sock:
            version = tls_sock.version()
    except ssl.SSLCertVerificationError as exc:
        raise NodeSetupError(
            f"the platform's TLS certificate at {settings.server} does not verify "
            f"({exc.verify_message}): check --root-cert and that the certificate names {host}"
        ) from None
    except (ssl.SSLError, OSError) as exc:
        raise PlatformRefused(
            f"TLS handshake with {settings.server} failed ({exc}): the platform may not serve TLS there"
        ) from None
    finally:
        sock.close()
    return f"TLS to {settings.server} verified ({version})"



__all__ = ["Preflight", "preflight", "probe_server"]
