"""The event schema of a short-video shop: one vocabulary every module agrees on.

A merchant silo is a folder holding:

* ``events.csv`` or ``events.parquet`` — one row per user action (columns below);
* ``users.csv`` or ``users.parquet`` — one row per user (attributes below);
* ``consent.csv`` — consent events to import into the node's consent ledger;
* ``merchant.json`` — merchant metadata (id, name, category, data end date);
* optionally ``mapping.json`` — the merchant's own column names and event labels.

Timestamps are stored as timezone-naive UTC ``datetime64[ns]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

SCHEMA_VERSION = "1"

EVENT_TYPES: tuple[str, ...] = (
    "view", "like", "comment", "share", "follow", "favorite", "cart", "purchase", "refund",
)
CHANNELS: tuple[str, ...] = ("short_video", "live", "search", "shelf")
REFERRALS: tuple[str, ...] = ("friend_share", "organic")
MEMBER_TIERS: tuple[str, ...] = ("none", "silver", "gold", "platinum")
CITY_TIERS: tuple[int, ...] = (1, 2, 3, 4, 5)

# Events whose ``amount`` must be positive (money changed hands).
MONETARY_EVENTS: frozenset[str] = frozenset({"purchase", "refund"})


@dataclass(frozen=True)
class Column:
    """One column of a table: its name, dtype, whether it must be present, and why it exists."""

    name: str
    dtype: str  # "str" | "datetime" | "category" | "float" | "int"
    required: bool
    doc: str


EVENT_COLUMNS: tuple[Column, ...] = (
    Column("user_id", "str", True, "pseudonymous user id, unique within the merchant"),
    Column("ts", "datetime", True, "when the event happened (ISO 8601 or epoch seconds, UTC)"),
    Column("event", "category", True, "one of EVENT_TYPES"),
    Column("item_id", "str", False, "product or video id"),
    Column("category", "str", False, "product category"),
    Column("amount", "float", False, "order value for purchase/refund (> 0); 0 otherwise"),
    Column("watch_seconds", "float", False, "seconds watched, for view events; 0 otherwise"),
    Column("channel", "category", False, "one of CHANNELS"),
)

USER_COLUMNS: tuple[Column, ...] = (
    Column("user_id", "str", True, "pseudonymous user id"),
    Column("referral", "category", False, "friend_share or organic (how the user arrived)"),
    Column("member_tier", "category", False, "one of MEMBER_TIERS"),
    Column("city_tier", "int", False, "1 (largest cities) .. 5"),
)

EVENT_COLUMN_NAMES: tuple[str, ...] = tuple(c.name for c in EVENT_COLUMNS)
USER_COLUMN_NAMES: tuple[str, ...] = tuple(c.name for c in USER_COLUMNS)

# Which consent scope each event type belongs to. The consent gate drops an event whose
# scope the user did not grant before any feature sees it; all of the event's columns
# (amount, watch_seconds, channel, item, category) travel with that scope.
EVENT_SCOPE: dict[str, str] = {
    "view": "viewing_behavior",
    "like": "engagement",
    "comment": "engagement",
    "favorite": "engagement",
    "cart": "engagement",
    "share": "social",
    "follow": "social",
    "purchase": "purchase_history",
    "refund": "purchase_history",
}

# Which consent scope each user attribute belongs to.
ATTRIBUTE_SCOPE: dict[str, str] = {
    "referral": "social",
    "member_tier": "profile",
    "city_tier": "location",
}


def empty_events() -> pd.DataFrame:
    """An events frame with the canonical columns and dtypes and no rows."""
    return pd.DataFrame(
        {
            "user_id": pd.Series([], dtype="string"),
            "ts": pd.Series([], dtype="datetime64[ns]"),
            "event": pd.Series(pd.Categorical([], categories=EVENT_TYPES)),
            "item_id": pd.Series([], dtype="string"),
            "category": pd.Series([], dtype="string"),
            "amount": pd.Series([], dtype="float64"),
            "watch_seconds": pd.Series([], dtype="float64"),
            "channel": pd.Series(pd.Categorical([], categories=CHANNELS)),
        }
    )


def empty_users() -> pd.DataFrame:
    """A users frame with the canonical columns and dtypes and no rows."""
    return pd.DataFrame(
        {
            "user_id": pd.Series([], dtype="string"),
            "referral": pd.Series(pd.Categorical([], categories=REFERRALS)),
            "member_tier": pd.Series(pd.Categorical([], categories=MEMBER_TIERS)),
            "city_tier": pd.Series([], dtype="Int64"),
        }
    )


def canonical_events(df: pd.DataFrame) -> pd.DataFrame:
    """Coerce an already-valid events frame to the canonical dtypes (no validation here)."""
    out = pd.DataFrame(
        {
            "user_id": df["user_id"].astype("string"),
            "ts": pd.to_datetime(df["ts"]).astype("datetime64[ns]"),
            "event": pd.Categorical(df["event"], categories=EVENT_TYPES),
            "item_id": (df["item_id"] if "item_id" in df else pd.Series(pd.NA, index=df.index)).astype("string"),
            "category": (df["category"] if "category" in df else pd.Series(pd.NA, index=df.index)).astype("string"),
            "amount": (df["amount"] if "amount" in df else pd.Series(0.0, index=df.index))
            .astype("float64").fillna(0.0),
            "watch_seconds": (df["watch_seconds"] if "watch_seconds" in df else pd.Series(0.0, index=df.index))
            .astype("float64")
            .fillna(0.0),
            "channel": pd.Categorical(df["channel"] if "channel" in df else [None] * len(df), categories=CHANNELS),
        }
    )
    return out.reset_index(drop=True)


def canonical_users(df: pd.DataFrame) -> pd.DataFrame:
    """Coerce an already-valid users frame to the canonical dtypes (no validation here)."""
    n = len(df)
    return pd.DataFrame(
        {
            "user_id": df["user_id"].astype("string"),
            "referral": pd.Categorical(df["referral"] if "referral" in df else [None] * n, categories=REFERRALS),
            "member_tier": pd.Categorical(
                df["member_tier"] if "member_tier" in df else [None] * n, categories=MEMBER_TIERS
            ),
            "city_tier": (df["city_tier"] if "city_tier" in df else pd.Series([pd.NA] * n)).astype("Int64"),
        }
    ).reset_index(drop=True)
