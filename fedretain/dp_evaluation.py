"""Held-out evaluation that leaves a node only as a DP release: noisy per-class score histograms.

Why. Exact per-node held-out metrics (AUC, log loss, counts) are functions of the held-out
users' labels and features; differencing two rounds around one withdrawal recovers a
held-out user's label. Here a node bins its held-out users' predicted probabilities into
fixed public bins, separately for buyers and non-buyers. Each user falls in exactly one
of the 2·B cells, so under add/remove-one-user the histogram has L2 sensitivity 1. In a
DP mode the node adds Gaussian noise (:class:`fedretain.analytics.mechanisms.GaussianMechanism`:
calibrated with the Opacus RDP accountant, sampled by OpenDP) and charges (ε, δ) to its
privacy budget ledger under the run's purpose *before* anything leaves, exactly like an
analytics query. The server pools the nodes' histograms and derives AUC (with a 95%
interval that covers sampling and DP noise), log loss, Brier score and calibration
error from the bins — post-processing, no further privacy cost.

In ``dp-mode none`` the histogram is exact (that mode promises nothing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedretain.analytics.mechanisms import ACCOUNTANT, GaussianMechanism
from fedretain.privacy.accountant import PrivacyError
from fedretain.privacy.budget import BudgetExceeded, BudgetLedger, RunPlan

# Fixed public bins: 12 bins, equally spaced in logit between -3 and 3, open at both ends. Few
# bins because every cell carries noise and AUC sums it: on CDNOW (10 nodes, ε = 0.3) 12 bins
# give an AUC sd of ≈0.03 and a tie bias of ≈-0.005; 32 bins ≈0.05 (bench/bench_dp_utility.py).
_LOGIT_EDGES = np.linspace(-3.0, 3.0, 11)
EDGES = np.concatenate([[0.0], 1.0 / (1.0 + np.exp(-_LOGIT_EDGES)), [1.0]])
N_BINS = len(EDGES) - 1
# Representative probability of each bin (logit midpoint; the open ends one half-step further out).
_STEP = float(_LOGIT_EDGES[1] - _LOGIT_EDGES[0])
_MID_LOGITS = np.concatenate([[_LOGIT_EDGES[0] - _STEP / 2],
                              (_LOGIT_EDGES[:-1] + _LOGIT_EDGES[1:]) / 2, [_LOGIT_EDGES[-1] + _STEP / 2]])
MIDPOINTS = 1.0 / (1.0 + np.exp(-_MID_LOGITS))
EVAL_MODE = "evaluate"  # the budget ledger's mode of an evaluation release
DEFAULT_EVAL_DELTA = 1e-5
Z95 = 1.959963984540054


def histograms(y: np.ndarray, prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Counts of held-out buyers and non-buyers per public probability bin."""
    y = np.asarray(y, dtype=float).ravel()
    idx = np.clip(np.searchsorted(EDGES, np.asarray(prob, dtype=float).ravel(), side="right") - 1, 0, N_BINS - 1)
    pos = np.bincount(idx[y == 1], minlength=N_BINS).astype(float)
    neg = np.bincount(idx[y != 1], minlength=N_BINS).astype(float)
    return pos, neg


def release_id(run_id: str, server_round: int) -> str:
    """The budget-ledger run id of one evaluation release (answered once, like a query id)."""
    return f"{run_id}/evaluate/{int(server_round)}"


@dataclass(frozen=True)
class Release:
    """What leaves the node: the (noisy) histograms and the noise sd per cell."""

    pos: np.ndarray
    neg: np.ndarray
    sd: float
    epsilon: float
    delta: float


def calibrated(epsilon: float, delta: float) -> GaussianMechanism:
    """The Gaussian mechanism for one histogram release (L2 sensitivity 1), or a clear refusal."""
    try:
        return GaussianMechanism.calibrated(float(epsilon), float(delta), 1.0)
    except ValueError as exc:  # Opacus cannot reach so small an ε with its RDP orders
        raise PrivacyError(f"no Gaussian noise reaches ε={epsilon:g} at δ={delta:g} for the evaluation release "
                           f"({exc}); give the evaluation a larger share of the run's ε (eval-epsilon)") from None


def exact_release(y: np.ndarray, prob: np.ndarray) -> Release:
    pos, neg = histograms(y, prob)
    return Release(pos, neg, 0.0, 0.0, 0.0)


