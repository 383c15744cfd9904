"""The bulk import and the record-at-a-time path write identical ledgers.

A consent file imported in one go (Arrow columns, the columnar canonical encoder, one
transaction) and the same events appended one record at a time (``ConsentRecord``,
``records.canonical_json``, one transaction and one signed head per record) must give
byte-identical ``records`` rows — canonical JSON, hash chain, indexed columns, layout —
and the same RFC 9162 root. And a bulk-sized file that fails, in validation or while
inserting, leaves the ledger exactly as it was.
"""

from __future__ import annotations

import csv
import sqlite3
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from fedretain.consent import records, signing
from fedretain.consent.importer import ConsentImportError, _parse_plain_utc, _parse_times
from fedretain.consent.ledger import BULK_ROWS, ConsentLedger
from fedretain.consent.merkle import merkle_root
from fedretain.consent.records import ConsentRecord, format_ts, from_us
from fedretain.consent.vocab import ACTIONS, PURPOSES, SCOPES

COLUMNS = ["record_id", "subject_id", "controller", "purpose", "scopes", "action", "effective_at", "expires_at",
           "collection_method", "notice_version", "jurisdiction", "recorded_by", "recorded_at"]
ROW_SQL = ("SELECT seq, record_id, subject_id, purpose, action, scopes, effective_at, expires_at, canonical, "
           "prev_hash, entry_hash, layout, typeof(canonical), typeof(expires_at) FROM records ORDER BY seq")
_NOW_US = records.to_us(datetime.now(timezone.utc))


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "node.key"
    signing.save_private_key(signing.generate_key(), path)
    return path


def new_ledger(directory: Path, key_file: Path) -> ConsentLedger:
    return ConsentLedger.open(directory / "ledger.sqlite", key_path=key_file, create=True, controller="m1")


# any text but lone surrogates and NUL (neither can be in a UTF-8 CSV cell): quotes, backslashes,
# control characters, non-ASCII, and padding the importer strips
text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=6)
padded = st.builds(lambda a, t, b: a + t + b, st.sampled_from(["", " ", "\t", "\u3000"]), text,
                   st.sampled_from(["", " ", "\xa0"]))


@st.composite
def event(draw, i: int) -> dict[str, str]:
    action = draw(st.sampled_from(ACTIONS))
    scopes = draw(st.lists(st.sampled_from(SCOPES), min_size=1 if action == "grant" else 0, max_size=4))
    eff = draw(st.integers(0, _NOW_US))
    exp = draw(st.one_of(st.none(), st.integers(1, 10**13))) if action == "grant" else None
    return {
        "record_id": draw(st.one_of(st.just(""), padded.map(lambda s: f"{s}#{i}"))),
        "subject_id": draw(padded.filter(str.strip)),
        "controller": "m1",
        "purpose": draw(st.sampled_from(PURPOSES)),
        "scopes": draw(st.sampled_from([";", ","])).join(scopes),
        "action": action,
        "effective_at": format_ts(from_us(eff)),
        "expires_at": "" if exp is None else format_ts(from_us(eff + exp)),
        "collection_method": draw(padded),
        "notice_version": draw(padded),
        "jurisdiction": draw(st.sampled_from(["CN", "DE", ""])),  # often one value per file (a joined scalar)
        "recorded_by": draw(padded),
        "recorded_at": format_ts(from_us(draw(st.sampled_from([0, _NOW_US, 1_700_000_000_123_456])))),
    }


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def one_by_one(led: ConsentLedger, rows: list[dict[str, str]], ids: list[str], source: str) -> None:
    """Append each event as its own ConsentRecord (its own transaction and signed head)."""
    for row, rid in zip(rows, ids):
        led.append(ConsentRecord(
            record_id=rid, subject_id=row["subject_id"], controller=row["controller"], purpose=row["purpose"],
            scopes=row["scopes"], action=row["action"], effective_at=row["effective_at"],
            expires_at=row["expires_at"] or None, collection_method=row["collection_method"],
            notice_version=row["notice_version"], jurisdiction=row["jurisdiction"],
            recorded_by=row["recorded_by"].strip() or f"import:{source}", recorded_at=row["recorded_at"]))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), n=st.integers(1, 6))
def test_bulk_import_and_record_at_a_time_write_identical_ledgers(key_file, data, n):
    rows = [data.draw(event(i)) for i in range(n)]
    derived = [(*(v.strip() for k, v in r.items() if k not in ("recorded_at", "scopes")),
                records._scopes(r["scopes"])) for r in rows if not r["record_id"]]
    assume(len(set(derived)) == len(derived))  # the same event told twice is refused (tested elsewhere)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_p = Path(tmp)
        (tmp_p / "bulk").mkdir()
        (tmp_p / "single").mkdir()
        path = write_csv(tmp_p / "consent.csv", rows)
        bulk, single = new_ledger(tmp_p / "bulk", key_file), new_ledger(tmp_p / "single", key_file)
        try:
            assert bulk.import_file(path) == n
            ids = [r[0] for r in bulk.connection.execute("SELECT record_id FROM records ORDER BY seq")]
            one_by_one(single, rows, ids, path.name)
            got, want = bulk.connection.execute(ROW_SQL).fetchall(), single.connection.execute(ROW_SQL).fetchall()
            assert got == want  # every column of every record, byte for byte, and its SQLite type
            for row in got:
                assert row[8] == ConsentRecord.from_json(row[8]).canonical_json()  # the one canonical producer
            texts = [r[8].encode("utf-8") for r in got]
            assert bulk.root_hex() == single.root_hex() == merkle_root(texts).hex()
            assert bulk.head().root_hex == single.head().root_hex and bulk.head().size == single.head().size == n
            assert bulk.verify().ok and single.verify().ok
        finally:
            bulk.close()
            single.close()


