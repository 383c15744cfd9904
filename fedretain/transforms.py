"""Public input transforms: how every model column is clipped and scaled, declared in code.

Why. Standardising with the federation's pooled mean and standard deviation needs each
node's exact per-feature sums and sums of squares. Those moments are per-user-derived
values: the server differencing two rounds around one withdrawal recovers the withdrawn
user's feature vector exactly (issue 10, point 4), and the pooled statistics sent back
to every merchant leak the same to other merchants. Fixed public transforms need nothing
from any node: each column is clipped to a declared public range and mapped linearly to
[-1, 1]. The ranges come from what the features *are* (days are capped at
``NEVER_DAYS``, shares lie in [0, 1], counts and money are already ``log1p`` in
``fedretain.features``), never from anyone's data, so they are the same for every
merchant, every run and every attacker. Each column is then centred on the middle of its
range and divided by a public scale: 1 for ``log1p`` columns (one e-fold of the raw value
is one unit, about the spread of real shops' customers: inputs of unit scale keep the
signal of DP-SGD's clipped gradients) and half the range for shares and indicators
(mapped to [-1, 1]). Measured on CDNOW (bench/bench_dp_utility.py): mapping every column
to [-1, 1] instead cost local DP ≈0.006 AUC at ε = 3; these scales ≈0.003.

A column without a declared range is refused (fail closed): adding a feature to
``fedretain.features`` needs a line here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from fedretain.features import NEVER_DAYS, feature_columns

TRANSFORM_ID = "public-clip-v1"  # recorded in run records and model bundles


@dataclass(frozen=True)
class Range:
    """The public range and scale of one model column (in the units ``fedretain.features`` computes)."""

    lower: float
    upper: float
    why: str
    scale: float = 0.0  # 0: half the range (the column maps to [-1, 1])

    @property
    def centre(self) -> float:
        return (self.lower + self.upper) / 2.0

    @property
    def unit(self) -> float:
        return self.scale or (self.upper - self.lower) / 2.0


def _log_cap(cap: float, why: str) -> Range:
    """A ``log1p`` feature whose raw value is capped at ``cap`` (a public bound); one unit = one e-fold."""
    return Range(0.0, math.log1p(cap), why, scale=1.0)


_DAYS = _log_cap(NEVER_DAYS, "log1p(days), days capped at NEVER_DAYS")
_SHARE = Range(0.0, 1.0, "a share or indicator in [0, 1]")

# Raw caps are generous public bounds on a customer of one shop (values above them are
# clipped, which only bounds the influence of extreme customers).
RANGES: dict[str, Range] = {
    "recency_days": _DAYS,
    "frequency": _log_cap(1000, "log1p(purchases), at most 1000 purchases"),
    "monetary_total": _log_cap(1e5, "log1p(spend), at most 100,000 in the shop's currency"),
    "monetary_avg": _log_cap(1e4, "log1p(order value), at most 10,000"),
    "tenure_days": _DAYS,
    "mean_gap_days": _DAYS,
    "overdue_ratio": _log_cap(50, "log1p(ratio), the feature caps the ratio at 50"),
    "purchases_30d": _log_cap(100, "log1p(purchases in 30 days), at most 100"),
    "purchases_90d": _log_cap(300, "log1p(purchases in 90 days), at most 300"),
    "spend_90d": _log_cap(1e5, "log1p(spend in 90 days), at most 100,000"),
    "refund_rate": _SHARE,
    "views_7d": _log_cap(1000, "log1p(views in 7 days), at most 1000"),
    "views_30d": _log_cap(5000, "log1p(views in 30 days), at most 5000"),
    "watch_minutes_30d": _log_cap(1e4, "log1p(minutes in 30 days), at most 10,000"),
    "view_recency_days": _DAYS,
    "live_view_share": _SHARE,
    "likes_30d": _log_cap(1000, "log1p(likes and comments in 30 days), at most 1000"),
    "favorites_30d": _log_cap(1000, "log1p(favourites in 30 days), at most 1000"),
    "carts_30d": _log_cap(1000, "log1p(add-to-carts in 30 days), at most 1000"),
    "engagement_recency_days": _DAYS,
    "cart_without_purchase_30d": _log_cap(1000, "log1p(open carts in 30 days), at most 1000"),
    "shares_30d": _log_cap(1000, "log1p(shares in 30 days), at most 1000"),
    "follows": _log_cap(100, "log1p(follows), at most 100"),
    "referral_friend": _SHARE,
    "member": _SHARE,
    "member_tier_level": Range(0.0, 3.0, "tier 0 (none) .. 3 (platinum)"),
    "city_tier": _SHARE,
}
INDICATOR = Range(0.0, 1.0, "consent-scope indicator (has_<scope>)")


class TransformError(ValueError):
    """A model column has no declared public range."""


def column_range(column: str) -> Range:
    if column in RANGES:
        return RANGES[column]
    if column.startswith("has_"):
        return INDICATOR
    raise TransformError(f"model column {column!r} has no declared public range in fedretain/transforms.py; "
                         f"add one (a bound from what the feature is, never from data)")


def public_bounds(columns: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) per column, in order."""
    ranges = [column_range(c) for c in columns]
    return np.array([r.lower for r in ranges], float), np.array([r.upper for r in ranges], float)


def public_standardizer(feature_names: Iterable[str]):
    """The run's input transform for ``feature_names``: clip to the public range, centre, scale.

    Returned as a :class:`fedretain.models.Standardizer` (centre, scale, clip bounds), so
    model bundles and scoring keep working unchanged.
    """
    from fedretain.models import Standardizer

    ranges = [column_range(c) for c in feature_columns(feature_names)]
    return Standardizer(mean=np.array([r.centre for r in ranges]), std=np.array([r.unit for r in ranges]),
                        lower=np.array([r.lower for r in ranges]), upper=np.array([r.upper for r in ranges]),
                        source=TRANSFORM_ID)
