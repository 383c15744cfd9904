"""CDNOW adapter: parsing both file formats, conversion that accounts for every transaction, splits.

Tests that need the real files skip when they are absent (set FEDRETAIN_CDNOW_DIR to point elsewhere).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedretain.consent.vocab import PURPOSES, SCOPES
from fedretain.datasets.cdnow import (
    N_CUSTOMERS,
    N_TRANSACTIONS,
    SPLITS,
    CdnowFormatError,
    cdnow_protocol,
    import_cdnow,
    power_law_sizes,
    read_cdnow,
    split_customers,
    to_events,
    zero_value_rows,
)
from fedretain.ingest import load_silo
from fedretain.schema import EVENT_COLUMN_NAMES, USER_COLUMN_NAMES

CDNOW_DIR = Path(os.environ.get("FEDRETAIN_CDNOW_DIR") or Path(__file__).resolve().parents[2] / "shared/data/cdnow")
MASTER, SAMPLE = CDNOW_DIR / "CDNOW_master.txt", CDNOW_DIR / "CDNOW_sample.txt"
KEY = ["customer_id", "date", "number_of_cds", "dollar_value"]


@pytest.fixture(scope="module")
def master() -> pd.DataFrame:
    if not MASTER.is_file():
        pytest.skip(f"CDNOW master file not found at {MASTER} (set FEDRETAIN_CDNOW_DIR)")
    return read_cdnow(MASTER)


@pytest.fixture(scope="module")
def sample() -> pd.DataFrame:
    if not SAMPLE.is_file():
        pytest.skip(f"CDNOW sample file not found at {SAMPLE} (set FEDRETAIN_CDNOW_DIR)")
    return read_cdnow(SAMPLE)


def test_read_master(master):
    assert len(master) == N_TRANSACTIONS == 69_659
    assert master["customer_id"].nunique() == N_CUSTOMERS == 23_570
    assert list(master.columns) == ["customer_id", "date", "number_of_cds", "dollar_value", "line"]
    first = master.iloc[0]
    assert (first["customer_id"], first["date"], first["number_of_cds"], first["dollar_value"], first["line"]) == (
        "00001", pd.Timestamp("1997-01-01"), 1, 11.77, 2)  # line 1 is the header
    assert master["date"].min() == pd.Timestamp("1997-01-01") and master["date"].max() == pd.Timestamp("1998-06-30")
    assert len(zero_value_rows(master)) == 80


def test_read_sample_matches_master(sample, master):
    assert "sample_id" in sample and sample["customer_id"].nunique() == 2_357
    assert sample["sample_id"].nunique() == 2_357 and sample.iloc[0]["line"] == 1  # no header
    sub = master[master["customer_id"].isin(sample["customer_id"])][KEY]
    pd.testing.assert_frame_equal(sample[KEY].sort_values(KEY, ignore_index=True),
                                  sub.sort_values(KEY, ignore_index=True))


def test_to_events_accounts_for_every_transaction(master):
    events, users = to_events(master)
    assert list(events.columns) == list(EVENT_COLUMN_NAMES) and list(users.columns) == list(USER_COLUMN_NAMES)
    assert len(events) + len(zero_value_rows(master)) == N_TRANSACTIONS
    assert len(users) == N_CUSTOMERS and users[["referral", "member_tier", "city_tier"]].isna().all().all()
    assert (events["event"] == "purchase").all() and (events["amount"] > 0).all()
    assert (events["category"] == "music").all() and (events["channel"] == "shelf").all()
    assert events["item_id"].isna().all() and (events["watch_seconds"] == 0).all()
    assert events["amount"].sum() == pytest.approx(master["dollar_value"].sum())
    # dates never move; same-day transactions of a customer are a few seconds apart, so none is a duplicate
    assert (events["ts"].dt.normalize() == events["ts"].dt.floor("D")).all()
    assert (events["ts"] - events["ts"].dt.normalize()).max() < pd.Timedelta(minutes=5)
    assert not events.duplicated().any() and master[KEY].duplicated().sum() == 255
    per_day = master[master["dollar_value"] > 0].groupby(["customer_id", "date"]).size()
    got = events.groupby([events["user_id"], events["ts"].dt.normalize()]).size()
    assert (got.sort_index().to_numpy() == per_day.sort_index().to_numpy()).all()
    assert events["ts"].is_monotonic_increasing


@pytest.mark.parametrize("split", SPLITS)
def test_split_sizes_sum_to_all_customers(master, split):
    k = 10
    silo = split_customers(master, k, split, seed=0)
    assert len(silo) == N_CUSTOMERS and silo.index.is_unique and set(silo.unique()) == set(range(k))
    sizes = silo.value_counts().sort_index().to_numpy()
    assert sizes.sum() == N_CUSTOMERS
    if split == "hash":
        assert sizes.max() / sizes.min() < 1.2
    elif split == "non-iid":
        assert sizes.max() - sizes.min() <= 1
        first = master.groupby("customer_id")["date"].transform("min")
        first_value = master[master["date"] == first].groupby("customer_id")["dollar_value"].sum()
        med = first_value.groupby(silo.reindex(first_value.index).to_numpy()).median().to_numpy()
        assert (np.diff(med) >= 0).all() and med[-1] > 3 * med[0]  # silos differ by first order size
    else:
        assert sorted(sizes, reverse=True)[-1] == 100 and 3_000 <= sizes.max() <= 12_000
        assert list(sorted(sizes, reverse=True)) == list(power_law_sizes(N_CUSTOMERS, k))


def test_split_is_deterministic_and_seeded(master):
    a = split_customers(master, 5, "hash", seed=1)
    pd.testing.assert_series_equal(a, split_customers(master, 5, "hash", seed=1))
    assert (a != split_customers(master, 5, "hash", seed=2)).mean() > 0.5


def test_split_arguments_are_checked(master):
    with pytest.raises(ValueError, match="unknown split 'random'"):
        split_customers(master, 3, "random")
    with pytest.raises(ValueError, match="n_merchants"):
        split_customers(master, 0, "hash")
    with pytest.raises(ValueError, match="at least 100 customers per silo"):
        power_law_sizes(999, 10)
    assert power_law_sizes(500, 1).tolist() == [500]


def test_import_power_law_writes_silos_that_account_for_everything(master, tmp_path):
    paths = import_cdnow(MASTER, tmp_path, n_merchants=10, split="power-law", seed=0)
    assert [p.name for p in paths] == [f"cdnow_{k:02d}" for k in range(10)]
    n_users = n_events = n_excluded = 0
    for p in paths:
        merchant = json.loads((p / "merchant.json").read_text())
        assert merchant["data_end"] == "1998-06-30" and merchant["source"] == "cdnow"
        assert merchant["merchant_id"] == p.name and merchant["split"] == "power-law"
        users = pd.read_csv(p / "users.csv", dtype=str)
        events = pd.read_csv(p / "events.csv", dtype={"user_id": str}, usecols=["user_id"])
        assert merchant["n_customers"] == len(users) and set(events["user_id"]) <= set(users["user_id"])
        n_users, n_events = n_users + len(users), n_events + len(events)
        n_excluded += merchant["excluded_rows"]["zero_dollar_value"]
    excluded = pd.read_csv(tmp_path / "cdnow_excluded.csv", dtype={"customer_id": str})
    assert n_users == N_CUSTOMERS and n_excluded == len(excluded) == 80
    assert n_events + n_excluded == N_TRANSACTIONS
    assert excluded["line"].between(2, N_TRANSACTIONS + 1).all() and (excluded["dollar_value"] == 0).all()
    sizes = sorted((json.loads((p / "merchant.json").read_text())["n_customers"] for p in paths), reverse=True)
    assert sizes[-1] == 100 and sizes[0] >= 3_000


def test_import_sample_silos_pass_ingest_and_consent(sample, tmp_path):
    from fedretain.consent.ledger import ConsentLedger

    paths = import_cdnow(SAMPLE, tmp_path / "out", n_merchants=2, split="hash")
    protocol = cdnow_protocol()
    total = 0
    for p in paths:
        silo = load_silo(p)
        assert silo.report.rows_rejected == 0 and silo.report.n_users_without_attributes == 0
        assert silo.users["user_id"].str.fullmatch(r"\d{5}").all()  # ids keep their leading zeros
        assert silo.events["ts"].max() < protocol.holdout_end + pd.Timedelta(days=1)
        total += len(silo.users)
        consent = pd.read_csv(p / "consent.csv", dtype=str, keep_default_na=False)
        assert len(consent) == 3 * len(silo.users) and set(consent["purpose"]) <= set(PURPOSES)
        assert set(consent["scopes"]) == {"purchase_history"} <= set(SCOPES)
        assert (consent["collection_method"] == "research_dataset").all()
        assert (consent["effective_at"] == "1997-01-01T00:00:00Z").all()
        with ConsentLedger.create(tmp_path / f"{p.name}.db", controller=p.name,
                                  key_path=tmp_path / f"{p.name}.pem") as ledger:
            ledger.import_file(p / "consent.csv")
            state = ledger.state_at("retention_modeling", protocol.cutoff)
        assert state["purchase_history"].sum() == len(silo.users)
    assert total == 2_357


def test_protocol():
    p = cdnow_protocol()
    assert p.calibration_end == pd.Timestamp("1997-09-30") and p.holdout_start == pd.Timestamp("1997-10-01")
    assert p.cutoff == p.holdout_start and p.horizon_days == 273
    assert p.cutoff + pd.Timedelta(days=p.horizon_days) == pd.Timestamp(p.data_end) + pd.Timedelta(days=1)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("00001 19970101 1 11.77\n00002 19970112 1\n", "line 2: expected 4 fields"),
        ("00001 19970101 1 11.77\n00002 19971312 1 12.00\n", "line 2, field date: expected a date YYYYMMDD"),
        ("00001 19970101 1 11.77\n\n00002 19970112 1 -3\n", "line 3, field dollar_value: expected a number >= 0"),
        ("00001 19970101 1 11.77\n0000x 19970112 1 12.00\n", "line 2, field customer_id: expected digits"),
        ("00001 19970101 1.5 11.77\n", "line 1, field number_of_cds: expected a whole number"),
        ("00001 19970101 1 abc\n", "line 1, field dollar_value"),
        (" customer_id date cds dollar_value\n00001 19970101 1 1.0\n", "line 1: unexpected header"),
        ("00001 0001 19970101 1 1.0\n00002 19970101 1 1.0\n", "line 2: expected 5 fields"),
        ("1 2 3\n", "line 1: expected 4 fields"),
        ("\n\n", "no transactions"),
    ],
)
def test_malformed_input_names_the_line(tmp_path, text, needle):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(CdnowFormatError, match="bad.txt") as err:
        read_cdnow(path)
    assert needle in str(err.value)


def test_reads_both_formats_from_small_files(tmp_path):
    master = tmp_path / "m.txt"
    master.write_text(" customer_id  date number_of_cds  dollar_value\r\n 00001 19970101  1   11.77\r\n"
                      " 00002 19970112  1   12.00\r\n 00002 19970112  1   12.00\r\n 00003 19970102  2   0.00\r\n")
    df = read_cdnow(master)
    assert df["customer_id"].tolist() == ["00001", "00002", "00002", "00003"] and df["line"].tolist() == [2, 3, 4, 5]
    events, users = to_events(df)
    assert len(events) == 3 and len(users) == 3  # the 0-value row is no event; its customer is a user
    assert sorted(events["ts"].astype(str)) == ["1997-01-01 00:00:00", "1997-01-12 00:00:00", "1997-01-12 00:00:01"]
    sample = tmp_path / "s.txt"
    sample.write_text(" 00004 0001 19970101  2   29.33\n 00004 0001 19970118  2   29.73\n")
    s = read_cdnow(sample)
    assert s["sample_id"].tolist() == ["0001", "0001"] and s["number_of_cds"].tolist() == [2, 2]


def test_import_rejects_dates_after_the_data_end(tmp_path):
    src = tmp_path / "late.txt"
    src.write_text("00001 19970101 1 1.0\n00001 19980701 1 2.0\n")
    with pytest.raises(CdnowFormatError, match="line 2, field date: after the CDNOW data end"):
        import_cdnow(src, tmp_path / "out")
