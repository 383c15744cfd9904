"""How a merchant node is configured: its settings, checked on creation, and ``node.toml``.

:class:`NodeSettings` says where the node's data, consent ledger, keys and state live and
how it connects; every value is checked when the settings are made, so a bad flag fails
before anything starts. :func:`write_node_config` writes the Flower ``--node-config``
file the ClientApp reads (:meth:`fedretain.clients.node.NodeConfig.from_flower`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedretain.atomic import write_atomic
from fedretain.compat.flower import HEARTBEAT_MAX_S, HEARTBEAT_MIN_S

EXECUTORS = ("warm", "subprocess")
DEFAULT_APP = "fedretain.clients.client_app:app"
DEFAULT_FAB_ID = "fedretain/fedretain"
DEFAULT_POLL = 0.2


class NodeSetupError(Exception):
    """The node cannot start: missing/invalid data, ledger, key or certificate."""


class PlatformRefused(NodeSetupError):
    """The platform refused this node's connection (``client start`` exits 3, as for a refused key).

    Raised before the SuperNode starts when the platform's answer shows the two sides do
    not match: ``--insecure`` against a TLS platform, or TLS against a plain-HTTP one.
    """


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) → (host, port), with a clear error."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise NodeSetupError(f"server address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)



@dataclass(frozen=True)
class NodeSettings:
    """How one merchant node connects and where its data, ledger, keys and state live."""

    server: str
    data: Path
    consent_db: Path | None = None
    auth_key: Path | None = None
    root_cert: Path | None = None
    insecure: bool = False
    state_dir: Path | None = None
    signing_key: Path | None = None
    runtime_port: int = 0
    executor: str = "warm"
    poll_interval: float | None = DEFAULT_POLL
    heartbeat_interval: float | None = None  # None: Flower's 30 s
    max_wait_time: float | None = None
    app: str = DEFAULT_APP
    extra_node_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        split_address(self.server)
        if self.executor not in EXECUTORS:
            raise NodeSetupError(f"executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        if self.poll_interval is not None and not 0.01 <= self.poll_interval <= 3:
            raise NodeSetupError(f"poll interval must be in [0.01, 3] s, got {self.poll_interval}")
        if self.heartbeat_interval is not None and not HEARTBEAT_MIN_S <= self.heartbeat_interval <= HEARTBEAT_MAX_S:
            raise NodeSetupError(f"heartbeat interval must be in [{HEARTBEAT_MIN_S:g}, {HEARTBEAT_MAX_S:g}] s "
                                 f"(the platform refuses others), got {self.heartbeat_interval}")
        if self.insecure and self.auth_key is not None:
            raise NodeSetupError("--insecure cannot be combined with --key: node authentication needs TLS")
        if self.insecure and self.root_cert is not None:
            raise NodeSetupError("--insecure cannot be combined with --root-cert")

    @property
    def state(self) -> Path:
        return (self.state_dir or Path(self.data) / ".node").resolve()

    @property
    def flwr_home(self) -> Path:
        return self.state / "flwr-home"

    @property
    def log_dir(self) -> Path:
        return self.state / "logs"

    def node_config(self) -> dict[str, Any]:
        """Flower node_config read by :meth:`fedretain.clients.node.NodeConfig.from_flower`."""
        cfg: dict[str, Any] = {
            "data-path": str(Path(self.data).resolve()),
            "consent-db": str(Path(self.consent_db).resolve()) if self.consent_db else "",
            "state-dir": str(self.state),
        }
        if self.signing_key:
            cfg["node-key"] = str(Path(self.signing_key).resolve())
        for key, value in self.extra_node_config.items():
            if key in cfg:
                raise NodeSetupError(f"node config key {key!r} is set by fedretain itself")
            cfg[key] = value
        return cfg



def write_node_config(settings: NodeSettings) -> Path:
    """Write ``<state>/node.toml`` (Flower's ``--node-config`` file) atomically."""
    import tomli_w

    settings.state.mkdir(parents=True, exist_ok=True)
    return write_atomic(settings.state / "node.toml", tomli_w.dumps(settings.node_config()).encode())



__all__ = ["DEFAULT_APP", "DEFAULT_FAB_ID", "DEFAULT_POLL", "EXECUTORS", "NodeSettings", "NodeSetupError",
           "split_address", "write_node_config"]
