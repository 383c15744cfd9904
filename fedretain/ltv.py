"""Predicted LTV in money: calibration in the shop's currency over a stated horizon, and its checks.

The model's LTV head predicts ``log1p(spend in the horizon)`` (a least-squares target that ranks
well and trains stably under DP clipping), so ``expm1`` of it is a *geometric* mean: far below the
arithmetic mean a merchant budgets with, most of all when few buyers come back. ``MoneyCalibration``
turns the head's output into money with one factor fitted where the labels are — the shop's own
labelled users of the last horizon (on the node, nothing leaves it) — so that the mean prediction
matches the mean spend (a ratio estimator: Σ actual / Σ raw prediction).

Metrics people read: the *normalized Gini* of the LTV ranking (1 = spend ordered perfectly, 0 =
random), the *mean-calibration ratio* (mean prediction / mean actual; 1 is exact) and a decile
table (mean predicted vs mean actual per predicted-value decile) with its plot.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

MIN_SPENDERS = 20  # labelled users with spend > 0 a shop needs to fit its own factor


def normalized_gini(actual: np.ndarray, predicted: np.ndarray) -> float:
    """Gini of ``actual`` ordered by ``predicted``, over the Gini of the perfect order (NaN if no spend)."""
    actual = np.asarray(actual, float)
    predicted = np.asarray(predicted, float)
    if actual.size == 0 or actual.sum() <= 0:
        return float("nan")

    def gini(order_by: np.ndarray) -> float:
        a = actual[np.lexsort((np.arange(actual.size), -order_by))]  # stable, descending
        cum = np.cumsum(a) / a.sum()
        return float(cum.sum() / a.size - (a.size + 1) / (2 * a.size))

    return gini(predicted) / gini(actual)


def calibration_ratio(actual: np.ndarray, predicted: np.ndarray) -> float:
    """Mean prediction over mean actual (1.0 = calibrated in the mean; NaN if no spend)."""
    total = float(np.sum(actual))
    return float(np.sum(predicted)) / total if total > 0 else float("nan")


def decile_table(actual: np.ndarray, predicted: np.ndarray, bins: int = 10) -> pd.DataFrame:
    """Mean predicted and mean actual value per predicted-value decile (ties kept together)."""
    actual = np.asarray(actual, float)
    predicted = np.asarray(predicted, float)
    if actual.size == 0:
        return pd.DataFrame(columns=["decile", "users", "mean_predicted", "mean_actual"])
    ranks = pd.Series(predicted).rank(method="first").to_numpy()
    dec = np.minimum((ranks - 1) * bins // actual.size, bins - 1).astype(int) + 1
    df = pd.DataFrame({"decile": dec, "p": predicted, "a": actual})
    g = df.groupby("decile")
    return pd.DataFrame({"decile": g.size().index, "users": g.size().to_numpy(),
                         "mean_predicted": g["p"].mean().to_numpy(), "mean_actual": g["a"].mean().to_numpy()})


@dataclass(frozen=True)
class MoneyCalibration:
    """Raw LTV (``expm1`` of the head) → expected spend in ``currency`` within ``horizon_days``."""

    scale: float
    horizon_days: float
    currency: str = ""
    n_users: int = 0
    n_spenders: int = 0
    source: str = "shop"  # "shop": fitted on this shop's labelled users; "model": carried by the model

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"LTV calibration factor must be positive and finite, got {self.scale}")
        if not self.horizon_days > 0:
            raise ValueError(f"LTV horizon must be positive, got {self.horizon_days}")

    @classmethod
    def fit(cls, raw_pred: np.ndarray, actual: np.ndarray, horizon_days: float, currency: str = "",
            min_spenders: int = MIN_SPENDERS) -> MoneyCalibration:
        """Ratio estimator on labelled users; refuses too few spenders (a factor from 3 buyers is noise)."""
        raw_pred = np.asarray(raw_pred, float)
        actual = np.asarray(actual, float)
        spenders = int((actual > 0).sum())
        if spenders < min_spenders:
            raise ValueError(f"only {spenders} labelled users spent in the last {horizon_days:g} days "
                             f"(need {min_spenders}) to calibrate LTV in money")
        if not (np.isfinite(raw_pred).all() and np.isfinite(actual).all()) or raw_pred.sum() <= 0:
            raise ValueError("cannot calibrate LTV: predictions or spend are not finite and positive")
        return cls(float(actual.sum() / raw_pred.sum()), float(horizon_days), currency, int(actual.size), spenders)

    def apply(self, raw_pred: np.ndarray) -> np.ndarray:
        return np.asarray(raw_pred, float) * self.scale

    def label(self) -> str:
        """Column heading, e.g. ``predicted value, next 30 days (EUR)``."""
        cur = f" ({self.currency})" if self.currency else ""
        return f"predicted value, next {self.horizon_days:g} days{cur}"

    def as_dict(self) -> dict:
        return asdict(self)


def holdout_check(raw_train: np.ndarray, actual_train: np.ndarray, raw_test: np.ndarray, actual_test: np.ndarray,
                  horizon_days: float, currency: str = "", min_test: int = 10) -> dict | None:
    """Fit the money factor on training users, judge it on held-out ones (None: too few buyers or users).

    Returns the decile table, normalized Gini, mean-calibration ratio and both means (in ``currency``).
    """
    actual_test = np.asarray(actual_test, float)
    if actual_test.size < min_test:
        return None
    try:
        cal = MoneyCalibration.fit(raw_train, actual_train, horizon_days, currency)
    except ValueError:
        return None
    pred = cal.apply(raw_test)
    return {"deciles": decile_table(actual_test, pred), "n_users": int(actual_test.size),
            "gini": normalized_gini(actual_test, pred), "ratio": calibration_ratio(actual_test, pred),
            "mean_predicted": float(pred.mean()), "mean_actual": float(actual_test.mean()), "scale": cal.scale}


def plot_deciles(table: pd.DataFrame, path: str | Path, *, currency: str = "", horizon_days: float | None = None,
                 title: str = "Predicted vs actual value by decile") -> Path:
    """Bar-and-line chart of ``decile_table``: mean predicted vs mean actual spend per decile (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4))
    x = table["decile"].to_numpy()
    ax.bar(x - 0.2, table["mean_predicted"], width=0.4, label="mean predicted")
    ax.bar(x + 0.2, table["mean_actual"], width=0.4, label="mean actual")
    unit = f" ({currency})" if currency else ""
    span = f" over {horizon_days:g} days" if horizon_days else ""
    ax.set_xlabel("decile of predicted value (1 = lowest)")
    ax.set_ylabel(f"spend per user{span}{unit}")
    ax.set_xticks(x)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
