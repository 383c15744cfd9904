"""Synthetic short-video merchants: the demo's default data, generated rather than shipped.

Why synthetic: real merchant logs are exactly what this project must never copy around, yet the
demo, tests and benchmarks need silos that *behave* like shops. Each merchant is non-IID (own
category, size, price level, channel mix, engagement and base retention), sizes are heavy-tailed,
and retention is *driven by observable behaviour*, so a model can learn it.

Behaviour model (per user, vectorised over users and events; no per-event Python loop):

* a latent loyalty ``s = z + effect(referral) + effect(member_tier) + effect(city_tier) + merchant``;
* a first purchase (acquisition) at a uniform time in the window, preceded by a few discovery views;
* an *active* spell after acquisition, exponentially long with a hazard falling in ``s``; while
  active the user buys as a Poisson process with a rate rising in ``s`` and produces views (watch
  time rising in ``s``), likes, comments, shares, favourites, abandoned carts and maybe a follow;
* after the spell the user is *dormant*: no purchases and only a trickle of engagement.

So recency, frequency, monetary value, watch time, engagement, abandoned carts, referral and
membership all carry information about a purchase in the next 30 days. ``data_end`` is inclusive
(a whole day, as ``clients.node`` reads it). Calibrated on 20k users, seeds 0..7, with the
cutoff 30 days before the end of ``data_end`` (checked from the files in ``tests/test_synth.py``):

* 30-day repeat-purchase rate of users who bought before the cutoff: 0.28..0.31;
* first-month retention, the share of new buyers (first purchase at least 30 days before the
  end) who buy again within 30 days of their first purchase: 0.44..0.47 for ``friend_share``,
  0.26..0.29 for ``organic``;
* members (tier != none) about 1.9x as likely to repeat as non-members;
* held-out AUC 0.83..0.84 for a logistic regression on simple RFM + engagement features (RFM alone ~0.77).

``mode="rare-repeat"`` is a long-tail marketplace instead: thousands of small sellers with a few
customers each beside a few large ones (``marketplace_sizes``), and buyers who rarely come back
(purchase rate × ``_RARE_RATE``, churn hazard × ``_RARE_CHURN``): the 30-day repeat-purchase rate
is 1..3 % (checked in ``tests/test_synth_rare.py``), the regime where a plain logistic regression
is hard to beat and a model must handle rare positives.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from fedretain.atomic import write_atomic
from fedretain.consent.vocab import SCOPES, check_purpose, check_scopes
from fedretain.ingest import write_table
from fedretain.schema import CHANNELS, EVENT_COLUMN_NAMES, EVENT_TYPES, MEMBER_TIERS, REFERRALS, USER_COLUMN_NAMES
from fedretain.synth_sizes import marketplace_sizes, merchant_sizes, n_large_sellers

__all__ = ["MODES", "SILO_FILES", "MerchantProfile", "SyntheticSilo", "generate", "make_profiles", "marketplace_sizes",
           "merchant_sizes", "n_large_sellers", "simulate", "write_silo"]

SILO_FILES = ("events.csv", "users.csv", "consent.csv", "merchant.json")
_EV = {name: i for i, name in enumerate(EVENT_TYPES)}
_SEC_PER_DAY = 86_400

# --- behaviour constants (calibrated together; see module docstring) -----------------------------
_B_FRIEND = 0.9  # loyalty shift of friend_share referral
_B_TIER = np.array([0.0, 0.9, 1.3, 1.7])  # none, silver, gold, platinum
_B_CITY = np.array([0.15, 0.08, 0.0, -0.08, -0.15])  # city tiers 1..5
_CITY_P = np.array([0.14, 0.24, 0.27, 0.2, 0.15])
_ALPHA = 0.9  # purchase rate elasticity in loyalty
_GAMMA = 0.75  # churn hazard elasticity in loyalty
_BASE_S = -0.55  # global loyalty offset
_DORMANT = 0.05  # engagement of a dormant user relative to an active one
_RATE_SCALE = 0.195  # scales the relative purchase frequencies of _CATEGORIES to purchases per day
_CHURN = 0.003  # churn hazard per day at loyalty 0
# content events per active day per unit engagement, relative to views
_CONTENT_RATES = {"like": 0.22, "comment": 0.05, "share": 0.035, "favorite": 0.06}
_CONTENT = ("view", "like", "comment", "share", "follow", "favorite")


@dataclass(frozen=True)
class MerchantProfile:
    """What makes one synthetic merchant different from another (non-IID knobs)."""

    merchant_id: str
    name: str
    category: str
    subcategories: tuple[str, ...]
    price_median: float  # median order value
    price_sigma: float  # log-sd of order values
    loyalty: float  # merchant shift of the latent loyalty
    purchase_rate: float  # purchases per active day at loyalty 0
    churn_rate: float  # hazard of leaving the active spell per day at loyalty 0
    engagement: float  # engagement level (scales every content event)
    views_per_day: float  # views per active day at engagement 1
    watch_median: float  # median seconds watched per view
    content_mix: tuple[float, float, float, float]  # channel shares of content events
    commerce_mix: tuple[float, float, float, float]  # channel shares of carts and purchases
    refund_rate: float
    friend_share: float  # share of users acquired through a friend's share
    member_share: float  # share of users with a member tier
    consent_rates: tuple[float, float, float]  # retention_modeling, analytics, ltv_modeling opt-in


# category, subcategories, price median, price sigma, loyalty, purchase rate, engagement, watch median,
# content mix, commerce mix (short_video, live, search, shelf), refund rate
_CATEGORIES = (
    ("beauty", ("skincare", "makeup", "haircare", "fragrance"), 28, 0.5, 0.10, 0.060, 1.3, 22,
     (0.50, 0.40, 0.06, 0.04), (0.35, 0.45, 0.12, 0.08), 0.04),
    ("apparel", ("tops", "dresses", "shoes", "outerwear"), 55, 0.6, -0.05, 0.045, 1.0, 18,
     (0.60, 0.30, 0.06, 0.04), (0.40, 0.30, 0.18, 0.12), 0.11),
    ("snacks", ("nuts", "chips", "candy", "tea"), 9, 0.4, 0.25, 0.090, 0.8, 12,
     (0.70, 0.20, 0.05, 0.05), (0.45, 0.20, 0.15, 0.20), 0.01),
    ("electronics", ("phones", "audio", "chargers", "wearables"), 140, 0.9, -0.30, 0.030, 0.9, 35,
     (0.45, 0.25, 0.20, 0.10), (0.20, 0.20, 0.40, 0.20), 0.06),
    ("home", ("kitchen", "bedding", "storage", "decor"), 35, 0.7, 0.0, 0.045, 0.9, 20,
     (0.55, 0.25, 0.10, 0.10), (0.30, 0.25, 0.20, 0.25), 0.03),
    ("pets", ("food", "toys", "grooming", "beds"), 24, 0.5, 0.20, 0.070, 1.1, 25,
     (0.60, 0.25, 0.10, 0.05), (0.35, 0.25, 0.20, 0.20), 0.02),
    ("sports", ("fitness", "outdoor", "cycling", "yoga"), 45, 0.7, -0.10, 0.040, 1.0, 28,
     (0.55, 0.30, 0.10, 0.05), (0.30, 0.30, 0.25, 0.15), 0.05),
    ("books", ("fiction", "kids", "study", "comics"), 15, 0.4, 0.05, 0.050, 0.7, 15,
     (0.50, 0.15, 0.25, 0.10), (0.25, 0.10, 0.40, 0.25), 0.02),
)
_CONSENT_RATES = (0.72, 0.66, 0.80, 0.58, 0.85, 0.62, 0.76, 0.69)
# probability that a grant of the purpose includes the scope (scopes not named: never)
_SCOPE_KEYS = ("purchase_history", "viewing_behavior", "engagement", "social", "profile", "location", "device")
_SCOPE_P = {
    "retention_modeling": dict(zip(_SCOPE_KEYS, (0.97, 0.88, 0.84, 0.45, 0.42, 0.33, 0.10), strict=True)),
    "analytics": dict(zip(_SCOPE_KEYS, (0.95, 0.80, 0.75, 0.35, 0.30, 0.30, 0.15), strict=True)),
    "ltv_modeling": dict(zip(_SCOPE_KEYS, (0.98, 0.60, 0.60, 0.25, 0.35, 0.20, 0.05), strict=True)),
}
_WITHDRAW_RATE = 0.04
MODES = ("default", "rare-repeat")
# rare-repeat marketplace: fewer repeat purchases, shorter active spells, a few large sellers
_RARE_RATE = 0.045
_RARE_CHURN = 2.0
_EXPIRING_RATE = 0.03


@dataclass
class SyntheticSilo:
    """One generated merchant: metadata plus the three tables of its silo folder."""

    merchant: dict
    events: pd.DataFrame
    users: pd.DataFrame
    consent: pd.DataFrame


def make_profiles(n_merchants: int, rng: np.random.Generator, mode: str = "default") -> list[MerchantProfile]:
    """One profile per merchant: categories cycle, every knob gets a little per-merchant jitter."""
    rare = mode == "rare-repeat"
    out = []
    for k in range(n_merchants):
        (cat, subs, price, psig, loy, prate, eng, watch, cmix, kmix, refund) = _CATEGORIES[k % len(_CATEGORIES)]
        j = rng.normal(size=6)
        mid = f"seller_{k:04d}" if rare else f"merchant_{k:02d}"
        c0 = float(np.clip(_CONSENT_RATES[k % len(_CONSENT_RATES)] + 0.02 * j[5], 0.55, 0.85))
        out.append(
            MerchantProfile(
                merchant_id=mid,
                name=f"{cat.title()} seller {k:04d}" if rare else f"{cat.title()} shop {k:02d}",
                category=cat,
                subcategories=subs,
                price_median=round(price * float(np.exp(0.15 * j[0])), 2),
                price_sigma=psig,
                loyalty=loy + 0.05 * float(j[1]),
                purchase_rate=_RATE_SCALE * prate * (_RARE_RATE if rare else 1.0),
                churn_rate=_CHURN * (_RARE_CHURN if rare else 1.0),
                engagement=eng * float(np.exp(0.1 * j[2])),
                views_per_day=0.1,
                watch_median=float(watch),
                content_mix=cmix,
                commerce_mix=kmix,
                refund_rate=refund,
                friend_share=float(np.clip(0.35 + 0.05 * j[3], 0.2, 0.5)),
                member_share=float(np.clip(0.2 + 0.04 * j[4], 0.1, 0.3)),
                consent_rates=(c0, min(0.95, c0 + 0.1), max(0.3, c0 - 0.2)),
            )
        )
    return out


def _spread(rng: np.random.Generator, counts: np.ndarray, lo: np.ndarray,
            hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Expand per-user counts to (user index, time uniform in [lo, hi)) per event."""
    uidx = np.repeat(np.arange(counts.size), counts)
    return uidx, lo[uidx] + rng.random(uidx.size) * (hi - lo)[uidx]


