"""Score a merchant's own users locally: who is likely to leave, and who is worth winning back.

Runs on the merchant's node with the global model; scores never leave the node. The
same consent gate applies (purpose ``retention_modeling`` by default): users who did not
consent are not scored, and the count is reported.

The win-back list ranks by *expected value at risk*: P(not buying again within the horizon) ×
the value the customer would bring if retained (the model's expected spend given a return,
``LTV / P(return)``, in the shop's currency once calibrated), customers at risk (chance of leaving
at or above the segmenter's threshold) first. Past spend is shown, never ranked on: a loyal big
spender is valuable but not at risk, and must not lead a win-back list.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedretain.features import compute_features
from fedretain.ltv import MoneyCalibration
from fedretain.models import ModelBundle
from fedretain.train import predict

SEGMENTS = ("high-value at risk", "low-value at risk", "loyal", "active", "new")
SCORE_COLUMNS = ("rank", "user_id", "churn_probability", "return_probability", "predicted_ltv",
                 "value_if_retained", "expected_value_at_risk", "past_spend", "segment")
# P(return) below this is treated as this when dividing LTV by it: two separately trained heads can
# disagree for users the model sees almost no chance for, and LTV / 1e-6 would be a fantasy value.
MIN_RETURN_PROBABILITY = 0.01


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


def merchant_currency(merchant: dict) -> str:
    """``merchant.json``'s optional ``currency`` (e.g. "EUR"); refused if not a short code."""
    cur = merchant.get("currency", "")
    if not isinstance(cur, str) or len(cur.strip()) > 8 or (cur and not cur.strip().isalnum()):
        raise ValueError(f"merchant.json: field 'currency' must be a short currency code such as \"EUR\", got {cur!r}")
    return cur.strip().upper()


def raw_predictions(bundle: ModelBundle, features: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(P(return), raw LTV) for feature rows (checked finite: a NaN feature must not become a score)."""
    x = features[bundle.feature_names].to_numpy(np.float64)
    if not np.isfinite(x).all():
        bad = features.index[~np.isfinite(x).all(axis=1)][:3].tolist()
        raise ValueError(f"features are not finite for users {bad}: cannot score")
    return predict(bundle.build_model(), bundle.standardizer.transform(x))


def score_users(
    bundle: ModelBundle,
    gated,
    cutoff: pd.Timestamp,
    segmenter: Segmenter | None = None,
    calibration: MoneyCalibration | None = None,
) -> pd.DataFrame:
    """One row per admitted buyer: at-risk customers first, each group by expected value at risk (full precision)."""
    segmenter = segmenter or Segmenter()
    feature_names = [c for c in bundle.feature_names if not c.startswith("has_")]
    feats = compute_features(gated, cutoff, feature_names)
    ev = gated.events[(gated.events["ts"] < cutoff) & (gated.events["event"] == "purchase")]
    buyers = ev.groupby("user_id", observed=True).agg(spend=("amount", "sum"), first=("ts", "min"))
    feats = feats[feats.index.isin(buyers.index)]
    if feats.empty:
        return pd.DataFrame(columns=list(SCORE_COLUMNS))
    p_return, raw_ltv = raw_predictions(bundle, feats)
    ltv = calibration.apply(raw_ltv, p_return) if calibration else raw_ltv
    churn = 1.0 - p_return
    if_retained = ltv / np.maximum(p_return, MIN_RETURN_PROBABILITY)
    past = buyers["spend"].reindex(feats.index).to_numpy(float)
    tenure = ((cutoff - buyers["first"].reindex(feats.index)) / pd.Timedelta(days=1)).to_numpy(float)
    out = pd.DataFrame(
        {
            "user_id": feats.index.astype(str),
            "churn_probability": churn,
            "return_probability": p_return,
            "predicted_ltv": ltv,
            "value_if_retained": if_retained,
            "expected_value_at_risk": churn * if_retained,
            "past_spend": past,
            "segment": segmenter.segment(churn, if_retained, tenure),
        }
    )
    # customers at risk (chance of leaving >= the threshold) first: a loyal big spender's small churn
    # chance times a large value can exceed a leaving customer's, but a win-back list is for the leaving
    out["_at_risk"] = churn >= segmenter.churn_threshold
    out = out.sort_values(["_at_risk", "expected_value_at_risk", "churn_probability", "user_id"],
                          ascending=[False, False, False, True], kind="mergesort").drop(columns="_at_risk")
    out.insert(0, "rank", np.arange(1, len(out) + 1))
    return out.reset_index(drop=True)[list(SCORE_COLUMNS)]


def fit_money_calibration(bundle: ModelBundle, prepared, horizon_days: float, currency: str = "") -> MoneyCalibration:
    """The shop's own factor: raw LTV vs actual spend of its labelled users over the last horizon (local)."""
    x = np.concatenate([prepared.x_train, prepared.x_test])
    y = np.concatenate([prepared.y_train, prepared.y_test])
    if not np.isfinite(x).all():
        raise ValueError("features of labelled users are not finite: cannot calibrate LTV")
    p_return, raw = predict(bundle.build_model(), bundle.standardizer.transform(x))
    return MoneyCalibration.fit(raw, np.expm1(y[:, 1].astype(np.float64)), horizon_days, currency, p_return=p_return)


def record_scoring_use(ledger, decision, users, feature_names, run_id: str, round_: int, phase: str = "score") -> int:
    """Append the consent ledger's usage record for scoring (scoring reads the users' data: a use).

    ``ledger`` is the node's open ``ConsentLedger``; ``decision`` the gate decision that admitted
    ``users``. Written before the scores are, so a failure leaves no unrecorded score file.
    """
    from fedretain.features import scopes_read

    users = [str(u) for u in users]
    scopes = [s for s in scopes_read(feature_names) if s in decision.grants.columns]
    granted = decision.grants.reindex(pd.Index(users, dtype=decision.grants.index.dtype)).fillna(False)
    return ledger.record_usage(
        run_id=run_id or "unknown-run", round=int(round_), purpose=decision.purpose,
        feature_set=f"{phase}:" + ",".join(feature_names),
        scope_counts={s: int(granted[s].astype(bool).sum()) for s in scopes}, n_users=len(set(users)),
        ledger_size=decision.ledger_size, ledger_root=decision.ledger_head, at=decision.at, subjects=users)
