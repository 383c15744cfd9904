"""How many customers each synthetic merchant gets: a few big shops or a long-tail marketplace.

Split out of :mod:`fedretain.synth` (which simulates behaviour) because the size law alone
decides how hard federation is: heavy-tailed shops (``merchant_sizes``) versus a marketplace
of a few large sellers and thousands with a handful of customers (``marketplace_sizes``).
"""

from __future__ import annotations

import numpy as np

_LARGE_SHARE = 0.5  # share of customers held by the large sellers in a marketplace


def merchant_sizes(n_users: int, n_merchants: int, rng: np.random.Generator, min_size: int = 100) -> np.ndarray:
    """Heavy-tailed merchant sizes summing to ``n_users``, largest first.

    Zipf-like shares (rank^-1.3) with a little log-normal jitter, on top of a floor of
    ``min_size`` users (less if there are not enough users for that).
    """
    if n_merchants < 1:
        raise ValueError(f"n_merchants must be >= 1, got {n_merchants}")
    if n_users < n_merchants:
        raise ValueError(f"n_users ({n_users}) must be >= n_merchants ({n_merchants})")
    floor = min(min_size, n_users // n_merchants)
    w = np.arange(1, n_merchants + 1, dtype=float) ** -1.3 * np.exp(0.15 * rng.standard_normal(n_merchants))
    w = np.sort(w)[::-1]
    rest = n_users - floor * n_merchants
    sizes = floor + np.floor(rest * w / w.sum()).astype(np.int64)
    sizes[0] += n_users - sizes.sum()
    return sizes


def n_large_sellers(n_merchants: int) -> int:
    """How many large sellers a marketplace of ``n_merchants`` has: a few (1..5), one per ~100 sellers."""
    return int(np.clip(n_merchants // 100, 1, 5))


def marketplace_sizes(n_users: int, n_merchants: int, rng: np.random.Generator) -> np.ndarray:
    """Long-tail marketplace sizes summing to ``n_users``, largest first.

    A few large sellers (``n_large_sellers``) share ``_LARGE_SHARE`` of the customers (rank^-1);
    every other seller gets one customer plus a log-normal share of the rest, so most hold a
    handful and a few small ones a few dozen.
    """
    if n_merchants < 1:
        raise ValueError(f"n_merchants must be >= 1, got {n_merchants}")
    if n_users < 2 * n_merchants:
        raise ValueError(f"n_users ({n_users}) must be >= 2 x n_merchants ({n_merchants}) in rare-repeat mode")
    if n_merchants == 1:
        return np.array([n_users], dtype=np.int64)
    n_large = n_large_sellers(n_merchants)
    n_small = n_merchants - n_large
    w = 1.0 / np.arange(1, n_large + 1)
    large = np.floor(_LARGE_SHARE * n_users * w / w.sum()).astype(np.int64)
    rest = n_users - int(large.sum()) - n_small
    if n_small:
        w_small = rng.lognormal(0.0, 0.8, n_small)
        small = 1 + rng.multinomial(rest, w_small / w_small.sum())
    else:
        small = np.zeros(0, np.int64)
    sizes = np.sort(np.concatenate([large, small]).astype(np.int64))[::-1]
    sizes[0] += n_users - sizes.sum()
    return sizes