def _concat(*pairs: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate (user index, time) pairs of several ``_spread`` calls."""
    return np.concatenate([u for u, _ in pairs]), np.concatenate([t for _, t in pairs])


def _zipf_items(rng: np.random.Generator, n_items: int, size: int) -> np.ndarray:
    p = 1.0 / np.arange(1, n_items + 1)
    return rng.choice(n_items, size=size, p=p / p.sum())


class _Blocks:
    """Collects event blocks as parallel arrays; concatenated once at the end (no per-event loop)."""

    def __init__(self, rng: np.random.Generator, p: MerchantProfile) -> None:
        self.rng, self.p = rng, p
        self.parts: list[tuple[np.ndarray, ...]] = []

    def add(self, ev: str, u: np.ndarray, t: np.ndarray, *, amount=None, watch=None, item=None, channel=None) -> None:
        m, content = u.size, ev in _CONTENT
        if item is None:
            item = _zipf_items(self.rng, _N_VIDEOS if content else _N_PRODUCTS, m)
        if channel is None:
            channel = self.rng.choice(4, size=m, p=self.p.content_mix if content else self.p.commerce_mix)
        zeros = np.zeros(m)
        self.parts.append((u, t, np.full(m, _EV[ev], np.int8), zeros if amount is None else amount,
                           zeros if watch is None else watch, item + (0 if content else _N_VIDEOS), channel))

    def arrays(self) -> list[np.ndarray]:
        return [np.concatenate(col) for col in zip(*self.parts, strict=True)]


_N_VIDEOS, _N_PRODUCTS = 400, 150


def _simulate(p: MerchantProfile, n: int, rng: np.random.Generator, days: float) -> tuple[list[np.ndarray], dict]:
    """Event arrays (user, time in days since window start, event, amount, watch, item, channel) and user columns."""
    friend = rng.random(n) < p.friend_share
    tier_p = np.array([1 - p.member_share, 0.6 * p.member_share, 0.3 * p.member_share, 0.1 * p.member_share])
    tier = rng.choice(4, size=n, p=tier_p)
    city = rng.choice(5, size=n, p=_CITY_P)
    s = rng.standard_normal(n) + _B_FRIEND * friend + _B_TIER[tier] + _B_CITY[city] + p.loyalty + _BASE_S
    acq = rng.random(n) * days
    rate = p.purchase_rate * np.exp(_ALPHA * s)
    end = np.minimum(acq + rng.exponential(1.0 / (p.churn_rate * np.exp(-_GAMMA * s))), days)
    active, dormant, horizon = end - acq, days - end, np.full(n, days)
    eng = p.engagement * np.exp(0.6 * s + 0.15 * rng.standard_normal(n))
    b = _Blocks(rng, p)

    # purchases: the first at acquisition, repeats as a Poisson process over the active spell
    ru, rt = _spread(rng, rng.poisson(rate * active), acq, end)
    pu, pt = np.concatenate([np.arange(n), ru]), np.concatenate([acq, rt])
    spend = np.log(p.price_median) + 0.15 * s + 0.3 * rng.standard_normal(n)
    amount = np.round(np.maximum(np.exp(spend[pu] + p.price_sigma * rng.standard_normal(pu.size)), 0.5), 2)
    pitem = _zipf_items(rng, _N_PRODUCTS, pu.size)
    pch = rng.choice(4, size=pu.size, p=p.commerce_mix)
    b.add("purchase", pu, pt, amount=amount, item=pitem, channel=pch)
    # most purchases are preceded by a cart of the same item; abandoned carts rise with intent
    pre = rng.random(pu.size) < 0.65
    b.add("cart", pu[pre], np.maximum(pt[pre] - rng.random(pre.sum()) / 24, 0), item=pitem[pre], channel=pch[pre])
    cart_end = np.maximum(end, np.minimum(acq + 1, days))  # a short spell still leaves a day to browse
    b.add("cart", *_spread(rng, rng.poisson(1.2 * rate * active + 0.3), acq, cart_end))
    # refunds: a few purchases come back (fewer for loyal users), through the purchase's channel
    ref = rng.random(pu.size) < p.refund_rate * np.exp(-0.3 * s[pu])
    rt = pt + 1 + 13 * rng.random(pu.size)
    ref &= rt < days
    part = np.where(rng.random(pu.size) < 0.8, 1.0, 0.3 + 0.6 * rng.random(pu.size))
    b.add("refund", pu[ref], rt[ref], amount=np.maximum(np.round(amount * part, 2), 0.01)[ref], item=pitem[ref],
          channel=pch[ref])

    # views: discovery before acquisition, many while active, a trickle while dormant
    vrate = p.views_per_day * eng
    vu, vt = _concat(_spread(rng, rng.poisson(1.0 + 2.0 * np.sqrt(eng)), np.maximum(acq - 14, 0), acq),
                     _spread(rng, rng.poisson(vrate * active), acq, end),
                     _spread(rng, rng.poisson(vrate * _DORMANT * dormant), end, horizon))
    watch = np.exp(np.log(p.watch_median) + 0.35 * s[vu] + 0.9 * rng.standard_normal(vu.size))
    b.add("view", vu, vt, watch=np.round(np.clip(watch, 1, 1800), 1))
    for ev, r in _CONTENT_RATES.items():
        r_u = vrate * r * np.where(friend & (ev == "share"), 1.8, 1.0)
        b.add(ev, *_concat(_spread(rng, rng.poisson(r_u * active), acq, end),
                           _spread(rng, rng.poisson(r_u * _DORMANT * dormant), end, horizon)))
    follows = rng.random(n) < 1 / (1 + np.exp(-(s - 0.5)))
    b.add("follow", *_spread(rng, follows.astype(np.int64), acq, end))
    users = {"referral": np.where(friend, "friend_share", "organic"),
             "member_tier": np.asarray(MEMBER_TIERS)[tier], "city_tier": city + 1}
    return b.arrays(), users


def _take_strings(names: np.ndarray, codes: np.ndarray) -> pd.api.extensions.ExtensionArray:
    """``names[codes]`` as a pandas string array, built in arrow (~15x faster than from Python strings)."""
    return pd.arrays.ArrowStringArray(pa.array(names, pa.string()).take(pa.array(codes)))


def _iso(epoch_seconds: np.ndarray) -> np.ndarray:
    """ISO 8601 UTC strings ("...Z") for epoch seconds, vectorised."""
    t = np.datetime64(0, "s") + epoch_seconds.astype("timedelta64[s]")
    return np.char.add(np.datetime_as_string(t, unit="s"), "Z").astype(object)


def _consent(p: MerchantProfile, user_ids: np.ndarray, first_s: np.ndarray, end_s: int,
             rng: np.random.Generator) -> pd.DataFrame:
    """Consent import rows: grants at first activity, a few expiring grants, a few later withdrawals."""
    n, k = user_ids.size, len(SCOPES)
    combos = np.array([";".join(SCOPES[j] for j in range(k) if m >> j & 1) for m in range(1 << k)], dtype=object)
    bits = 1 << np.arange(k)
    base = SCOPES.index("purchase_history")
    rows = []
    for purpose, rate in zip(("retention_modeling", "analytics", "ltv_modeling"), p.consent_rates, strict=True):
        check_purpose(purpose)
        check_scopes(_SCOPE_P[purpose])
        g = np.flatnonzero(rng.random(n) < rate)
        sc = rng.random((g.size, k)) < np.array([_SCOPE_P[purpose].get(x, 0.0) for x in SCOPES])
        sc[~sc.any(axis=1), base] = True  # a grant names at least one scope
        eff = first_s[g] - rng.integers(0, 600, g.size)  # the app's consent dialog, just before first use
        exp = np.where(rng.random(g.size) < _EXPIRING_RATE, eff + rng.integers(30, 200, g.size) * _SEC_PER_DAY, -1)
        rows.append(pd.DataFrame({"subject_id": user_ids[g], "purpose": purpose, "scopes": combos[sc @ bits],
                                  "action": "grant", "t": eff, "exp": exp,
                                  "collection_method": np.where(rng.random(g.size) < 0.85, "app_dialog", "web_form")}))
        # withdrawals: some of everything (empty scopes), some of a part of what was granted
        w = (rng.random(g.size) < _WITHDRAW_RATE) & (eff + _SEC_PER_DAY < end_s)
        wt = eff[w] + _SEC_PER_DAY + (rng.random(w.sum()) * (end_s - 1 - eff[w] - _SEC_PER_DAY)).astype(np.int64)
        partial = (sc[w] & (rng.random((w.sum(), k)) < 0.5)) & ~np.eye(k, dtype=bool)[base]  # keep purchases
        wsc = np.where((rng.random(w.sum()) < 0.5) & partial.any(axis=1), combos[partial @ bits], "")
        rows.append(pd.DataFrame({"subject_id": user_ids[g][w], "purpose": purpose, "scopes": wsc,
                                  "action": "withdraw", "t": wt, "exp": -1, "collection_method": "app_settings"}))
    c = pd.concat(rows, ignore_index=True).sort_values(["t", "subject_id", "action"], kind="stable", ignore_index=True)
    for v in c["scopes"].unique():
        if v:
            check_scopes(v)
    exp_ = c["exp"].to_numpy()
    return pd.DataFrame({
        "record_id": [f"{p.merchant_id}-c{i:07d}" for i in range(len(c))],
        "subject_id": c["subject_id"].to_numpy(), "controller": p.merchant_id, "purpose": c["purpose"].to_numpy(),
        "scopes": c["scopes"].to_numpy(), "action": c["action"].to_numpy(),
        "effective_at": _iso(c["t"].to_numpy()),
        "expires_at": np.where(exp_ >= 0, _iso(np.maximum(exp_, 0)), ""),
        "collection_method": c["collection_method"].to_numpy(), "notice_version": "privacy-notice-2026-03",
        "jurisdiction": "CN", "recorded_by": "fedretain.synth"})


def simulate(n_merchants: int = 5, n_users: int = 20_000, seed: int = 0, *, data_end: str = "2026-10-31",
             days: int = 180, mode: str = "default") -> list[SyntheticSilo]:
    """Generate the merchants in memory (see ``generate`` for the files). Deterministic for a seed."""
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    if mode not in MODES:
        raise ValueError(f"unknown synthetic mode {mode!r}; choose one of {', '.join(MODES)}")
    last_day = pd.Timestamp(data_end).normalize()
    start = last_day + pd.Timedelta(days=1 - days)  # ``days`` whole days, the last one being data_end
    seqs = np.random.SeedSequence(seed).spawn(n_merchants + 1)
    top = np.random.default_rng(seqs[0])
    sizes = (marketplace_sizes if mode == "rare-repeat" else merchant_sizes)(n_users, n_merchants, top)
    silos = []
    for p, n, sq in zip(make_profiles(n_merchants, top, mode), sizes, seqs[1:], strict=True):
        rng = np.random.default_rng(sq)
        (u, t, ev, amount, watch, item, ch), attrs = _simulate(p, int(n), rng, float(days))
        secs = np.minimum((t * _SEC_PER_DAY).astype(np.int64), days * _SEC_PER_DAY - 1)  # on or before data_end
        order = np.lexsort((ev, u, secs))
        u, secs, ev, amount, watch, item, ch = (a[order] for a in (u, secs, ev, amount, watch, item, ch))
        ids = np.array([f"u{i:06d}" for i in range(n)], dtype=object)
        names = np.array([f"v{i:04d}" for i in range(_N_VIDEOS)] + [f"p{i:04d}" for i in range(_N_PRODUCTS)],
                         dtype=object)
        cats = np.asarray(p.subcategories, dtype=object)[np.arange(_N_VIDEOS + _N_PRODUCTS) % len(p.subcategories)]
        events = pd.DataFrame({
            "user_id": _take_strings(ids, u),
            "ts": (start.to_datetime64().astype("datetime64[s]") + secs.astype("timedelta64[s]")).astype("M8[ns]"),
            "event": pd.Categorical.from_codes(ev, categories=EVENT_TYPES),
            "item_id": _take_strings(names, item), "category": _take_strings(cats, item),
            "amount": amount, "watch_seconds": watch,
            "channel": pd.Categorical.from_codes(ch, categories=CHANNELS)})
        users = pd.DataFrame({"user_id": pd.array(ids, dtype="string"),
                              "referral": pd.Categorical(attrs["referral"], categories=REFERRALS),
                              "member_tier": pd.Categorical(attrs["member_tier"], categories=MEMBER_TIERS),
                              "city_tier": pd.array(attrs["city_tier"], dtype="Int64")})
        first = np.full(n, np.iinfo(np.int64).max)
        np.minimum.at(first, u, secs)
        base = int(start.timestamp())
        consent = _consent(p, ids, first + base, base + days * _SEC_PER_DAY, rng)
        merchant = {"merchant_id": p.merchant_id, "name": p.name, "category": p.category,
                    "data_end": last_day.strftime("%Y-%m-%d"), "source": "synthetic", "seed": seed,
                    "window_days": days, "n_users": int(n), "mode": mode}
        silos.append(SyntheticSilo(merchant, events[list(EVENT_COLUMN_NAMES)], users[list(USER_COLUMN_NAMES)], consent))
    return silos


def _write_json(obj: dict, path: Path) -> None:
    """JSON through a temp file and ``os.replace``: a reader never sees half a ``merchant.json``."""
    write_atomic(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"), mode=0o644)


def write_silo(path: str | os.PathLike, merchant: dict, events: pd.DataFrame, users: pd.DataFrame,
               consent: pd.DataFrame) -> Path:
    """Write one silo folder (events.csv, users.csv, consent.csv, merchant.json), each file atomically.

    Refuses a folder holding anything else (a stale ``events.parquet`` or ``mapping.json`` would
    change what a node reads; a ``.node/`` ledger holds consent imported from an older
    ``consent.csv``); the four files of an earlier run are replaced.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    foreign = sorted(f.name for f in path.iterdir() if f.name not in SILO_FILES)
    if foreign:
        raise FileExistsError(f"{path}: silo folder already holds {foreign}; use an empty or new folder")
    for name, df in (("events.csv", events), ("users.csv", users), ("consent.csv", consent)):
        write_table(df, path / name)
    _write_json(merchant, path / "merchant.json")
    return path


def generate(out_dir: str | os.PathLike, n_merchants: int = 5, n_users: int = 20_000, seed: int = 0, *,
             data_end: str = "2026-10-31", days: int = 180, mode: str = "default") -> list[Path]:
    """Write ``out_dir/merchant_00`` ... (largest first); return the silo folders.

    ``n_users`` is the total over merchants. ``data_end`` is inclusive (a whole day, as a node reads
    it): every timestamp falls on one of the ``days`` days ending with ``data_end``.
    """
    out = Path(out_dir)
    return [write_silo(out / s.merchant["merchant_id"], s.merchant, s.events, s.users, s.consent)
            for s in simulate(n_merchants, n_users, seed, data_end=data_end, days=days, mode=mode)]
