"""How often the ServerApp asks the SuperLink for replies while ``pending`` are outstanding.

A pull costs the SuperLink work per *pending* message, not per reply (flwr 1.42's in-memory
link state checks expiry, federation and node liveness of every asked id on every pull). At a
fixed 0.1 s interval the pulls of one exchange therefore cost pending x round duration / 0.1:
with 1,000 merchants, rounds last over a minute and the polling alone took about 40 % of a core
(issue 14, the quadratic term of a large simulation). Waiting in proportion to what is pending
bounds the pulling cost to a fixed share of a core whatever the federation's size, while an
exchange with few outstanding replies (a small federation, or the tail of a large round, the
moment that decides when the round ends) is still polled every ``base`` seconds.
"""

from __future__ import annotations

__all__ = ["PENDING_PER_S", "MAX_POLL_S", "poll_interval"]

PENDING_PER_S = 250  # outstanding replies per second of wait: 500 or more pending -> a pull every 2 s
MAX_POLL_S = 2.0


def poll_interval(pending: int, base: float = 0.1, remaining: float | None = None) -> float:
    """Seconds to wait before the next pull: ``base`` for up to ``base x PENDING_PER_S`` pending replies,
    then growing with them up to ``MAX_POLL_S``; never past ``remaining`` (the exchange's timeout)."""
    wait = min(MAX_POLL_S, max(base, pending / PENDING_PER_S))
    if remaining is not None:
        wait = min(wait, max(0.0, remaining))
    return wait
