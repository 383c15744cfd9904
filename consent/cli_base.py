"""Shared plumbing of ``fedretain consent``: which ledger (--silo/--db/--key), how to open it, clean errors."""

from __future__ import annotations

import functools
import getpass
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class _Ctx:
    db: Path
    key: Path
    key_given: bool
    db_given: bool = False
    silo: Path | None = None
    state_dir: Path | None = None  # where the node's pin (node.json) is looked for

    def resolved(self, db: Path | None, key: Path | None, silo: Path | None) -> _Ctx:
        """Options given after the subcommand override those given before it."""
        silo = silo or self.silo
        if silo is not None and db is None and not self.db_given:
            from .identity import silo_paths

            paths = silo_paths(silo)
            return _Ctx(paths.consent_db, key or (self.key if self.key_given else paths.node_key),
                        key is not None or self.key_given or paths.node_key.exists(), True, silo, paths.state_dir)
        db_ = db or self.db
        if key is not None:
            key_, given = key, True
        elif self.key_given:
            key_, given = self.key, True
        else:
            key_, given = db_.with_suffix(".key.pem"), False
        return _Ctx(db_, key_, given, db is not None or self.db_given, None, db_.parent)


_LOC_OPTS = [
    click.option("--silo", "silo_", type=click.Path(file_okay=False, path_type=Path), default=None,
                 help="a node's silo: use SILO/.node/consent.db, its node key and its pinned key"),
    click.option("--db", "db_", type=click.Path(dir_okay=False, path_type=Path), default=None,
                 help="the consent ledger (SQLite file)"),
    click.option("--key", "key_", type=click.Path(dir_okay=False, path_type=Path), default=None,
                 help="the node's Ed25519 private key (PEM)"),
]


def _loc(fn: F) -> F:
    """Accept --silo/--db/--key after the subcommand too; the command gets the resolved ``_Ctx``."""

    @functools.wraps(fn)
    def wrapper(obj: _Ctx, *args: Any, silo_: Path | None = None, db_: Path | None = None,
                key_: Path | None = None, **kwargs: Any) -> Any:
        return fn(obj.resolved(db_, key_, silo_), *args, **kwargs)

    for opt in reversed(_LOC_OPTS):
        wrapper = opt(wrapper)
    return wrapper  # type: ignore[return-value]


def _friendly(fn: F) -> F:
    """Turn expected errors (bad input, missing files, tampering) into a clean message and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .gate import ConsentError
        from .identity import PinError
        from .importer import ConsentImportError
        from .ledger import LedgerError
        from .signing import KeyFileError

        try:
            return fn(*args, **kwargs)
        except ConsentImportError as exc:
            lines = [str(exc)]
            if len(exc.errors) > 1:
                lines.append("first problems:")
                lines += [f"  row {r}, field {f!r}: {m}" for r, f, m in exc.errors[:10]]
            raise click.ClickException("\n".join(lines)) from None
        except (LedgerError, KeyFileError, ConsentError, PinError, ValueError, OSError) as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper  # type: ignore[return-value]


def _pin(ctx: _Ctx) -> Any:
    """The node's pin for this ledger: required with --silo; used when one sits beside a --db ledger."""
    from .identity import load_pin, require_pin

    if ctx.state_dir is None or not ctx.db.exists():
        return None
    if ctx.silo is not None:
        return require_pin(ctx.state_dir, ctx.db)
    return load_pin(ctx.state_dir)


def _open(ctx: _Ctx, *, write: bool = False) -> Any:
    """Open the ledger; with a pin (``--silo``, or node.json beside the file) only under the pinned key."""
    from .ledger import ConsentLedger

    pin = _pin(ctx)
    if write or ctx.key_given or ctx.key.exists():
        return ConsentLedger.open(ctx.db, key_path=ctx.key, pinned=pin)
    return ConsentLedger.open(ctx.db, pinned=pin)


def _console() -> Any:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # piped or captured: wide enough that ids and timestamps stay whole
        console = Console(width=200)
    return console


def _ts(text: str | None) -> str:
    """Canonical timestamp text, shortened for tables: ``2024-01-01 00:00:00`` (UTC)."""
    if not text:
        return ""
    short = text.replace("T", " ").removesuffix("Z")
    return short.removesuffix(".000000")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _default_by() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


EMBEDDED_WARNING = ("the signatures were checked against the key this ledger declares about itself, not a key you "
                    "trust: this detects edits, but a ledger rebuilt and re-signed under another key would pass. "
                    "Verify with --silo SILO (the node's pinned key) or --public-key NODE_KEY.pub")


def _require_trust(obj: _Ctx, ledger: Any, given_key: bool, trust_embedded: bool) -> None:
    """Refuse to vouch for a ledger with no trusted key unless --trust-embedded-key was given deliberately."""
    if given_key or trust_embedded or ledger.pinned_key is not None or ledger.has_signing_key:
        return
    raise click.ClickException(
        f"no trusted key for {obj.db}: the ledger's own declared key proves nothing against a replaced file. Pass "
        "--silo SILO (the node's pinned key), --key NODE_KEY or --public-key NODE_KEY.pub; or --trust-embedded-key "
        "to check self-consistency only (prints a WARNING)")


_TRUST_OPT = click.option(
    "--trust-embedded-key", is_flag=True,
    help="with no pinned, node or given key: check against the key the ledger declares itself (WARNING)")
