"""Score a merchant's own users locally: who is likely to churn, who is worth winning back.

Runs on the merchant's node with the global model; scores never leave the node. The
same consent gate applies (purpose ``retention_modeling`` by default): users who did not
consent are not scored, and the count is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedretain.features import compute_features
from fedretain.models import ModelBundle
from fedretain.train import predict

SEGMENTS = ("high-value at risk", "low-value at risk", "loyal", "active", "new")


@dataclass(frozen=True)
class Segmenter:
    """Explicit thresholds for segments (scikit-learn style: parameters, no magic)."""

    churn_threshold: float = 0.6
    high_value_quantile: float = 0.7
    new_days: float = 30.0

    def segment(self, churn: np.ndarray, value: np.ndarray, tenure_days: np.ndarray) -> np.ndarray:
        high = value >= np.quantile(value, self.high_value_quantile) if len(value) else np.zeros(0, bool)
        at_risk = churn >= self.churn_threshold
        seg = np.where(at_risk, np.where(high, SEGMENTS[0], SEGMENTS[1]), np.where(high, SEGMENTS[2], SEGMENTS[3]))
        return np.where(tenure_days < self.new_days, SEGMENTS[4], seg)


def score_users(
    bundle: ModelBundle,
    gated,
    cutoff: pd.Timestamp,
    segmenter: Segmenter | None = None,
) -> pd.DataFrame:
    """One row per admitted buyer, ranked by win-back priority (churn probability × past spend)."""
    segmenter = segmenter or Segmenter()
    feature_names = [c for c in bundle.feature_names if not c.startswith("has_")]
    feats = compute_features(gated, cutoff, feature_names)
    ev = gated.events[(gated.events["ts"] < cutoff) & (gated.events["event"] == "purchase")]
    buyers = ev.groupby("user_id", observed=True).agg(spend=("amount", "sum"), first=("ts", "min"))
    feats = feats[feats.index.isin(buyers.index)]
    if feats.empty:
        return pd.DataFrame(columns=["user_id", "churn_probability", "predicted_ltv", "past_spend", "segment",
                                     "win_back_priority", "rank"])
    x = bundle.standardizer.transform(feats[bundle.feature_names].to_numpy(np.float64))
    p_return, ltv = predict(bundle.build_model(), x)
    churn = 1.0 - p_return
    past = buyers["spend"].reindex(feats.index).to_numpy(float)
    tenure = ((cutoff - buyers["first"].reindex(feats.index)) / pd.Timedelta(days=1)).to_numpy(float)
    out = pd.DataFrame(
        {
            "user_id": feats.index.astype(str),
            "churn_probability": churn.round(4),
            "predicted_ltv": ltv.round(2),
            "past_spend": past.round(2),
            "segment": segmenter.segment(churn, past, tenure),
            "win_back_priority": (churn * past).round(3),
        }
    )
    out = out.sort_values(["win_back_priority", "churn_probability"], ascending=False, kind="mergesort")
    out["rank"] = np.arange(1, len(out) + 1)
    return out.reset_index(drop=True)
