"""The ``fedretain`` command line: a thin click front end that delegates to the library.

Sub-commands are loaded lazily so that ``fedretain consent verify`` does not pay for
importing torch and Flower.
"""

from __future__ import annotations

import importlib
import os

import click

# command name -> "module:attribute" of a click command or group
COMMANDS: dict[str, str] = {
    "data": "fedretain.cli.data:data",
    "consent": "fedretain.cli.consent:consent",
    "simulate": "fedretain.cli.train:simulate",
    "score": "fedretain.cli.train:score",
    "demo": "fedretain.cli.demo:demo",
    "privacy": "fedretain.privacy.cli:privacy",
    "server": "fedretain.server.cli:server",
    "client": "fedretain.clients.cli:client",
    "certs": "fedretain.server.cli:certs",
    "analytics": "fedretain.cli.analytics:analytics",
}


class LazyGroup(click.Group):
    """A click group whose sub-commands are imported only when used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)


@click.group(cls=LazyGroup)
@click.version_option(package_name="fedretain")
def main() -> None:
    """fedretain: federated retention and LTV models that respect consent and privacy."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
