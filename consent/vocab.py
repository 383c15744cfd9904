"""The closed, versioned vocabulary of consent: purposes and data scopes.

Anything outside it is an error, never a silent allow. Adding a term means bumping
``VOCAB_VERSION`` so that old consent records keep their meaning.
"""

from __future__ import annotations

from collections.abc import Iterable

VOCAB_VERSION = "2026-11.1"

PURPOSES: tuple[str, ...] = ("retention_modeling", "ltv_modeling", "analytics", "recommendation")

SCOPES: tuple[str, ...] = (
    "purchase_history",  # purchases and refunds, with amounts
    "viewing_behavior",  # video views and watch time
    "engagement",  # likes, comments, favourites, carts
    "social",  # shares, follows, how the user was referred
    "profile",  # membership tier
    "location",  # city tier
    "device",  # device data (no feature reads it yet)
)

ACTIONS: tuple[str, ...] = ("grant", "withdraw", "expire")


class UnknownTermError(ValueError):
    """A purpose, scope or action outside the closed vocabulary."""


def check_purpose(purpose: str) -> str:
    """Return ``purpose`` if it is in the vocabulary, else raise ``UnknownTermError``."""
    if purpose not in PURPOSES:
        raise UnknownTermError(
            f"unknown purpose {purpose!r} (vocabulary {VOCAB_VERSION}: {', '.join(PURPOSES)})"
        )
    return purpose


def check_scope(scope: str) -> str:
    """Return ``scope`` if it is in the vocabulary, else raise ``UnknownTermError``."""
    if scope not in SCOPES:
        raise UnknownTermError(f"unknown scope {scope!r} (vocabulary {VOCAB_VERSION}: {', '.join(SCOPES)})")
    return scope


def check_scopes(scopes: str | Iterable[object]) -> tuple[str, ...]:
    """Validate an iterable of scopes (or one ``,``/``;``/``|``-separated string); return them sorted, de-duplicated."""
    if isinstance(scopes, str):
        scopes = [s for s in scopes.replace(";", ",").replace("|", ",").split(",") if s.strip()]
    return tuple(sorted({check_scope(str(s).strip()) for s in scopes}))


def check_action(action: str) -> str:
    """Return ``action`` if it is in the vocabulary, else raise ``UnknownTermError``."""
    if action not in ACTIONS:
        raise UnknownTermError(f"unknown consent action {action!r} (expected one of {', '.join(ACTIONS)})")
    return action
