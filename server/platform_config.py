"""A platform's server config (TOML) and the run config it submits, checked before anything starts.

:class:`PlatformConfig` reads ``server.toml`` (``[server]``, ``[tls]``, ``[auth]``,
``[run]``), resolving every path against the file's folder and refusing unknown keys;
:func:`build_run_config` checks ``[run]`` against the fedretain app's
``[tool.flwr.app.config]`` keys and :class:`fedretain.server.settings.RunSettings`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from the pinned backport
    import tomli as tomllib

DEFAULT_PORT = 9443

_SERVER_KEYS = {"host", "port", "state-dir", "project-dir", "ready-timeout", "database"}
_TLS_KEYS = {"ca-cert", "server-cert", "server-key"}
_AUTH_KEYS = {"enabled", "node-keys"}
_RUN_PATH_KEYS = {"out-dir", "data-dir"}


class PlatformError(Exception):
    """The platform cannot start, or an operation on it failed; the message says why."""


# -- config ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlatformConfig:
    """A server config file, with every path resolved against the file's folder."""

    source: Path | None
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    state_dir: Path = Path("platform-state")
    project_dir: Path | None = None
    ready_timeout: float = 60.0
    database: str = "memory"
    ca_cert: Path | None = None
    server_cert: Path | None = None
    server_key: Path | None = None
    auth: bool = True
    node_keys: Path | None = None
    run: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PlatformConfig:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PlatformError(f"server config {path} does not exist") from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise PlatformError(f"server config {path}: {exc}") from None
        return cls.from_dict(data, path.resolve().parent, path)

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: Path, source: Path | None = None) -> PlatformConfig:
        where = str(source or "server config")
        unknown = set(data) - {"server", "tls", "auth", "run"}
        if unknown:
            raise PlatformError(f"{where}: unknown section(s) {', '.join(sorted(unknown))} "
                                f"(expected [server], [tls], [auth], [run])")
        server, tls_, auth, run = (dict(data.get(k, {})) for k in ("server", "tls", "auth", "run"))
        if "insecure" in server:
            raise PlatformError(f"{where}: insecure mode is not a config setting; pass --insecure explicitly")
        for name, sec, allowed in (("server", server, _SERVER_KEYS), ("tls", tls_, _TLS_KEYS),
                                   ("auth", auth, _AUTH_KEYS)):
            bad = set(sec) - allowed
            if bad:
                raise PlatformError(f"{where}: unknown key(s) in [{name}]: {', '.join(sorted(bad))} "
                                    f"(allowed: {', '.join(sorted(allowed))})")

        def path(sec: dict[str, Any], key: str, section: str) -> Path | None:
            value = sec.get(key)
            if value in (None, ""):
                return None
            if not isinstance(value, str):
                raise PlatformError(f"{where}: [{section}] {key} must be a path string, got {value!r}")
            p = Path(value).expanduser()
            return p if p.is_absolute() else (base / p).resolve()

        port = server.get("port", DEFAULT_PORT)
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise PlatformError(f"{where}: [server] port must be an integer in 1..65535, got {port!r}")
        enabled = auth.get("enabled", True)
        if not isinstance(enabled, bool):
            raise PlatformError(f"{where}: [auth] enabled must be true or false, got {enabled!r}")
        for key in _RUN_PATH_KEYS:
            if isinstance(run.get(key), str) and run[key]:
                p = Path(run[key]).expanduser()
                run[key] = str(p if p.is_absolute() else (base / p).resolve())
        return cls(
            source=source, host=str(server.get("host", "127.0.0.1")), port=port,
            state_dir=path(server, "state-dir", "server") or (base / "platform-state").resolve(),
            project_dir=path(server, "project-dir", "server"),
            ready_timeout=float(server.get("ready-timeout", 60.0)),
            database=_database(server.get("database", "memory"), base, where),
            ca_cert=path(tls_, "ca-cert", "tls"), server_cert=path(tls_, "server-cert", "tls"),
            server_key=path(tls_, "server-key", "tls"), auth=enabled,
            node_keys=path(auth, "node-keys", "auth"), run=run,
        )

    @property
    def cli_address(self) -> str:
        """Where the local ``flwr`` CLI dials the SuperLink (a wildcard bind → loopback)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


def _database(value: Any, base: Path, where: str) -> str:
    """``memory`` (Flower's in-memory state) or the path of a SQLite file for the SuperLink."""
    if not isinstance(value, str) or not value:
        raise PlatformError(f"{where}: [server] database must be \"memory\" or a file path, got {value!r}")
    if value == "memory":
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def project_dir(configured: Path | None = None) -> Path:
    """The fedretain source root that ``flwr run`` packages (pyproject.toml with [tool.flwr.app])."""
    import fedretain

    candidates = [configured] if configured else [Path(fedretain.__file__).resolve().parent.parent]
    for cand in candidates:
        pyproject = Path(cand) / "pyproject.toml"
        if pyproject.is_file():
            try:
                data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
            except tomllib.TOMLDecodeError as exc:
                raise PlatformError(f"{pyproject}: {exc}") from None
            if "app" in data.get("tool", {}).get("flwr", {}):
                return Path(cand)
            raise PlatformError(f"{pyproject} has no [tool.flwr.app] section: not the fedretain source root")
    raise PlatformError(
        f"cannot find the fedretain source root (pyproject.toml with [tool.flwr.app]) at {candidates[0]}; "
        f"install fedretain from source (pip install -e) or set [server] project-dir"
    )


def app_config_defaults(project: Path) -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of the project: the run-config keys ``flwr run`` accepts."""
    data = tomllib.loads((project / "pyproject.toml").read_text(encoding="utf-8"))
    return dict(data["tool"]["flwr"]["app"].get("config", {}))


def build_run_config(config: PlatformConfig, project: Path, *, resume: bool | None = None,
                     run_id: str | None = None) -> dict[str, Any]:
    """The run config to submit: ``[run]`` checked against the app's keys and RunSettings."""
    from fedretain.server.settings import RunSettings

    run = dict(config.run)
    allowed = app_config_defaults(project)
    if resume:
        if "resume" not in allowed:
            raise PlatformError(f"the fedretain app at {project} cannot resume runs: its [tool.flwr.app.config] "
                                f"has no `resume` key")
        run["resume"] = True
    elif "resume" in allowed:
        run["resume"] = False
    if run_id and "run-id" in allowed:
        run["run-id"] = run_id
    unknown = sorted(set(run) - set(allowed))
    if unknown:
        raise PlatformError(
            f"{config.source or 'server config'}: [run] key(s) {', '.join(unknown)} are not run-config keys of the "
            f"fedretain app ([tool.flwr.app.config] in {project / 'pyproject.toml'} has: {', '.join(sorted(allowed))})"
        )
    for key, value in run.items():
        default = allowed[key]
        if isinstance(default, bool) != isinstance(value, bool) or (
                isinstance(default, str) and not isinstance(value, str)):
            raise PlatformError(f"[run] {key} = {value!r} has the wrong type (expected {type(default).__name__} "
                                f"like the default {default!r})")
    try:
        RunSettings.from_run_config({**allowed, **run})
    except (ValueError, TypeError) as exc:
        raise PlatformError(f"[run]: {exc}") from None
    return run



__all__ = ["DEFAULT_PORT", "PlatformConfig", "PlatformError", "app_config_defaults", "build_run_config",
           "project_dir"]
