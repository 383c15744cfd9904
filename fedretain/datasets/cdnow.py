"""CDNOW: real purchase records of an online music retailer, turned into merchant silos.

The 23,570 customers who first bought at CDNOW in 1997 Q1, with every purchase through June 1998
(Fader, Hardie & Lee 2005). It is the project's real-data check: retention models trained on
synthetic merchants must also work on real repeat-buying behaviour. The package never needs the
file at run time; tests and benchmarks read it when it is there.

Conversion choices (documented, not guessed):

* every transaction becomes one ``purchase`` event: amount = dollar value, category ``music``,
  channel ``shelf`` (a web catalogue), no item id; CDNOW only has dates, so a customer's k-th
  transaction of a day (file order, k = 0, 1, ...) gets ``ts`` = that midnight + k seconds. Two
  identical CDs bought on the same day thus stay two events (ingest rejects exact duplicate rows
  and the master file has 255 such pairs), same-day order is kept, and no date changes;
* the 80 transactions with dollar value 0 are *not* events (the schema requires purchase amounts
  > 0 and inventing a price would be dishonest): ``import_cdnow`` lists them, with file line and
  silo, in ``out_dir/cdnow_excluded.csv`` and counts them in each silo's ``merchant.json``. Their
  customers (68 of whom have no other transaction) stay in ``users.csv`` and in the consent file;
* users have unknown attributes (CDNOW records none);
* consent: CDNOW customers never saw this project. Their records are a published research data
  set, so each customer gets a ``grant`` of ``purchase_history`` for ``retention_modeling``,
  ``ltv_modeling`` and ``analytics`` with collection method ``research_dataset``, effective
  1997-01-01; that states the legal basis honestly instead of pretending to an app dialog.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedretain.consent.vocab import check_purpose, check_scopes
from fedretain.ingest import write_table
from fedretain.schema import canonical_events, canonical_users
from fedretain.synth import write_silo

SPLITS: tuple[str, ...] = ("hash", "non-iid", "power-law")
N_CUSTOMERS = 23_570  # in CDNOW_master.txt
N_TRANSACTIONS = 69_659
MIN_SILO = 100  # smallest silo of the power-law split
POWER_LAW_EXPONENT = 0.7
CONSENT_PURPOSES = ("retention_modeling", "ltv_modeling", "analytics")
_COLUMNS = ("customer_id", "date", "number_of_cds", "dollar_value")


class CdnowFormatError(ValueError):
    """A CDNOW file that does not have the documented format; the message names file and line."""


@dataclass(frozen=True)
class CdnowProtocol:
    """The usual CDNOW evaluation protocol (39 weeks calibration, 39 weeks holdout).

    Day bounds are inclusive. In the project's half-open windows (features read ``ts < cutoff``,
    labels ``cutoff <= ts < cutoff + horizon``) that is ``cutoff = holdout_start`` and
    ``horizon_days = 273``, the same cutoff a node derives from ``data_end`` and the horizon.
    """

    start: pd.Timestamp = pd.Timestamp("1997-01-01")
    calibration_end: pd.Timestamp = pd.Timestamp("1997-09-30")
    holdout_start: pd.Timestamp = pd.Timestamp("1997-10-01")
    holdout_end: pd.Timestamp = pd.Timestamp("1998-06-30")
    data_end: str = "1998-06-30"

    @property
    def cutoff(self) -> pd.Timestamp:
        return self.holdout_start

    @property
    def horizon_days(self) -> int:
        return int((self.holdout_end - self.holdout_start).days) + 1


def cdnow_protocol() -> CdnowProtocol:
    """Calibration 1997-01-01..1997-09-30, holdout 1997-10-01..1998-06-30 (data end)."""
    return CdnowProtocol()


def read_cdnow(path: str | os.PathLike) -> pd.DataFrame:
    """Parse a CDNOW file: whitespace-separated ``customer_id date number_of_cds dollar_value``.

    The master file starts with a header line; the sample file has no header and an extra
    second column (the sample's own id), returned as ``sample_id``. Returns columns
    ``customer_id`` (string, as written, e.g. ``00001``), ``date`` (datetime64), ``number_of_cds``
    (int), ``dollar_value`` (float), ``line`` (1-based line in the file), [``sample_id``].
    Raises ``CdnowFormatError`` naming file, line and field for anything else.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise CdnowFormatError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise CdnowFormatError(f"{path}: not a plain ASCII text file (byte {exc.start})") from None
    rows: list[Any] = []
    lines: list[int] = []
    width: int | None = None
    for no, raw in enumerate(text.splitlines(), start=1):
        fields = raw.split()
        if not fields:
            continue
        if width is None and not lines and fields[0].lower() == "customer_id":
            if [f.lower() for f in fields] != list(_COLUMNS):
                raise CdnowFormatError(f"{path}, line {no}: unexpected header {raw.strip()!r}")
            width = 4
            continue
        if width is None:
            if len(fields) not in (4, 5):
                raise CdnowFormatError(f"{path}, line {no}: expected 4 fields ({' '.join(_COLUMNS)}) or 5 "
                                       f"(sample file: customer_id sample_id date ...), got {len(fields)}")
            width = len(fields)
        elif len(fields) != width:
            raise CdnowFormatError(f"{path}, line {no}: expected {width} fields like the lines before, got "
                                   f"{len(fields)}: {raw.strip()!r}")
        rows.append(fields)
        lines.append(no)
    if not rows:
        raise CdnowFormatError(f"{path}: no transactions")
    names = ["customer_id", "sample_id", *_COLUMNS[1:]] if width == 5 else list(_COLUMNS)
    raw_df = pd.DataFrame(rows, columns=names, dtype=object)
    line = np.asarray(lines, dtype=np.int64)

    def fail(mask: np.ndarray, field: str, why: str) -> None:
        if mask.any():
            i = int(np.flatnonzero(mask)[0])
            raise CdnowFormatError(f"{path}, line {line[i]}, field {field}: {why}, got {raw_df[field].iloc[i]!r}")

    for field in ("customer_id", "sample_id") if width == 5 else ("customer_id",):
        fail(~raw_df[field].str.fullmatch(r"\d+").to_numpy(dtype=bool), field, "expected digits")
    date = pd.to_datetime(raw_df["date"], format="%Y%m%d", errors="coerce")
    fail(date.isna().to_numpy(), "date", "expected a date YYYYMMDD")
    cds = pd.to_numeric(raw_df["number_of_cds"], errors="coerce")
    fail(~(cds.notna() & (cds >= 0) & (cds == np.floor(cds))).to_numpy(dtype=bool), "number_of_cds",
         "expected a whole number >= 0")
    value = pd.to_numeric(raw_df["dollar_value"], errors="coerce")
    fail(~(np.isfinite(value) & (value >= 0)).to_numpy(dtype=bool), "dollar_value", "expected a number >= 0")
    out = pd.DataFrame({"customer_id": raw_df["customer_id"].astype("string"),
                        "date": date.astype("datetime64[ns]"), "number_of_cds": cds.astype(np.int64),
                        "dollar_value": value.astype(np.float64), "line": line})
    if width == 5:
        out["sample_id"] = raw_df["sample_id"].astype("string")
    return out


def zero_value_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The transactions ``to_events`` leaves out: dollar value 0 (the schema needs purchases > 0)."""
    return df[df["dollar_value"] <= 0]


def to_events(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Canonical ``(events, users)`` from ``read_cdnow`` output (see the module doc for the choices).

    Every customer is a user, including those whose only transactions have value 0.
    """
    k = df.groupby(["customer_id", "date"], sort=False).cumcount().to_numpy()
    kept = (df["dollar_value"] > 0).to_numpy()
    ts = df["date"].to_numpy() + k.astype("timedelta64[s]")
    events = canonical_events(pd.DataFrame({
        "user_id": df["customer_id"].to_numpy()[kept], "ts": ts[kept], "event": "purchase",
        "item_id": pd.NA, "category": "music", "amount": df["dollar_value"].to_numpy()[kept],
        "watch_seconds": 0.0, "channel": "shelf"}))
    events = events.sort_values(["ts", "user_id"], kind="stable", ignore_index=True)
    users = canonical_users(pd.DataFrame({"user_id": pd.unique(df["customer_id"].to_numpy())}))
    return events, users


def _hash(ids: pd.Series, seed: int) -> np.ndarray:
    """A stable 64-bit hash per id (not Python's salted ``hash``): same split on every run and machine."""
    return np.array([int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "big")
                     for i in ids], dtype=np.uint64)


