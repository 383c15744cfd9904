"""Labels: did the user buy again within the horizon after the cutoff, and how much.

Labels read purchases in ``[cutoff, cutoff + horizon)`` only: the half-open window
that starts exactly where features stop, so no event is both feature and label.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

LABEL_SCOPE = "purchase_history"  # labels read purchases: a user must grant this to be a training example


def make_labels(
    events: pd.DataFrame, user_ids: pd.Index, cutoff: pd.Timestamp | str, horizon_days: float = 30
) -> pd.DataFrame:
    """Per user: ``repurchase`` (1 if any purchase in the horizon) and ``spend`` (net of refunds, >= 0)."""
    if horizon_days <= 0:
        raise ValueError(f"horizon_days must be positive, got {horizon_days}")
    cutoff = pd.Timestamp(cutoff)
    end = cutoff + pd.Timedelta(days=float(horizon_days))
    window = events[(events["ts"] >= cutoff) & (events["ts"] < end)]
    buys = window[window["event"] == "purchase"].groupby("user_id", observed=True)["amount"]
    refunds = window[window["event"] == "refund"].groupby("user_id", observed=True)["amount"].sum()
    idx = pd.Index(user_ids, name="user_id").astype("string")
    count = buys.size().reindex(idx, fill_value=0)
    spend = buys.sum().reindex(idx, fill_value=0.0) - refunds.reindex(idx, fill_value=0.0)
    return pd.DataFrame(
        {"repurchase": (count.to_numpy() > 0).astype(np.float32), "spend": spend.clip(lower=0.0).to_numpy()},
        index=idx,
    )
