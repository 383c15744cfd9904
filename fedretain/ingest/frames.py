"""Canonical polars batches → the pandas frames the rest of fedretain works on (the edge).

Columns arrive as Arrow buffers: numbers and timestamps are handed over without copying, text
becomes pyarrow-backed pandas strings, enums become pandas categoricals from their codes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa

from fedretain.schema import CHANNELS, EVENT_TYPES, MEMBER_TIERS, REFERRALS, empty_events, empty_users

__all__ = ["events_frame", "users_frame"]


def _take(frames: list[pl.DataFrame], name: str) -> list[pl.Series]:
    """Column ``name`` of every batch, dropped from the batches so its memory goes as soon as it is converted."""
    parts = [f.get_column(name) for f in frames]
    frames[:] = [f.drop(name) for f in frames]
    return parts


def _strings(parts: list[pl.Series]) -> pd.Series:
    chunks = [p.to_arrow(compat_level=pl.CompatLevel.oldest()) for p in parts]  # large_string, as pandas wraps
    return pd.Series(pd.arrays.ArrowStringArray(pa.chunked_array(chunks, pa.large_string())))


def _numbers(parts: list[pl.Series]) -> np.ndarray:
    return np.concatenate([p.to_numpy() for p in parts])


def _categorical(parts: list[pl.Series], categories: tuple[str, ...]) -> pd.Categorical:
    codes = np.concatenate([p.to_physical().cast(pl.Int16).fill_null(-1).to_numpy() for p in parts])
    return pd.Categorical.from_codes(codes, categories=list(categories))


def events_frame(frames: list[pl.DataFrame]) -> pd.DataFrame:
    """Canonical events (``schema.empty_events`` dtypes) from the accepted batches, which it empties."""
    if not frames:
        return empty_events()
    return pd.DataFrame({
        "user_id": _strings(_take(frames, "user_id")),
        "ts": _numbers(_take(frames, "ts")),
        "event": _categorical(_take(frames, "event"), EVENT_TYPES),
        "item_id": _strings(_take(frames, "item_id")),
        "category": _strings(_take(frames, "category")),
        "amount": _numbers(_take(frames, "amount")),
        "watch_seconds": _numbers(_take(frames, "watch_seconds")),
        "channel": _categorical(_take(frames, "channel"), CHANNELS),
    })


def users_frame(frames: list[pl.DataFrame]) -> pd.DataFrame:
    """Canonical users (``schema.empty_users`` dtypes) from the accepted batches, which it empties."""
    if not frames:
        return empty_users()
    city = pl.concat(_take(frames, "city_tier"))
    return pd.DataFrame({
        "user_id": _strings(_take(frames, "user_id")),
        "referral": _categorical(_take(frames, "referral"), REFERRALS),
        "member_tier": _categorical(_take(frames, "member_tier"), MEMBER_TIERS),
        "city_tier": pd.arrays.IntegerArray(city.fill_null(0).cast(pl.Int64).to_numpy(),
                                            city.is_null().to_numpy().astype(bool)),
    })