def power_law_sizes(n: int, k: int, min_size: int = MIN_SILO, exponent: float = POWER_LAW_EXPONENT) -> np.ndarray:
    """Silo sizes, largest first, following the rank-size law ``(rank^-a - k^-a)`` on top of ``min_size``.

    The smallest silo gets exactly ``min_size``; with the defaults 23,570 customers in 10 silos
    give a largest silo of several thousand.
    """
    if n < k * min_size:
        raise ValueError(f"power-law split needs at least {min_size} customers per silo: "
                         f"{n} customers for {k} silos")
    if k == 1:
        return np.array([n])
    w = np.arange(1, k + 1, dtype=float) ** -exponent - float(k) ** -exponent
    sizes = min_size + np.floor((n - k * min_size) * w / w.sum()).astype(np.int64)
    sizes[0] += n - sizes.sum()
    return sizes


def split_customers(df: pd.DataFrame, n_merchants: int, split: str = "hash", seed: int = 0) -> pd.Series:
    """Silo index (0..n_merchants-1) per customer id, for ``read_cdnow`` output.

    * ``hash``: stable hash of the id mod K (about equal sizes, IID);
    * ``non-iid``: customers ranked by the value of their first day's purchases (known at
      acquisition, so no future leaks into the split), cut into K equal chunks: silo 0 holds the
      smallest first orders, silo K-1 the largest, and their repeat rates differ;
    * ``power-law``: a seeded random deal into silos whose sizes follow ``power_law_sizes``.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    ids = pd.Series(pd.unique(df["customer_id"].to_numpy()), dtype="string")
    if not 1 <= n_merchants <= len(ids):
        raise ValueError(f"n_merchants must be between 1 and the number of customers ({len(ids)}), got {n_merchants}")
    h = _hash(ids, seed)
    if split == "hash":
        silo = (h % np.uint64(n_merchants)).astype(np.int64)
    elif split == "non-iid":
        first_day = df.groupby("customer_id", sort=False)["date"].transform("min")
        first_value = df[df["date"] == first_day].groupby("customer_id", sort=False)["dollar_value"].sum()
        order = np.lexsort((h, first_value.reindex(ids).to_numpy()))
        silo = np.empty(len(ids), dtype=np.int64)
        silo[order] = np.arange(len(ids)) * n_merchants // len(ids)
    else:
        sizes = power_law_sizes(len(ids), n_merchants)
        perm = np.random.default_rng(seed).permutation(len(ids))
        silo = np.empty(len(ids), dtype=np.int64)
        silo[perm] = np.repeat(np.arange(n_merchants), sizes)
    return pd.Series(silo, index=pd.Index(ids, name="customer_id"), name="silo")


def _consent(merchant_id: str, users: pd.Series) -> pd.DataFrame:
    scopes = ";".join(check_scopes(["purchase_history"]))
    n = len(users)
    purposes = np.repeat([check_purpose(p) for p in CONSENT_PURPOSES], n)
    return pd.DataFrame({
        "record_id": [f"{merchant_id}-c{i:07d}" for i in range(n * len(CONSENT_PURPOSES))],
        "subject_id": np.tile(users.to_numpy(dtype=object), len(CONSENT_PURPOSES)), "controller": merchant_id,
        "purpose": purposes, "scopes": scopes, "action": "grant", "effective_at": "1997-01-01T00:00:00Z",
        "expires_at": "", "collection_method": "research_dataset", "notice_version": "cdnow-research-data",
        "jurisdiction": "US", "recorded_by": "fedretain.datasets.cdnow"})


def import_cdnow(src: str | os.PathLike, out_dir: str | os.PathLike, n_merchants: int = 1, split: str = "hash",
                 seed: int = 0) -> list[Path]:
    """Write ``out_dir/cdnow_00`` ... as merchant silos; return their folders.

    ``src`` is a CDNOW file (master or sample) or a folder holding ``CDNOW_master.txt``.
    Zero-value transactions are listed in ``out_dir/cdnow_excluded.csv`` (see the module doc).
    """
    src = Path(src)
    if src.is_dir():
        src = src / "CDNOW_master.txt"
    df = read_cdnow(src)
    silo_of = split_customers(df, n_merchants, split, seed)
    protocol = cdnow_protocol()
    late = df["date"] > pd.Timestamp(protocol.data_end)
    if late.any():
        row = df[late].iloc[0]
        raise CdnowFormatError(f"{src}, line {row['line']}, field date: after the CDNOW data end "
                               f"{protocol.data_end}, got {row['date']:%Y-%m-%d}")
    events, users = to_events(df)
    out = Path(out_dir)
    excluded = zero_value_rows(df).assign(reason="dollar_value 0: purchase amounts must be > 0")
    excluded["silo"] = [f"cdnow_{s:02d}" for s in silo_of.reindex(excluded["customer_id"]).to_numpy()]
    ev_silo = silo_of.reindex(events["user_id"]).to_numpy()
    user_silo = silo_of.reindex(users["user_id"]).to_numpy()
    paths = []
    for k in range(n_merchants):
        mid = f"cdnow_{k:02d}"
        u = users[user_silo == k].reset_index(drop=True)
        merchant = {"merchant_id": mid, "name": f"CDNOW customers, part {k + 1} of {n_merchants}",
                    "category": "music", "data_end": protocol.data_end, "source": "cdnow", "split": split,
                    "seed": seed, "source_file": src.name, "n_customers": len(u),
                    "excluded_rows": {"zero_dollar_value": int((excluded["silo"] == mid).sum())}}
        paths.append(write_silo(out / mid, merchant, events[ev_silo == k].reset_index(drop=True), u,
                                _consent(mid, u["user_id"])))
    write_table(excluded.reset_index(drop=True), out / "cdnow_excluded.csv")
    return paths