def dp_release(ledger_file: Path, run_id: str, purpose: str, server_round: int, y: np.ndarray, prob: np.ndarray,
               epsilon: float, delta: float = DEFAULT_EVAL_DELTA) -> Release:
    """Noisy histograms at (ε, δ), charged to the node's budget ledger before they are returned.

    Refuses (``PrivacyError``) a second release for the same run and round, a release the
    budget cannot afford, and a node without a ledger; nothing is released then.
    """
    if not (epsilon > 0 and math.isfinite(epsilon)) or not 0 < delta < 1:
        raise PrivacyError(f"evaluation release needs ε > 0 and 0 < δ < 1, got ε={epsilon}, δ={delta}")
    mechanism = calibrated(epsilon, delta)
    pos, neg = histograms(y, prob)
    if not Path(ledger_file).is_file():
        raise PrivacyError(f"privacy ledger not found at {ledger_file}: the held-out evaluation is a DP release "
                           f"charged to the budget; set one with `fedretain privacy set-budget`")
    rid = release_id(run_id, server_round)
    plan = RunPlan(run_id=rid, purpose=purpose, mode=EVAL_MODE, accountant=ACCOUNTANT, epsilon=float(epsilon),
                   delta=float(delta), noise_multiplier=mechanism.noise_multiplier, sample_rate=1.0,
                   planned_steps=1, n_records=len(np.asarray(y)))
    with BudgetLedger.open(ledger_file) as ledger:
        if ledger.spends(rid, purpose):
            raise PrivacyError(f"the evaluation of run {run_id} round {server_round} was already released by this "
                               f"node; it is released once")
        try:
            ledger.reserve(plan)
        except BudgetExceeded as exc:
            raise PrivacyError(f"evaluation release refused: {exc}") from None
        ledger.record_spend(rid, purpose, int(server_round), 1, mechanism.accountant())
    noisy, sd = mechanism.release(np.concatenate([pos, neg]), np.ones(2 * N_BINS))
    return Release(noisy[:N_BINS], noisy[N_BINS:], float(sd[0]), float(epsilon), float(delta))


# -- the server's side: pooled metrics from (noisy) histograms ---------------------------------
def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos <= 0 or n_neg <= 0:
        return float("nan")
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
    return float((pos * (below + neg / 2.0)).sum() / (n_pos * n_neg))


def pooled_metrics(releases: list[tuple[np.ndarray, np.ndarray, float]], draws: int = 200,
                   seed: int = 0) -> dict[str, float | str]:
    """Round metrics from the nodes' histograms (each ``(pos, neg, noise_sd)``).

    AUC, log loss, Brier score and base rate use the noisy counts as they are (the noise
    has mean zero and the cells' noises are independent, so numerator and denominator of
    each are unbiased); only the calibration error, a per-cell ratio, clips negative cells
    to 0. ``auc-low``/``auc-high`` is a 95% interval: Hanley–McNeil's standard error for
    the pooled counts combined with the spread of the AUC when the declared DP noise is
    drawn again (Monte Carlo).
    """
    if not releases:
        return {}
    pos = np.sum([np.asarray(r[0], float) for r in releases], axis=0)
    neg = np.sum([np.asarray(r[1], float) for r in releases], axis=0)
    noise_sd = math.sqrt(sum(float(r[2]) ** 2 for r in releases))
    p, n = pos, neg
    total = p.sum() + n.sum()
    out: dict[str, float | str] = {"num-examples": float(total), "hist-noise-sd": noise_sd}
    if total <= 0 or p.sum() <= 0 or n.sum() <= 0:
        # too few held-out users for this ε: the noisy class totals are not positive, so no metric
        # is published (a ratio of noise would be meaningless); the record says why
        out["auc-status"] = ("suppressed: a noisy class total is not positive (too few held-out customers "
                             "for the evaluation ε; raise eval-epsilon or evaluate on more customers)")
        return out
    raw = _auc(p, n)
    auc = min(max(raw, 0.0), 1.0) if math.isfinite(raw) else raw  # noise can push the ratio past [0, 1]
    n_pos, n_neg = p.sum(), n.sum()
    mp, mn = MIDPOINTS, 1.0 - MIDPOINTS
    out.update({
        "auc": auc,
        "log_loss": float(-(p * np.log(mp)).sum() / total - (n * np.log(mn)).sum() / total),
        "brier": float(((p * mn**2) + (n * mp**2)).sum() / total),
        "base_rate": float(n_pos / total),
        "mean_pred": float(((p + n) * mp).sum() / total),
    })
    pc, nc = np.clip(p, 0, None), np.clip(n, 0, None)
    cells = pc + nc
    rate = np.divide(pc, cells, out=np.zeros_like(p), where=cells > 0)
    out["ece"] = float((cells * np.abs(mp - rate)).sum() / max(cells.sum(), 1.0))
    if math.isfinite(auc):
        auc_c = min(max(auc, 1e-6), 1 - 1e-6)
        q1, q2 = auc_c / (2 - auc_c), 2 * auc_c**2 / (1 + auc_c)
        var = (auc_c * (1 - auc_c) + (n_pos - 1) * (q1 - auc_c**2) + (n_neg - 1) * (q2 - auc_c**2)) / (n_pos * n_neg)
        noise_var = 0.0
        if noise_sd > 0:  # redraw the declared noise around the released counts
            rng = np.random.default_rng(seed)
            dp_ = pos + rng.normal(0, noise_sd, (draws, N_BINS))  # the pooled cells' noise: sd √Σ sd²
            dn_ = neg + rng.normal(0, noise_sd, (draws, N_BINS))
            below = np.concatenate([np.zeros((draws, 1)), np.cumsum(dn_, axis=1)[:, :-1]], axis=1)
            with np.errstate(divide="ignore", invalid="ignore"):
                sims = (dp_ * (below + dn_ / 2)).sum(axis=1) / (dp_.sum(axis=1) * dn_.sum(axis=1))
            noise_var = float(np.nanvar(sims))
        half = Z95 * math.sqrt(max(var, 0.0) + noise_var)
        out["auc-low"], out["auc-high"] = max(0.0, auc - half), min(1.0, auc + half)
    return out
