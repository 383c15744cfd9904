"""Evaluation metrics in plain numpy (no scikit-learn at run time)."""

from __future__ import annotations

import numpy as np


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve via the rank-sum (Mann-Whitney U) formula, ties averaged.

    Returns NaN when only one class is present (AUC is undefined there).
    """
    y = np.asarray(y_true, dtype=float).ravel()
    s = np.asarray(score, dtype=float).ravel()
    n_pos = float((y == 1).sum())
    n_neg = float(len(y) - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=float)
    sorted_s = s[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def log_loss(y_true: np.ndarray, prob: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy."""
    y = np.asarray(y_true, dtype=float).ravel()
    p = np.clip(np.asarray(prob, dtype=float).ravel(), eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def brier(y_true: np.ndarray, prob: np.ndarray) -> float:
    """Mean squared error of the probability."""
    return float(np.mean((np.asarray(prob, dtype=float).ravel() - np.asarray(y_true, dtype=float).ravel()) ** 2))


def expected_calibration_error(y_true: np.ndarray, prob: np.ndarray, bins: int = 10) -> float:
    """ECE: |mean predicted − observed rate| over equal-width probability bins, weighted by bin size."""
    y = np.asarray(y_true, dtype=float).ravel()
    p = np.asarray(prob, dtype=float).ravel()
    if len(y) == 0:
        return float("nan")
    idx = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.sum() * abs(p[m].mean() - y[m].mean())
    return float(total / len(y))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (how well predicted LTV ranks actual spend)."""
    a = np.asarray(a, dtype=float).ravel()
    b = np.asarray(b, dtype=float).ravel()
    if len(a) < 2:
        return float("nan")
    ra = _ranks(a)
    rb = _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=float)
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return ranks


def classification_report(y_true: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """The metrics reported per node and per round."""
    return {
        "auc": roc_auc(y_true, prob),
        "log_loss": log_loss(y_true, prob),
        "brier": brier(y_true, prob),
        "ece": expected_calibration_error(y_true, prob),
        "base_rate": float(np.mean(y_true)) if len(y_true) else float("nan"),
        "mean_pred": float(np.mean(prob)) if len(prob) else float("nan"),
    }
