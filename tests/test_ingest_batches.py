"""Ingest over many batches: duplicates across batch boundaries, conservation of rows, and the
clear refusals issue 12 asked for (huge amounts, signed epochs, nested Parquet columns)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedretain.consent.vocab import SCOPES
from fedretain.features import FEATURES, compute_features
from fedretain.ingest import IngestError, read_events, read_users
from fedretain.ingest.rules import MAX_AMOUNT
from fedretain.mapping import parse_timestamps
from fedretain.schema import EVENT_COLUMN_NAMES, canonical_events, canonical_users

NOW = "2026-01-01T00:00:00"
HEADER = ",".join(EVENT_COLUMN_NAMES)


def write_csv(path, rows, header=HEADER):
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def quarantine(path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def test_duplicates_far_apart_are_found_whatever_the_batch_size(tmp_path):
    rows = [f"u{i},2025-03-01T10:00:{i % 60:02d},view,v{i},c,0,{i},live" for i in range(40)]
    data = list(rows)  # data row i is CSV row i + 2
    data.insert(39, "u9,notatime,view,,,,,")  # a rejected row in the middle: CSV row 41
    tail = [rows[1], "u99,2025-03-02,like,,,,,", "u98,2025-03-02,like,,,,,", "u97,2025-03-02,like,,,,,",
            rows[15], "u96,2025-03-02,like,,,,,", "u95,2025-03-02,like,,,,,", "u94,2025-03-02,like,,,,,",
            "u93,2025-03-02,like,,,,,", rows[1], "u92,2025-03-02,like,,,,,", rows[37]]
    path = write_csv(tmp_path / "events.csv", data + tail)
    results = {}
    for size in (1, 4, 7, 1_000_000):
        df, report = read_events(path, now=NOW, chunksize=size, quarantine_path=tmp_path / f"q{size}.csv")
        results[size] = (df, report, quarantine(tmp_path / f"q{size}.csv"))
    df, report, q = results[1_000_000]
    dups = [(p.row, p.detail) for p in report.problems if p.reason == "duplicate row"]
    assert dups == [(43, "same as row 3"), (47, "same as row 17"), (52, "same as row 3"), (54, "same as row 39")]
    assert report.rejected_by_reason == {"unparseable timestamp": 1, "duplicate row": 4}
    assert list(q["_row"].astype(int)) == [41, 43, 47, 52, 54]  # file order, copies merged in place
    assert list(q.loc[q["_row"] == "47", "user_id"]) == ["u15"]  # the copy's own values, unchanged
    assert set(q.loc[q["_row"] != "41", "_reason"].str.startswith("duplicate row (same as row ")) == {True}
    for size, (other_df, other, other_q) in results.items():
        pd.testing.assert_frame_equal(other_df, df, obj=f"chunksize {size}")
        assert other.rejected_by_reason == report.rejected_by_reason
        pd.testing.assert_frame_equal(other_q, q, obj=f"quarantine at chunksize {size}")


def test_rows_are_conserved_over_batches(tmp_path):
    rng = np.random.default_rng(7)
    labels = np.array(["view", "like", "purchase", "refund", "cart", "bogus"])
    rows = []
    for _ in range(500):
        ev = rng.choice(labels)
        amount = f"{rng.uniform(-3, 40):.2f}" if ev in ("purchase", "refund") else rng.choice(["0", "", "x"])
        ts = rng.choice(["2025-02-0{}T08:00:00", "2025-02-0{} 08:00", "2030-01-0{}", "0{}/02/2025"])
        ts = ts.format(rng.integers(1, 9))
        rows.append(f"u{rng.integers(0, 30)},{ts},{ev},i{rng.integers(0, 3)},,{amount},{rng.integers(-2, 20)},live")
    rows += [rows[i] for i in rng.integers(0, 500, size=60)] + [""]
    path = write_csv(tmp_path / "events.csv", rows)
    seen = None
    for size in (3, 64, 1_000_000):
        df, report = read_events(path, now=NOW, chunksize=size, quarantine_path=tmp_path / "q.csv")
        q = quarantine(tmp_path / "q.csv")
        assert report.rows_read == len(rows) == report.rows_accepted + report.rows_rejected
        assert sum(report.rejected_by_reason.values()) == report.rows_rejected == len(q) == q["_row"].nunique()
        assert len(df) == report.rows_accepted
        assert list(q["_row"].astype(int)) == sorted(q["_row"].astype(int))
        key = (report.rejected_by_reason, df.to_json(), q.to_json())
        assert seen is None or key == seen
        seen = key


def test_users_duplicate_in_a_later_batch_keeps_its_own_values(tmp_path):
    path = tmp_path / "users.csv"
    path.write_text("user_id,referral,member_tier,city_tier\nu1,organic,gold,1\nu2,,,\nu3,,,\n u1 ,friend_share,,3\n")
    users, report = read_users(path, chunksize=1, quarantine_path=tmp_path / "q.csv")
    assert list(users["user_id"]) == ["u1", "u2", "u3"]
    [p] = report.problems
    assert (p.row, p.field, p.reason, p.value, p.detail) == (5, "user_id", "duplicate user_id", " u1 ", "same as row 2")
    q = quarantine(tmp_path / "q.csv")
    assert q.loc[0, "referral"] == "friend_share" and q.loc[0, "_row"] == "5"


def test_short_rows_are_padded_and_numbered_and_long_rows_named(tmp_path):
    path = write_csv(tmp_path / "events.csv", ["u1,2025-03-01,view", "u2,2025-03-01", '"u,3",2025-03-01,like,,,,,'])
    df, report = read_events(path, now=NOW, chunksize=2)
    assert list(df["user_id"]) == ["u1", "u,3"]
    assert [(p.row, p.field, p.reason) for p in report.problems] == [(3, "event", "unknown event label")]
    bad = write_csv(tmp_path / "bad.csv", ["u1,2025-03-01,view,,,,,", "u1,2025-03-02,view,,,,,", "u1,x,view,,,,,,"])
    with pytest.raises(IngestError, match="row 4 has more fields than the header"):
        read_events(bad, now=NOW)


def test_huge_amount_is_rejected_and_features_stay_finite(tmp_path):
    path = write_csv(tmp_path / "events.csv", [
        "u1,2025-03-01,purchase,,,1e308,0,", "u1,2025-03-02,purchase,,,1e308,0,", "u1,2025-03-03,purchase,,,20,0,",
        "u2,2025-03-01,view,,,0,1e300,"])
    df, report = read_events(path, now=NOW)
    assert report.rejected_by_reason == {"amount too large": 2, "watch_seconds too large": 1}
    assert f"above {MAX_AMOUNT:g}" in report.problems[0].message and report.problems[0].value == "1e308"
    ids = pd.Index(["u1", "u2"], dtype="string", name="user_id")
    gated = SimpleNamespace(events=df, users=canonical_users(pd.DataFrame({"user_id": ids})),
                            grants=pd.DataFrame(True, index=ids, columns=list(SCOPES)))
    f = compute_features(gated, "2025-06-01")
    assert np.isfinite(f.to_numpy()).all() and f.loc["u1", "monetary_total"] == pytest.approx(math.log1p(20))


def test_feature_matrix_that_is_not_finite_is_refused_naming_the_feature():
    events = canonical_events(pd.DataFrame({"user_id": ["a", "a"], "ts": ["2025-01-01", "2025-01-02"],
                                            "event": ["purchase", "purchase"], "amount": [1e308, 1e308]}))
    ids = pd.Index(["a"], dtype="string", name="user_id")
    gated = SimpleNamespace(events=events, users=canonical_users(pd.DataFrame({"user_id": ids})),
                            grants=pd.DataFrame(True, index=ids, columns=list(SCOPES)))
    with pytest.raises(ValueError, match=r"not finite: .*monetary_total \(1 users\)"):
        compute_features(gated, "2025-06-01", ["monetary_total", "frequency"])


def test_signed_number_as_timestamp_is_a_row_problem_not_a_traceback(tmp_path):
    path = write_csv(tmp_path / "events.csv", ["u1,+7,view,,,,,", "u2,-3,view,,,,,", "u3,1735689600,view,,,,,"])
    df, report = read_events(path, now=NOW)
    assert [(p.row, p.field, p.reason, p.value) for p in report.problems] == [
        (2, "ts", "unparseable timestamp", "+7"), (3, "ts", "unparseable timestamp", "-3")]
    assert list(df["ts"]) == [pd.Timestamp("2025-01-01")]
    assert parse_timestamps(pd.Series(["+7", "-3", "1735689600"])).tolist()[:2] == [pd.NaT, pd.NaT]  # was a traceback


@pytest.mark.parametrize("column", [
    pa.array([{"a": 1}, {"a": 2}]),
    pa.array([[1, 2], [3]]),
])
def test_nested_parquet_column_is_a_clear_file_error(tmp_path, column):
    table = pa.table({"user_id": ["u1", "u2"], "ts": ["2025-01-01", "2025-01-02"], "event": ["view", "view"],
                      "extra": column})
    pq.write_table(table, tmp_path / "events.parquet")
    with pytest.raises(IngestError, match="column 'extra' holds nested values") as err:
        read_events(tmp_path / "events.parquet", now=NOW)
    assert str(tmp_path / "events.parquet") in str(err.value)


def test_recency_and_tenure_are_not_capped_at_a_year_when_data_spans_longer():
    events = canonical_events(pd.DataFrame({
        "user_id": ["a", "a", "b"], "ts": ["2023-01-01", "2025-05-01", "2025-05-20"],
        "event": ["purchase", "view", "purchase"], "amount": [10.0, 0.0, 5.0]}))
    ids = pd.Index(["a", "b", "c"], dtype="string", name="user_id")
    gated = SimpleNamespace(events=events, users=canonical_users(pd.DataFrame({"user_id": ids})),
                            grants=pd.DataFrame(True, index=ids, columns=list(SCOPES)))
    f = compute_features(gated, "2025-06-01", ["recency_days", "tenure_days"])
    span = (pd.Timestamp("2025-06-01") - pd.Timestamp("2023-01-01")).days
    assert f.loc["a", "tenure_days"] == pytest.approx(math.log1p(span))  # 882 days, not 365
    assert f.loc["a", "recency_days"] == pytest.approx(math.log1p(span))
    assert f.loc["c", "recency_days"] == pytest.approx(math.log1p(span))  # never bought: as old as the data
    assert set(FEATURES) >= {"recency_days", "tenure_days"}


def test_worker_threads_change_nothing(tmp_path, monkeypatch):
    """Batches validated ahead on worker threads give the same frame, report and quarantine as one at a time."""
    from fedretain.ingest import engine

    rows = [f"u{i % 7},2025-03-01T10:{i % 60:02d}:00,{('view', 'purchase', 'teleport')[i % 3]},,,"
            f"{i % 5},{i % 4},live" for i in range(120)]
    rows += [rows[5], rows[90], "u1,later,view,,,,,"]
    path = write_csv(tmp_path / "events.csv", rows)
    results = []
    for workers in (1, 4):
        monkeypatch.setattr(engine, "WORKERS", workers)
        df, report = read_events(path, now=NOW, chunksize=4, quarantine_path=tmp_path / f"q{workers}.csv")
        results.append((df, report, (tmp_path / f"q{workers}.csv").read_text().replace(f"q{workers}", "")))
    (df1, r1, q1), (df4, r4, q4) = results
    pd.testing.assert_frame_equal(df1, df4)
    assert r1.rows_rejected > 40 and r1.rejected_by_reason == r4.rejected_by_reason
    assert [p.message for p in r1.problems] == [p.message for p in r4.problems]
    assert q1 == q4
