"""Canonical polars batches → the pandas frames the rest of fedretain works on (the edge).

Columns arrive as Arrow buffers: numbers and timestamps are handed over without copying, text
becomes pyarrow-backed pandas strings, enums become pandas categoricals from their codes.
"""

from __future__ import annotations

import pandas as pd
import polars as pl

from fedretain.schema import CHANNELS, EVENT_TYPES, MEMBER_TIERS, REFERRALS, empty_events, empty_users

__all__ = ["events_frame", "users_frame"]


def _strings(s: pl.Series) -> pd.Series:
    arr = s.to_arrow(compat_level=pl.CompatLevel.oldest())  # large_string, the type pandas strings wrap
    return pd.Series(pd.arrays.ArrowStringArray(arr))


def _categorical(s: pl.Series, categories: tuple[str, ...]) -> pd.Categorical:
    codes = s.to_physical().cast(pl.Int16).fill_null(-1).to_numpy()
    return pd.Categorical.from_codes(codes, categories=list(categories))


def events_frame(df: pl.DataFrame | None) -> pd.DataFrame:
    """Canonical events (``schema.empty_events`` dtypes) from the accepted polars rows."""
    if df is None or not df.height:
        return empty_events()
    df = df.rechunk()
    return pd.DataFrame({
        "user_id": _strings(df.get_column("user_id")),
        "ts": df.get_column("ts").to_numpy(),
        "event": _categorical(df.get_column("event"), EVENT_TYPES),
        "item_id": _strings(df.get_column("item_id")),
        "category": _strings(df.get_column("category")),
        "amount": df.get_column("amount").to_numpy(),
        "watch_seconds": df.get_column("watch_seconds").to_numpy(),
        "channel": _categorical(df.get_column("channel"), CHANNELS),
    })


def users_frame(df: pl.DataFrame | None) -> pd.DataFrame:
    """Canonical users (``schema.empty_users`` dtypes) from the accepted polars rows."""
    if df is None or not df.height:
        return empty_users()
    df = df.rechunk()
    city = df.get_column("city_tier")
    return pd.DataFrame({
        "user_id": _strings(df.get_column("user_id")),
        "referral": _categorical(df.get_column("referral"), REFERRALS),
        "member_tier": _categorical(df.get_column("member_tier"), MEMBER_TIERS),
        "city_tier": pd.arrays.IntegerArray(city.fill_null(0).cast(pl.Int64).to_numpy(),
                                            city.is_null().to_numpy().astype(bool)),
    })
