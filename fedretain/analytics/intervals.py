"""Confidence intervals from the noise scale, and which figures are too noisy to show.

The server sums the nodes' noisy cells; the sum's noise is Gaussian with variance the sum
of the nodes' variances (each node states its noise sd, a public function of ε, δ and the
sensitivity). An interval here covers the *exact pooled* figure: it accounts for the DP
noise only, not for sampling variation of the users themselves.

A ratio (retention rate, spend per retained user) gets a delta-method interval, which is
accurate when the denominator's noise is small against the denominator. So a figure is

* ``suppressed`` (no estimate shown) when its noisy denominator is below ``min_snr`` noise
  standard deviations — the noise would dominate; its cells are still in the table;
* ``flagged`` when the interval is wider than ``flag_width`` (rates: absolute, 0.20 = ±10
  percentage points; other ratios: relative to the estimate, 0.20 = ±10%);
* ``ok`` otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

DEFAULT_CONFIDENCE = 0.95
DEFAULT_MIN_SNR = 10.0
DEFAULT_FLAG_WIDTH = 0.20


def z_value(confidence: float) -> float:
    """Two-sided normal quantile: 1.96 for 0.95."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


@dataclass(frozen=True)
class IntervalPolicy:
    """How intervals are computed and when a figure is flagged or suppressed."""

    confidence: float = DEFAULT_CONFIDENCE
    min_snr: float = DEFAULT_MIN_SNR
    flag_width: float = DEFAULT_FLAG_WIDTH

    def __post_init__(self) -> None:
        z_value(self.confidence)
        if self.min_snr <= 0 or self.flag_width <= 0:
            raise ValueError("min_snr and flag_width must be > 0")


def sum_interval(value: np.ndarray, sd: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) of a noisy sum with Gaussian noise sd ``sd``."""
    z = z_value(confidence)
    value, sd = np.asarray(value, float), np.asarray(sd, float)
    return value - z * sd, value + z * sd


def ratio_estimates(num: np.ndarray, num_sd: np.ndarray, den: np.ndarray, den_sd: np.ndarray,
                    policy: IntervalPolicy, *, is_rate: bool) -> dict[str, np.ndarray]:
    """Estimate, sd, interval and status of ``num / den`` from noisy sums (vectorised).

    Rates (``is_rate``) are clipped to [0, 1] after the interval is computed (post-processing,
    so still private); the interval then is clipped too.
    """
    num, num_sd, den, den_sd = (np.asarray(a, dtype=float) for a in (num, num_sd, den, den_sd))
    z = z_value(policy.confidence)
    suppressed = ~(den > policy.min_snr * den_sd) | ~(den > 0)
    safe_den = np.where(suppressed, np.nan, den)
    est = num / safe_den
    sd = np.sqrt(num_sd**2 + est**2 * den_sd**2) / safe_den
    lo, hi = est - z * sd, est + z * sd
    if is_rate:
        est, lo, hi = (np.clip(a, 0.0, 1.0) for a in (est, lo, hi))
        width = hi - lo
    else:
        width = (hi - lo) / np.abs(np.where(est == 0, np.nan, est))
    status = np.where(suppressed, "suppressed", np.where(~(width <= policy.flag_width), "flagged", "ok"))
    return {"estimate": est, "sd": sd, "ci_low": lo, "ci_high": hi, "status": status.astype(object)}