def bulk_rows(n: int, start: int = 0) -> list[dict[str, str]]:
    return [{"record_id": f"r{i}", "subject_id": f"u{i}", "controller": "m1", "purpose": PURPOSES[i % 2],
             "scopes": SCOPES[i % len(SCOPES)], "action": "grant", "effective_at": "2024-05-01T00:00:00Z",
             "expires_at": "", "collection_method": "app", "notice_version": "v1", "jurisdiction": "CN",
             "recorded_by": "", "recorded_at": "2024-05-01T00:00:00Z"} for i in range(start, start + n)]


def snapshot(led: ConsentLedger) -> tuple[object, ...]:
    conn = led.connection
    return (conn.execute(ROW_SQL).fetchall(), conn.execute("SELECT * FROM heads").fetchall(),
            sorted(conn.execute("SELECT name, sql FROM sqlite_master").fetchall()))


def test_a_bad_row_at_the_end_of_a_bulk_file_changes_nothing(tmp_path, key_file):
    led = new_ledger(tmp_path, key_file)
    try:
        led.import_file(write_csv(tmp_path / "first.csv", bulk_rows(3)))
        before = snapshot(led)
        rows = bulk_rows(BULK_ROWS, start=10)
        rows[-1]["effective_at"] = "2024-13-01T00:00:00Z"
        with pytest.raises(ConsentImportError) as err:
            led.import_file(write_csv(tmp_path / "big.csv", rows))
        assert (err.value.file, err.value.row, err.value.field) == ("big.csv", BULK_ROWS, "effective_at")
        assert "big.csv, row 20000, field 'effective_at'" in str(err.value)
        assert snapshot(led) == before
    finally:
        led.close()


def test_a_duplicate_found_while_inserting_a_bulk_file_changes_nothing(tmp_path, key_file):
    """The duplicate is only found by the unique index, after the bulk insert dropped and rebuilt it."""
    led = new_ledger(tmp_path, key_file)
    try:
        led.import_file(write_csv(tmp_path / "first.csv", bulk_rows(3)))
        before = snapshot(led)
        rows = bulk_rows(BULK_ROWS, start=10)
        rows[-2] = bulk_rows(1, start=1)[0]  # record id r1 is already in the ledger
        with pytest.raises(ConsentImportError, match="already in the ledger") as err:
            led.import_file(write_csv(tmp_path / "big.csv", rows))
        assert (err.value.file, err.value.row, err.value.field) == ("big.csv", BULK_ROWS - 1, "record_id")
        assert snapshot(led) == before
        assert led.verify().ok
        conn = sqlite3.connect(str(tmp_path / "ledger.sqlite"))  # and another connection sees the same
        assert conn.execute("SELECT count(*) FROM records").fetchone()[0] == 3
        conn.close()
    finally:
        led.close()


@settings(max_examples=150, deadline=None)
@given(us=st.lists(st.integers(-10**15, 253_402_300_799_999_999), min_size=1, max_size=4),
       digits=st.integers(0, 6), spelling=st.sampled_from(["Z", "+00:00", " Z", "z"]))
@example(us=[9_223_372_036_854_776], digits=6, spelling="Z")  # beyond pandas' nanosecond range (year 2262)
def test_arrow_timestamp_fast_path_reads_what_pandas_reads(us, digits, spelling):
    """The importer's Arrow parser takes a column only when it reads it exactly as records.parse_ts would."""
    texts = []
    for v in us:
        full = format_ts(from_us(v)) if v >= 0 else "1969-12-31T23:59:59.000000Z"
        texts.append(full[:19] + (full[19:20 + digits] if digits else "") + spelling)
    present = np.ones(len(texts), dtype=bool)
    got = _parse_times(pa.array(texts), present)
    for text, value in zip(texts, got):
        # records.parse_ts's reading (it refuses times before 1970 afterwards, as the importer does)
        ts = pd.to_datetime(pd.Series([text]), utc=True, format="ISO8601", errors="coerce").iloc[0]
        want = None if pd.isna(ts) else records.to_us(ts.to_pydatetime())  # exact µs arithmetic, any year
        assert (value if value != np.iinfo(np.int64).min else None) == want, text
    if spelling != "Z" or min(us) < 0:
        assert _parse_plain_utc(pa.array(texts)) is None  # only plain UTC text in 1970..9999 takes the fast path
