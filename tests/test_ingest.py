"""Ingest: every bad input is named (file, row, field), quarantined, counted; valid rows survive."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pytest

from fedretain.ingest import (
    MAX_EXAMPLES_PER_REASON,
    IngestError,
    Problem,
    load_silo,
    read_events,
    read_users,
    write_table,
)
from fedretain.ingest.dedupe import DuplicateFinder
from fedretain.mapping import ColumnMapping, parse_timestamps
from fedretain.schema import EVENT_COLUMN_NAMES, canonical_events, empty_events

NOW = "2026-01-01T00:00:00"
HEADER = ",".join(EVENT_COLUMN_NAMES)
GOOD = [
    "u1,2025-03-01T10:00:00,view,v1,shoes,0,12.5,short_video",
    "u2,2025-03-02T11:30:00,purchase,p7,shoes,59.9,0,live",
]


def write_csv(path: Path, rows: list[str], header: str = HEADER) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def read_quarantine(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def assert_balanced(report) -> None:
    assert report.rows_read == report.rows_accepted + report.rows_rejected
    assert sum(report.rejected_by_reason.values()) == report.rows_rejected


def test_valid_file_is_ingested_with_canonical_dtypes(tmp_path):
    df, report = read_events(write_csv(tmp_path / "events.csv", GOOD), now=NOW)
    expected = canonical_events(pd.DataFrame({
        "user_id": ["u1", "u2"], "ts": pd.to_datetime(["2025-03-01 10:00", "2025-03-02 11:30"]),
        "event": ["view", "purchase"], "item_id": ["v1", "p7"], "category": ["shoes", "shoes"],
        "amount": [0.0, 59.9], "watch_seconds": [12.5, 0.0], "channel": ["short_video", "live"],
    }))
    pd.testing.assert_frame_equal(df, expected)
    assert dict(df.dtypes) == dict(empty_events().dtypes)
    assert (report.rows_read, report.rows_accepted, report.rows_rejected) == (2, 2, 0)
    assert report.n_users == 2
    assert report.date_range == (pd.Timestamp("2025-03-01 10:00"), pd.Timestamp("2025-03-02 11:30"))
    assert report.event_counts == {"view": 1, "purchase": 1}
    assert report.quarantine_path is None
    assert not (tmp_path / "quarantine").exists()


def test_missing_required_column_refuses_the_file(tmp_path):
    path = write_csv(tmp_path / "events.csv", ["u1,view", "u2,like"], header="user_id,event")
    with pytest.raises(IngestError) as err:
        read_events(path, now=NOW)
    msg = str(err.value)
    assert str(path) in msg and "missing required column" in msg and "ts" in msg
    assert "user_id, event" in msg  # says what it did find
    assert not (tmp_path / "quarantine").exists()


# (bad row, field, reason, value) — the bad row is the 3rd data row, i.e. CSV row 4.
BAD_ROWS = [
    ("u3,2025-03-03,purchase,p1,shoes,abc,0,live", "amount", "non-numeric amount", "abc"),
    ("u3,2025-03-03,purchase,p1,shoes,-5,0,live", "amount", "negative amount", "-5"),
    ("u3,2025-03-03,purchase,p1,shoes,0,0,live", "amount", "purchase/refund amount must be > 0", "0"),
    ("u3,2025-03-03,refund,p1,shoes,,0,live", "amount", "purchase/refund amount must be > 0", ""),
    ("u3,2025-13-45 25:00,view,v1,shoes,0,3,live", "ts", "unparseable timestamp", "2025-13-45 25:00"),
    ("u3,,view,v1,shoes,0,3,live", "ts", "missing timestamp", ""),
    ("u3,2026-06-01T00:00:00,view,v1,shoes,0,3,live", "ts", "future timestamp", "2026-06-01T00:00:00"),
    ("u3,2025-03-03,watch,v1,shoes,0,3,live", "event", "unknown event label", "watch"),
    ("u3,2025-03-03,view,v1,shoes,0,3,tv", "channel", "unknown channel", "tv"),
    ("u3,2025-03-03,view,v1,shoes,0,-1,live", "watch_seconds", "negative watch_seconds", "-1"),
    ("u3,2025-03-03,view,v1,shoes,0,lots,live", "watch_seconds", "non-numeric watch_seconds", "lots"),
    (" ,2025-03-03,view,v1,shoes,0,3,live", "user_id", "empty user_id", " "),
]


@pytest.mark.parametrize("bad,field,reason,value", BAD_ROWS, ids=[r[2] + ":" + r[3] for r in BAD_ROWS])
def test_bad_row_is_named_quarantined_and_good_rows_kept(tmp_path, bad, field, reason, value):
    path = write_csv(tmp_path / "events.csv", [*GOOD, bad])
    df, report = read_events(path, now=NOW)

    assert (report.rows_read, report.rows_accepted, report.rows_rejected) == (3, 2, 1)
    assert_balanced(report)
    assert report.rejected_by_reason == {reason: 1}
    assert list(df["user_id"]) == ["u1", "u2"]
    [problem] = report.problems
    assert (problem.file, problem.row, problem.field, problem.reason, problem.value) == (
        str(path), 4, field, reason, value)
    assert str(path) in problem.message and "row 4" in problem.message and repr(field) in problem.message

    q = read_quarantine(report.quarantine_path)
    assert report.quarantine_path == tmp_path / "quarantine" / "events.rejected.csv"
    assert len(q) == 1
    assert ",".join(q.loc[0, list(EVENT_COLUMN_NAMES)]) == bad  # original values, unchanged
    assert (q.loc[0, "_source_file"], q.loc[0, "_row"], q.loc[0, "_field"]) == (str(path), "4", field)
    assert q.loc[0, "_reason"].startswith(reason)


def test_future_is_relative_to_now_argument(tmp_path):
    path = write_csv(tmp_path / "events.csv", GOOD)
    _, report = read_events(path, now="2025-03-02T00:00:00+00:00")
    assert report.rejected_by_reason == {"future timestamp": 1}
    assert report.problems[0].row == 3 and "later than now = 2025-03-02T00:00:00" in report.problems[0].message


def test_exact_duplicate_rejected_naming_first_copy_across_chunks(tmp_path):
    rows = [*GOOD, "u4,2025-03-04,like,v2,hats,0,0,", GOOD[0], GOOD[0]]
    path = write_csv(tmp_path / "events.csv", rows)
    df, report = read_events(path, now=NOW, chunksize=1)  # every copy lands in its own chunk
    assert report.rejected_by_reason == {"duplicate row": 2}
    assert [(p.row, p.field, p.detail) for p in report.problems] == [
        (5, "*", "same as row 2"), (6, "*", "same as row 2")]
    assert "row 5" in report.problems[0].message and "same as row 2" in report.problems[0].message
    assert len(df) == 3 and report.rows_accepted == 3
    q = read_quarantine(report.quarantine_path)
    assert list(q["_row"]) == ["5", "6"] and set(q["_reason"]) == {"duplicate row (same as row 2)"}


def test_copy_of_a_rejected_row_is_rejected_for_its_own_problem(tmp_path):
    bad = "u3,yesterday,view,v1,shoes,0,3,live"
    _, report = read_events(write_csv(tmp_path / "events.csv", [bad, bad]), now=NOW)
    assert report.rejected_by_reason == {"unparseable timestamp": 2}


def test_row_with_several_problems_counted_once_and_all_listed(tmp_path):
    path = write_csv(tmp_path / "events.csv", [*GOOD, "u3,notatime,buy,v1,shoes,x,-2,tv"])
    _, report = read_events(path, now=NOW)
    assert report.rows_rejected == 1 and report.rejected_by_reason == {"unparseable timestamp": 1}
    assert [p.field for p in report.problems] == ["ts", "event", "amount", "watch_seconds", "channel"]
    q = read_quarantine(report.quarantine_path)
    assert q.loc[0, "_field"] == "ts;event;amount;watch_seconds;channel"
    assert q.loc[0, "_reason"].count("; ") == 4


def test_blank_line_is_rejected_not_skipped_and_row_numbers_stay_true(tmp_path):
    path = write_csv(tmp_path / "events.csv", [GOOD[0], "", GOOD[1], "u3,bad,view,,,,,"])
    _, report = read_events(path, now=NOW)
    assert [(p.row, p.reason) for p in report.problems] == [(3, "blank row"), (5, "unparseable timestamp")]
    assert report.rows_accepted == 2 and report.rows_read == 4


def test_quarantine_holds_exactly_the_rejected_rows(tmp_path):
    rows = [*GOOD, "u3,2025-03-03,view,v1,,zero,0,", GOOD[1], "u4,2025-03-05,share,,,,,", "u5,2030-01-01,view,,,,,"]
    path = write_csv(tmp_path / "events.csv", rows)
    df, report = read_events(path, now=NOW, chunksize=2)
    q = read_quarantine(report.quarantine_path)
    assert len(q) == report.rows_rejected == 3
    assert list(q["_row"].astype(int)) == [4, 5, 7]
    raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    expected = raw.iloc[[2, 3, 5]].reset_index(drop=True)
    pd.testing.assert_frame_equal(q[list(raw.columns)], expected)
    assert len(df) == report.rows_accepted == 3
    assert_balanced(report)
    assert [p.name for p in report.quarantine_path.parent.iterdir()] == ["events.rejected.csv"]  # no temp left


def test_stale_quarantine_is_removed_when_a_rerun_is_clean(tmp_path):
    path = write_csv(tmp_path / "events.csv", [*GOOD, "u3,bad,view,,,,,"])
    _, first = read_events(path, now=NOW)
    assert first.quarantine_path.is_file()
    write_csv(path, GOOD)
    _, second = read_events(path, now=NOW)
    assert second.quarantine_path is None and not first.quarantine_path.exists()


def test_chunked_reading_matches_single_chunk(tmp_path):
    rng = np.random.default_rng(3)
    events = np.array(["view", "like", "purchase", "refund", "cart", "oops"])
    rows = []
    for _ in range(300):
        ev = rng.choice(events, p=[0.4, 0.2, 0.15, 0.05, 0.15, 0.05])
        amount = f"{rng.uniform(-5, 50):.2f}" if ev in ("purchase", "refund") else "0"
        ts = f"2025-0{rng.integers(1, 10)}-1{rng.integers(0, 10)} 10:00:00"
        rows.append(f"u{rng.integers(0, 40)},{ts},{ev},i{rng.integers(0, 5)},c,{amount},{rng.integers(-1, 30)},live")
    rows += rows[:25]  # duplicates that land in other chunks
    path = write_csv(tmp_path / "events.csv", rows)
    big_df, big = read_events(path, now=NOW, chunksize=100_000, quarantine_path=tmp_path / "q1.csv")
    small_df, small = read_events(path, now=NOW, chunksize=7, quarantine_path=tmp_path / "q7.csv")
    pd.testing.assert_frame_equal(big_df, small_df)
    assert big.rejected_by_reason == small.rejected_by_reason
    assert big.rejected_by_reason["duplicate row"] > 0 and len(big.rejected_by_reason) >= 4
    assert (big.rows_read, big.rows_accepted, big.rows_rejected) == (
        small.rows_read, small.rows_accepted, small.rows_rejected)
    pd.testing.assert_frame_equal(read_quarantine(tmp_path / "q1.csv"), read_quarantine(tmp_path / "q7.csv"))
    assert_balanced(small)


def test_problem_list_is_bounded_but_counts_complete(tmp_path):
    rows = [f"u{i},2025-01-01,view,,,,,mars" for i in range(MAX_EXAMPLES_PER_REASON + 30)]
    _, report = read_events(write_csv(tmp_path / "events.csv", rows), now=NOW, chunksize=9)
    assert report.rejected_by_reason == {"unknown channel": MAX_EXAMPLES_PER_REASON + 30}
    assert len(report.problems) == MAX_EXAMPLES_PER_REASON
    assert all(isinstance(p, Problem) for p in report.problems)


def test_mapping_renames_columns_labels_and_timestamp_format(tmp_path):
    header = "customer,when,action,amt,source"
    rows = ["c1,05/01/2025 10:00,BUY,12.50,LIVE", "c1,05/01/2025 11:00,WATCH,,VID", "c2,31/02/2025 10:00,WATCH,,VID",
            "c3,06/01/2025 10:00,TELEPORT,,VID"]
    path = write_csv(tmp_path / "events.csv", rows, header=header)
    mapping = {"columns": {"customer": "user_id", "when": "ts", "action": "event", "amt": "amount",
                           "source": "channel"},
               "events": {"BUY": "purchase", "WATCH": "view"}, "channels": {"LIVE": "live", "VID": "short_video"},
               "timestamp_format": "%d/%m/%Y %H:%M"}
    df, report = read_events(path, mapping=mapping, now=NOW)
    assert list(df["event"]) == ["purchase", "view"]
    assert list(df["channel"]) == ["live", "short_video"]
    assert list(df["ts"]) == [pd.Timestamp("2025-01-05 10:00"), pd.Timestamp("2025-01-05 11:00")]
    assert list(df["amount"]) == [12.5, 0.0]
    # problems use the merchant's own column names, so they can find them in their file
    assert [(p.row, p.field, p.reason) for p in report.problems] == [
        (4, "when", "unparseable timestamp"), (5, "action", "unknown event label")]
    assert "%d/%m/%Y %H:%M" in report.problems[0].message
    q = read_quarantine(report.quarantine_path)
    assert list(q.columns[:5]) == header.split(",")  # quarantine keeps the file's own column names


def test_mapping_epoch_unit_and_utc_offsets():
    ts = parse_timestamps(pd.Series(["1735689600000", "2025-01-01T08:00:00+08:00", "x", ""]), unit="ms")
    assert list(ts[:2]) == [pd.Timestamp("2025-01-01"), pd.Timestamp("2025-01-01")]
    assert ts[2:].isna().all()
    assert parse_timestamps(pd.Series([1735689600]), unit="s")[0] == pd.Timestamp("2025-01-01")
    assert pd.isna(parse_timestamps(pd.Series([1e30]), unit="s")[0])  # out of range: NaT, not an exception


@pytest.mark.parametrize("bad,needle", [
    ({"columns": {"uid": "userid"}}, "columns['uid'] maps to 'userid'"),
    ({"events": {"BUY": "buy"}}, "events['BUY'] maps to 'buy'"),
    ({"timestamp_unit": "minutes"}, "timestamp_unit"),
    ({"colums": {}}, "unknown key(s) ['colums']"),
])
def test_bad_mapping_fails_loudly(tmp_path, bad, needle):
    path = tmp_path / "mapping.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(IngestError) as err:
        ColumnMapping.load(path)
    assert str(path) in str(err.value) and needle in str(err.value)


def test_two_columns_mapped_to_one_name_is_a_file_error(tmp_path):
    path = write_csv(tmp_path / "events.csv", ["u1,u1,2025-01-01,view"], header="user_id,uid,ts,event")
    with pytest.raises(IngestError, match="'user_id' and 'uid' both map to 'user_id'"):
        read_events(path, mapping={"columns": {"uid": "user_id"}}, now=NOW)


def test_malformed_csv_is_a_file_error_without_leftovers(tmp_path):
    path = write_csv(tmp_path / "events.csv", ["u1,bad,view,,,,,", *GOOD, "u9,2025-01-01,view,,,,,,,too,many"])
    with pytest.raises(IngestError, match="malformed CSV") as err:
        read_events(path, now=NOW, chunksize=1)
    assert str(path) in str(err.value)
    assert not (tmp_path / "quarantine").exists() or not any((tmp_path / "quarantine").iterdir())


def test_row_longer_than_header_is_not_silently_shifted(tmp_path):
    path = write_csv(tmp_path / "events.csv", ["u1,2025-01-01,view,extra"], header="user_id,ts,event")
    with pytest.raises(IngestError, match="row 2 has more fields than the header"):
        read_events(path, now=NOW)


def test_duplicate_header_and_empty_file(tmp_path):
    with pytest.raises(IngestError, match="row 1 \\(header\\).*'ts'"):
        read_events(write_csv(tmp_path / "a.csv", [], header="user_id,ts,ts,event"), now=NOW)
    (tmp_path / "b.csv").write_text("")
    with pytest.raises(IngestError, match="empty file"):
        read_events(tmp_path / "b.csv", now=NOW)


def test_parquet_round_trip_and_one_based_rows(tmp_path):
    df, _ = read_events(write_csv(tmp_path / "events.csv", GOOD), now=NOW)
    write_table(df, tmp_path / "pq" / "events.parquet")
    back, report = read_events(tmp_path / "pq" / "events.parquet", now=NOW, chunksize=1)
    pd.testing.assert_frame_equal(back, df)
    assert report.rows_rejected == 0

    raw = pd.DataFrame({"user_id": ["a", "b", "a"],
                        "ts": pd.to_datetime(["2025-01-01", "2025-01-02", "2025-01-01"], utc=True),
                        "event": ["view", "like", "view"], "amount": [0.0, np.nan, 0.0],
                        "watch_seconds": [1.0, -2.0, 1.0]})
    write_table(raw, tmp_path / "raw.parquet")
    out, rep = read_events(tmp_path / "raw.parquet", now=NOW, chunksize=2)
    assert [(p.row, p.field, p.reason) for p in rep.problems] == [
        (2, "watch_seconds", "negative watch_seconds"), (3, "*", "duplicate row")]
    assert rep.problems[1].detail == "same as row 1"
    assert list(out["ts"]) == [pd.Timestamp("2025-01-01")]


def test_corrupt_parquet_is_a_file_error(tmp_path):
    path = tmp_path / "events.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(IngestError, match="not a readable Parquet file") as err:
        read_events(path, now=NOW)
    assert str(path) in str(err.value)


def test_write_table_is_atomic_and_checks_suffix(tmp_path):
    df = pd.DataFrame({"a": [1, 2], "b": ["x", "y"]})
    assert write_table(df, tmp_path / "t.csv").read_text() == "a,b\n1,x\n2,y\n"
    pd.testing.assert_frame_equal(pd.read_parquet(write_table(df, tmp_path / "t.parquet")), df, check_dtype=False)
    with pytest.raises(ValueError, match="unsupported table suffix"):
        write_table(df, tmp_path / "t.xlsx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv", "t.parquet"]


def test_duplicate_finder_matches_a_dict_reference():
    rng = np.random.default_rng(0)
    finder, ref, held = DuplicateFinder(est_rows=64), {}, set()  # tiny filter: many false "maybe"s
    row = 0
    for size in rng.integers(1, 60, size=80):
        # few distinct first words, so equal-first-word keys with different second words are common
        h1 = rng.integers(0, 50, size=size).astype(np.uint64)
        h2 = rng.integers(0, 8, size=size).astype(np.uint64)
        rows = np.arange(row, row + size)
        maybe = finder.add(h1, h2, rows)
        finder.hold(pl.DataFrame({"row": rows[maybe]}), rows[maybe], h1[maybe])
        for a, b, r, m in zip(h1, h2, rows, maybe):
            first = ref.setdefault((a, b), r)
            assert m or first == r  # every repeat is flagged while streaming (a superset is fine)
            if m:
                held.add(int(r))
        row += size
    dups = finder.finish()
    seen: dict[tuple, int] = {}
    expected = {}
    for r, (a, b) in enumerate(_replay(rng_seed=0)):
        if (a, b) in seen:
            expected[r] = seen[(a, b)]
        else:
            seen[(a, b)] = r
    assert dict(zip(dups["row"].to_list(), dups["first_row"].to_list())) == expected
    assert set(expected) <= held
    copies, copied_rows = finder.held_rows(np.array(sorted(expected)))
    assert sorted(copies["row"].to_list()) == sorted(expected) == sorted(copied_rows.tolist())


def _replay(rng_seed: int):
    rng = np.random.default_rng(rng_seed)
    for size in rng.integers(1, 60, size=80):
        h1 = rng.integers(0, 50, size=size)
        h2 = rng.integers(0, 8, size=size)
        yield from zip(h1.tolist(), h2.tolist())


# ------------------------------------------------------------------ users and silos


def make_silo(root: Path, events: list[str] | None = None, users: str | None = None,
              merchant: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_csv(root / "events.csv", GOOD + ["u9,2025-03-03,like,,,,,"] if events is None else events)
    if users is not None:
        (root / "users.csv").write_text(users)
    meta = {"merchant_id": "m1", "name": "Shop", "category": "shoes", "data_end": "2025-04-01", "source": "test"}
    (root / "merchant.json").write_text(json.dumps(meta if merchant is None else merchant))
    return root


def test_users_file_validation(tmp_path):
    path = tmp_path / "users.csv"
    path.write_text("user_id,referral,member_tier,city_tier\nu1,organic,gold,1\nu2,friend_share,none,7\n"
                    "u3,tiktok,none,2\nu4,organic,diamond,\nu5,,,x\nu1,organic,gold,1\nu6,,,\n")
    users, report = read_users(path)
    assert list(users["user_id"]) == ["u1", "u6"]
    assert [(p.row, p.field, p.reason) for p in report.problems] == [
        (3, "city_tier", "city_tier out of 1..5"), (4, "referral", "unknown referral"),
        (5, "member_tier", "unknown member_tier"), (6, "city_tier", "non-numeric city_tier"),
        (7, "user_id", "duplicate user_id")]
    assert report.problems[-1].detail == "same as row 2"
    assert str(users["city_tier"].dtype) == "Int64" and pd.isna(users["city_tier"][1])
    assert_balanced(report)


def test_load_silo_keeps_events_of_users_without_attributes(tmp_path):
    root = make_silo(tmp_path / "m1", users="user_id,referral,member_tier,city_tier\nu1,organic,gold,1\nu7,organic,,\n")
    silo = load_silo(root, now=NOW)
    assert silo.merchant_id == "m1" and len(silo.events) == 3
    assert silo.report.n_users_without_attributes == 2  # u2, u9
    assert set(silo.users["user_id"]) == {"u1", "u7", "u2", "u9"}  # u7 has no events: still a user, not an error
    assert silo.users.set_index("user_id").loc["u9"].isna().all()
    assert silo.users_report is not None and silo.users_report.rows_rejected == 0
    assert silo.consent_path is None
    (root / "consent.csv").write_text("subject_id\n")
    assert silo.consent_path == root / "consent.csv"


def test_load_silo_uses_mapping_json_and_quarantine_dir(tmp_path):
    root = make_silo(tmp_path / "m1")
    (root / "events.csv").write_text("uid,ts,event\na,2025-01-01,LIKE\nb,2025-01-01,BOOM\n")
    (root / "mapping.json").write_text(json.dumps({"columns": {"uid": "user_id"}, "events": {"LIKE": "like"}}))
    silo = load_silo(root, now=NOW, quarantine_dir=tmp_path / "q")
    assert list(silo.events["event"]) == ["like"]
    assert silo.report.quarantine_path == tmp_path / "q" / "events.rejected.csv"
    assert silo.report.problems[0].message.startswith(f"{root / 'events.csv'}: row 3, field 'event'")
    explicit = load_silo(root, now=NOW, mapping={"columns": {"uid": "user_id"}}, quarantine_dir=tmp_path / "q")
    assert explicit.report.rows_rejected == 2  # an explicit mapping replaces mapping.json


@pytest.mark.parametrize("setup,needle", [
    (lambda r: None, "silo folder not found"),
    (lambda r: make_silo(r) and (r / "events.csv").unlink(), "no events file"),
    (lambda r: make_silo(r) and write_table(pd.read_csv(r / "events.csv"), r / "events.parquet"), "keep exactly one"),
    (lambda r: make_silo(r) and (r / "merchant.json").unlink(), "merchant.json not found"),
    (lambda r: make_silo(r) and (r / "merchant.json").write_text("{oops"), "invalid JSON at line 1"),
    (lambda r: make_silo(r, merchant={"name": "x", "data_end": "2025-01-01"}),
     "'merchant_id' must be a non-empty string"),
    (lambda r: make_silo(r, merchant={"merchant_id": "m", "data_end": "01/02/2025"}), "'data_end' must be a date"),
    (lambda r: make_silo(r) and (r / "events.csv").write_text("user_id,event\nu1,view\n"),
     "missing required column(s) ts"),
])
def test_load_silo_file_level_errors(tmp_path, setup, needle):
    root = tmp_path / "silo"
    setup(root)
    with pytest.raises(IngestError) as err:
        load_silo(root, now=NOW)
    assert needle in str(err.value)
    assert str(root) in str(err.value)
    assert isinstance(err.value, ValueError)
