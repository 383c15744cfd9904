"""Synthetic merchants written the way real shops export them, with the truth to check a mapping against.

Why: a mapping is only trusted when it recovers what is known. These writers take the synthetic
merchants of ``fedretain.synth.simulate`` and print their purchases and refunds as

* ``orderlines`` — one row per line item (InvoiceNo, StockCode, Quantity, UnitPrice, CustomerID
  printed as a float ``12471.0``, InvoiceDate ``MM/DD/YYYY HH:MM``, Country); refunds as invoices
  ``C…`` with negative quantities; postage/fee lines (``POST``, ``M``, ``BANK CHARGES``) and guest
  lines without a customer; ``customers.csv`` with the shop's own tier names (``VIP Gold``);
* ``marketplace`` — orders / order_items / order_payments / customers tables (a customer id per
  order, a person id per customer), with canceled and unavailable orders added.

Each silo gets the matching example mapping as ``mapping.json``, ``consent.csv`` keyed by the
shop's own person id (``12471``, not ``12471.0``), ``merchant.json`` and ``truth.csv``: per
person, purchases and spend (and refunds) as the export encodes them. Marketplace exports carry
no refund rows, so the synthetic refunds are left out there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from fedretain.ingest import write_table
from fedretain.synth import SyntheticSilo, simulate

SHAPES = ("orderlines", "marketplace")
TIER_NAMES = {"none": "Standard", "silver": "Silver Club", "gold": "VIP Gold", "platinum": "VIP Platinum"}
REFERRAL_NAMES = {"friend_share": "Friend referral", "organic": "Organic"}
FEE_CODES = ("POST", "M", "BANK CHARGES")
_FIRST_CUSTOMER = 12346


def generate_exports(out_dir: str | os.PathLike, shape: str, n_merchants: int = 2, n_users: int = 2_000,
                     seed: int = 0, *, data_end: str = "2026-10-31", days: int = 180) -> list[Path]:
    """Write one export-shaped silo per synthetic merchant into ``out_dir``; return the folders."""
    if shape not in SHAPES:
        raise ValueError(f"unknown export shape {shape!r}; choose one of {', '.join(SHAPES)}")
    out = Path(out_dir)
    paths = []
    for k, silo in enumerate(simulate(n_merchants, n_users, seed, data_end=data_end, days=days)):
        path = out / silo.merchant["merchant_id"]
        if path.exists() and any(path.iterdir()):
            raise FileExistsError(f"{path}: folder is not empty; use an empty or new folder")
        path.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, k, 1 + SHAPES.index(shape)])
        writer = _orderlines if shape == "orderlines" else _marketplace
        tables, truth, person = writer(silo, rng)
        for name, df in tables.items():
            write_table(df, path / name)
        consent = silo.consent.copy()
        consent["subject_id"] = consent["subject_id"].map(person)
        write_table(consent, path / "consent.csv")
        write_table(truth, path / "truth.csv")
        from fedretain.exports import example_mapping

        (path / "mapping.json").write_text(json.dumps(example_mapping(shape), indent=2) + "\n", encoding="utf-8")
        merchant = dict(silo.merchant, source=f"synthetic {shape} export")
        (path / "merchant.json").write_text(json.dumps(merchant, indent=2) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def _cents_split(rng: np.random.Generator, cents: int, k: int) -> np.ndarray:
    """``k`` positive integers summing to ``cents`` (fewer when ``cents < k``)."""
    k = max(1, min(k, cents))
    cuts = np.sort(rng.choice(np.arange(1, cents), size=k - 1, replace=False)) if k > 1 else np.array([], int)
    return np.diff(np.concatenate([[0], cuts, [cents]])).astype(np.int64)


def _money(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


def _orderlines(silo: SyntheticSilo, rng: np.random.Generator) -> tuple[dict, pd.DataFrame, dict]:
    ev = silo.events[silo.events["event"].isin(["purchase", "refund"])].reset_index(drop=True)
    codes = silo.users["user_id"].astype(str).str[1:].astype(int) + _FIRST_CUSTOMER
    person = dict(zip(silo.users["user_id"].astype(str), codes.astype(str)))
    country = rng.choice(["United Kingdom", "France", "Germany", "EIRE"], p=[0.85, 0.05, 0.05, 0.05])
    rows: list[tuple] = []
    truth: dict[str, list[float]] = {}
    inv, cinv = 536365, 580000
    for uid, ts, event, amount in zip(ev["user_id"].astype(str), ev["ts"], ev["event"].astype(str), ev["amount"]):
        cid = person[uid]
        when = ts.strftime("%m/%d/%Y %H:%M")
        cents = max(round(float(amount) * 100), 1)
        t = truth.setdefault(cid, [0, 0.0, 0, 0.0])
        if event == "refund":
            rows.append((f"C{cinv}", f"{rng.integers(20000, 90000)}", -1, _money(cents), f"{cid}.0", when, country))
            cinv += 1
            t[2] += 1
            t[3] += cents / 100
            continue
        number = str(inv)
        inv += 1
        total = 0
        parts = _cents_split(rng, cents, int(rng.integers(1, 5)))
        for j, part in enumerate(parts):
            q = 1 if j == len(parts) - 1 else int(rng.integers(1, 5))
            unit = cents - total if j == len(parts) - 1 else max(int(part) // q, 1)
            total += q * unit
            rows.append((number, f"{rng.integers(20000, 90000)}{rng.choice(['', 'A', 'B'])}", q, _money(unit),
                         f"{cid}.0", when, country))
        if rng.random() < 0.3:  # postage on the same invoice: not a purchase of goods
            rows.append((number, "POST", int(rng.integers(1, 3)), "18.00", f"{cid}.0", when, country))
        t[0] += 1
        t[1] += total / 100
    n_extra = max(1, len(ev) // 50)
    for i in range(n_extra):  # fee invoices and guest checkouts: to be skipped by rule, never counted
        when = ev["ts"].iloc[int(rng.integers(0, len(ev)))].strftime("%m/%d/%Y %H:%M")
        code = FEE_CODES[i % len(FEE_CODES)]
        cid = f"{rng.choice(list(person.values()))}.0"
        rows.append((str(inv), code, 1, f"{rng.integers(1, 40)}.00", cid, when, country))
        rows.append((str(inv + 1), f"{rng.integers(20000, 90000)}", 2, "3.75", "", when, country))
        inv += 2
    lines = pd.DataFrame(rows, columns=["InvoiceNo", "StockCode", "Quantity", "UnitPrice", "CustomerID",
                                       "InvoiceDate", "Country"])
    lines = lines.iloc[np.argsort(pd.to_datetime(lines["InvoiceDate"], format="%m/%d/%Y %H:%M"), kind="stable")]
    users = silo.users
    tiers = users["member_tier"].astype(str).map(TIER_NAMES).to_numpy(dtype=object)
    tiers[rng.random(len(tiers)) < 0.02] = "Staff"  # a tier the mapping does not know: becomes missing
    customers = pd.DataFrame({"CustomerID": [person[u] for u in users["user_id"].astype(str)], "Tier": tiers,
                              "Source": users["referral"].astype(str).map(REFERRAL_NAMES),
                              "CityTier": users["city_tier"].astype(str)})
    truth_df = pd.DataFrame([(k, *v) for k, v in truth.items()],
                            columns=["user_id", "purchases", "spend", "refunds", "refunded"])
    return {"order_lines.csv": lines.reset_index(drop=True), "customers.csv": customers}, truth_df, person


def _hex(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` 32-hex-digit ids, as marketplace exports print them."""
    return [rng.bytes(16).hex() for _ in range(n)]


def _marketplace(silo: SyntheticSilo, rng: np.random.Generator) -> tuple[dict, pd.DataFrame, dict]:
    ev = silo.events[silo.events["event"] == "purchase"].reset_index(drop=True)
    uids = silo.users["user_id"].astype(str).tolist()
    person = dict(zip(uids, _hex(rng, len(uids))))
    n_real = len(ev)
    n_bad = max(2, n_real // 30)
    pick = rng.integers(0, n_real, n_bad)
    uid = np.concatenate([ev["user_id"].astype(str).to_numpy(), ev["user_id"].astype(str).to_numpy()[pick]])
    ts = pd.concat([ev["ts"], ev["ts"].iloc[pick]], ignore_index=True)
    amount = np.concatenate([ev["amount"].to_numpy(float), ev["amount"].to_numpy(float)[pick]])
    status = np.concatenate([rng.choice(["delivered", "shipped", "invoiced"], n_real, p=[0.9, 0.07, 0.03]),
                             rng.choice(["canceled", "unavailable"], n_bad)])
    order_ids = _hex(rng, len(uid))
    cust_ids = _hex(rng, len(uid))
    orders, items, payments = [], [], []
    truth: dict[str, list[float]] = {}
    for i in range(len(uid)):
        cents = max(round(float(amount[i]) * 100), 2)
        when = ts.iloc[i]
        orders.append((order_ids[i], cust_ids[i], status[i], when.strftime("%Y-%m-%d %H:%M:%S"),
                       (when + pd.Timedelta(hours=1)).strftime("%Y-%m-%d %H:%M:%S"),
                       "" if status[i] != "delivered" else (when + pd.Timedelta(days=5)).strftime("%Y-%m-%d %H:%M:%S")))
        for j, part in enumerate(_cents_split(rng, cents, int(rng.integers(1, 4)))):
            freight = int(part * 0.15)
            items.append((order_ids[i], j + 1, rng.bytes(8).hex(), f"s{int(rng.integers(0, 40)):03d}",
                          _money(int(part) - freight), _money(freight)))
        for j, part in enumerate(_cents_split(rng, cents, 1 if rng.random() < 0.85 else 2)):
            payments.append((order_ids[i], j + 1, "credit_card" if j == 0 else "voucher", _money(int(part))))
        if i < n_real:
            t = truth.setdefault(person[uid[i]], [0, 0.0, 0, 0.0])
            t[0] += 1
            t[1] += cents / 100
    order_df = pd.DataFrame(orders, columns=["order_id", "customer_id", "order_status", "order_purchase_timestamp",
                                             "order_approved_at", "order_delivered_customer_date"])
    order_df = order_df.iloc[rng.permutation(len(order_df))].reset_index(drop=True)
    customers = pd.DataFrame({"customer_id": cust_ids, "customer_unique_id": [person[u] for u in uid],
                              "customer_zip_code_prefix": rng.integers(1000, 99999, len(uid)).astype(str),
                              "customer_state": rng.choice(["SP", "RJ", "MG", "RS", "BA"], len(uid))})
    tables = {"orders.csv": order_df,
              "order_items.csv": pd.DataFrame(items, columns=["order_id", "order_item_id", "product_id", "seller_id",
                                                              "price", "freight_value"]),
              "order_payments.csv": pd.DataFrame(payments, columns=["order_id", "payment_sequential", "payment_type",
                                                                    "payment_value"]),
              "customers.csv": customers.iloc[rng.permutation(len(customers))].reset_index(drop=True)}
    truth_df = pd.DataFrame([(k, *v) for k, v in truth.items()],
                            columns=["user_id", "purchases", "spend", "refunds", "refunded"])
    return tables, truth_df, person
