"""The consent ledger: append-only storage, signed heads, transactional import, point-in-time replay."""

from __future__ import annotations

import json
import sqlite3
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedretain.consent import signing
from fedretain.consent.importer import ConsentImportError
from fedretain.consent.ledger import ConsentLedger, LedgerError
from fedretain.consent.merkle import root_from_leaf_hashes, verify_consistency, verify_inclusion
from fedretain.consent.records import ConsentRecord, to_us
from fedretain.consent.vocab import SCOPES, UnknownTermError

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
HEADER = "subject_id,controller,purpose,scopes,action,effective_at,expires_at,collection_method,notice_version," \
         "jurisdiction,recorded_by\n"


def day(n: float) -> datetime:
    return T0 + timedelta(days=n)


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "node.key"
    signing.save_private_key(signing.generate_key(), path)
    return path


@pytest.fixture
def ledger(tmp_path, key_file):
    led = ConsentLedger.open(tmp_path / "ledger.sqlite", key_path=key_file, create=True, controller="m1")
    yield led
    led.close()


def grant(subject, scopes, at, purpose="retention_modeling", **kw):
    return ConsentRecord.grant(subject, "m1", purpose, scopes, at, **kw)


def withdraw(subject, at, scopes=(), purpose="retention_modeling", **kw):
    return ConsentRecord.withdraw(subject, "m1", purpose, at, scopes=scopes, **kw)


def csv_rows(n, bad_row=None, bad_field="scopes", bad_value="gps"):
    lines = []
    for i in range(1, n + 1):
        row = {"subject_id": f"u{i}", "controller": "m1", "purpose": "retention_modeling",
               "scopes": "purchase_history;engagement", "action": "grant",
               "effective_at": f"2024-01-{1 + i % 28:02d}T10:00:00Z", "expires_at": "",
               "collection_method": "app_dialog", "notice_version": "v1", "jurisdiction": "CN", "recorded_by": "t"}
        if i == bad_row:
            row[bad_field] = bad_value
        lines.append(",".join(row.values()))
    return HEADER + "\n".join(lines) + "\n"


def test_create_open_and_signed_empty_head(tmp_path, key_file, ledger):
    head = ledger.head()
    assert head.size == 0 and head.root_hex == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert head.verify(signing.load_private_key(key_file).public_key())
    assert ledger.verify().ok
    assert sqlite3.connect(ledger.path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(LedgerError, match="already exists"):
        ConsentLedger.create(ledger.path, controller="m1", key_path=key_file)
    with pytest.raises(LedgerError, match="no consent ledger"):
        ConsentLedger.open(tmp_path / "nope.sqlite")
    other = tmp_path / "other.key"
    signing.save_private_key(signing.generate_key(), other)
    with pytest.raises(LedgerError, match="does not match"):
        ConsentLedger.open(ledger.path, key_path=other)


def test_append_signs_a_head_per_batch_with_the_merkle_root(ledger, key_file):
    ledger.append(grant("u1", "purchase_history", day(0)))
    ledger.append_many([grant("u2", "engagement", day(1)), withdraw("u1", day(2))])
    heads = ledger.heads()
    assert [h.size for h in heads] == [0, 1, 3]
    pub = signing.load_private_key(key_file).public_key()
    assert all(h.verify(pub) for h in heads)
    hashes = ledger.leaf_hashes()
    assert heads[-1].root_hex == root_from_leaf_hashes(hashes).hex() == ledger.root_hex()
    assert heads[1].root_hex == root_from_leaf_hashes(hashes[:1]).hex()
    # the checkpoint text is the documented one
    assert heads[-1].checkpoint().decode().split("\n")[:4] == ["fedretain-consent-ledger/v1", "m1", "3",
                                                              heads[-1].root_hex]
    # proofs the server can check against signed heads
    rid = ledger.records()[1].record_id
    index, size, path = ledger.inclusion_proof(rid)
    assert verify_inclusion(hashes[index], index, size, [bytes.fromhex(p) for p in path],
                            bytes.fromhex(heads[-1].root_hex))
    cproof = [bytes.fromhex(p) for p in ledger.consistency_proof(1)]
    assert verify_consistency(1, 3, cproof, bytes.fromhex(heads[1].root_hex), bytes.fromhex(heads[-1].root_hex))


def test_records_of_another_controller_are_refused(ledger):
    with pytest.raises(ConsentImportError, match="controller"):
        ledger.append(ConsentRecord.grant("u1", "other-shop", "analytics", "social", day(0)))
    assert ledger.size == 0


def test_database_triggers_refuse_update_and_delete(ledger):
    ledger.append(grant("u1", "purchase_history", day(0)))
    ledger.record_usage("run1", 0, "retention_modeling", "f", {"purchase_history": 1}, 1, 1, ledger.head().root_hex,
                        day(1), ["u1"])
    raw = sqlite3.connect(ledger.path)
    for sql in ("UPDATE records SET scopes = 'device' WHERE seq = 1", "DELETE FROM records WHERE seq = 1",
                "UPDATE heads SET size = 5", "DELETE FROM heads", "UPDATE meta SET value = 'x'",
                "DELETE FROM usage", "DELETE FROM usage_subjects", "UPDATE usage SET n_users = 0"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            raw.execute(sql)
    raw.close()
    assert ledger.verify().ok


def test_import_csv_and_jsonl(ledger, tmp_path):
    csv = tmp_path / "consent.csv"
    csv.write_text(csv_rows(10))
    assert ledger.import_file(csv) == 10
    jl = tmp_path / "more.jsonl"
    jl.write_text("\n".join(json.dumps(d) for d in [
        {"subject_id": "u1", "controller": "m1", "purpose": "retention_modeling", "scopes": [], "action": "withdraw",
         "effective_at": "2024-02-01T00:00:00Z"},
        {"subject_id": "u2", "controller": "m1", "purpose": "analytics", "scopes": ["social", "profile"],
         "action": "grant", "effective_at": "2024-02-01T00:00:00+08:00", "expires_at": "2024-06-01T00:00:00Z",
         "record_id": "given-id"},
    ]) + "\n\n")
    assert ledger.import_file(jl) == 2
    assert ledger.size == 12 and [h.size for h in ledger.heads()] == [0, 10, 12]
    recs = ledger.records()
    assert recs[-1].record_id == "given-id" and recs[-1].scopes == ("profile", "social")
    assert recs[-1].effective_at == datetime(2024, 1, 31, 16, tzinfo=timezone.utc)
    assert recs[0].recorded_by == "t" and recs[-2].recorded_by == "import:more.jsonl"
    # the bulk encoder and the record encoder agree byte for byte
    stored = [r[0] for r in ledger.connection.execute("SELECT canonical FROM records ORDER BY seq")]
    assert stored == [r.canonical_json() for r in recs]
    assert ledger.verify().ok
    # importing the same file again is refused (content-derived ids), nothing changes
    with pytest.raises(ConsentImportError, match="already in the ledger") as err:
        ledger.import_file(csv)
    assert err.value.row == 1
    assert ledger.size == 12


def test_bad_row_57_imports_nothing_and_names_file_row_field(ledger, tmp_path):
    ledger.import_file(_write(tmp_path / "first.csv", csv_rows(3)))
    before = (ledger.size, len(ledger.heads()), ledger.head().root_hex)
    path = _write(tmp_path / "consent.csv", csv_rows(100, bad_row=57))
    with pytest.raises(ConsentImportError) as err:
        ledger.import_file(path)
    msg = str(err.value)
    assert "consent.csv" in msg and "row 57" in msg and "'scopes'" in msg and "gps" in msg
    assert (err.value.file, err.value.row, err.value.field) == ("consent.csv", 57, "scopes")
    assert (ledger.size, len(ledger.heads()), ledger.head().root_hex) == before
    assert ledger.verify().ok


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("purpose", "marketing", "unknown purpose 'marketing'"),
    ("action", "revoke", "unknown consent action"),
    ("effective_at", "01/02/2024", "not an ISO 8601 timestamp"),
    ("controller", "m2", "not this ledger's controller"),
    ("subject_id", "", "must not be empty"),
    ("expires_at", "2023-01-01T00:00:00Z", "expire after"),
])
def test_import_errors_name_the_field(ledger, tmp_path, field, value, needle):
    path = _write(tmp_path / "c.csv", csv_rows(60, bad_row=57, bad_field=field, bad_value=value))
    with pytest.raises(ConsentImportError) as err:
        ledger.import_file(path)
    assert (err.value.row, err.value.field) == (57, field)
    assert needle in str(err.value)
    assert ledger.size == 0


def test_import_structural_errors(ledger, tmp_path):
    with pytest.raises(ConsentImportError, match="required column"):
        ledger.import_file(_write(tmp_path / "a.csv", "subject_id,controller\nu1,m1\n"))
    with pytest.raises(ConsentImportError, match="unknown column"):
        ledger.import_file(_write(tmp_path / "b.csv", csv_rows(2).replace("jurisdiction", "jurisdictoin")))
    with pytest.raises(ConsentImportError, match="line 2.*not valid JSON|row 2"):
        ledger.import_file(_write(tmp_path / "c.jsonl", '{"subject_id": "u1"}\n{oops\n'))
    dup = csv_rows(3) + csv_rows(1).split("\n", 1)[1]  # row 4 repeats row 1 exactly
    with pytest.raises(ConsentImportError, match="repeats row 1") as err:
        ledger.import_file(_write(tmp_path / "d.csv", dup))
    assert err.value.row == 4
    with pytest.raises(ConsentImportError, match="unsupported file type"):
        ledger.import_file(_write(tmp_path / "e.xlsx", "x"))
    assert ledger.size == 0


def test_unknown_purpose_in_state_at(ledger):
    with pytest.raises(UnknownTermError, match="purpose"):
        ledger.state_at("marketing", day(1))


def test_withdrawal_effective_at_t(ledger):
    t = day(10)
    ledger.append_many([grant("u1", "purchase_history;engagement", day(0)),
                        withdraw("u1", t, scopes=("engagement",)),
                        grant("u2", "profile", day(0), expires_at=day(5))])
    before = ledger.state_at("retention_modeling", t - timedelta(microseconds=1))
    at = ledger.state_at("retention_modeling", t)
    assert before.loc["u1", "engagement"] and before.loc["u1", "purchase_history"]
    assert not at.loc["u1", "engagement"] and at.loc["u1", "purchase_history"]
    # expiry: granted before, not at or after expires_at
    assert ledger.state_at("retention_modeling", day(4.9)).loc["u2", "profile"]
    assert not ledger.state_at("retention_modeling", day(5)).loc["u2", "profile"]
    # before any record there is no subject; other purposes are untouched
    assert ledger.state_at("retention_modeling", day(-1)).empty
    assert ledger.state_at("analytics", day(20)).empty
    s = ledger.state_at("retention_modeling", t, subjects=["u1", "ghost"])
    assert list(s.index) == ["u1", "ghost"] and not s.loc["ghost"].any()
    assert list(s.columns) == list(SCOPES)


def test_backdated_withdrawal_appended_later_counts_from_its_effective_time(ledger):
    ledger.append(grant("u1", "social", day(0)))
    ledger.append(grant("u1", "social", day(20)))  # re-grant later
    ledger.append(withdraw("u1", day(10)))  # recorded last, effective in between
    assert ledger.state_at("retention_modeling", day(15)).loc["u1"].sum() == 0
    assert ledger.state_at("retention_modeling", day(25)).loc["u1", "social"]


def test_history_and_usage(ledger):
    ledger.append_many([grant("u1", "purchase_history", day(0)), grant("u2", "social", day(1)),
                        withdraw("u1", day(3))])
    h = ledger.history("u1")
    assert list(h["action"]) == ["grant", "withdraw"] and list(h["seq"]) == [1, 3]
    head = ledger.head()
    uid = ledger.record_usage("run-7", 2, "retention_modeling", ["recency", "frequency"],
                              {"purchase_history": 1, "social": 1}, 2, head.size, head.root_hex, day(2),
                              ["u1", "u2"])
    ledger.record_usage("run-8", 0, "retention_modeling", "f", {"social": 1}, 1, head.size, head.root_hex, day(4),
                        ["u2"])
    used = ledger.usages("u1")
    assert [u.usage_id for u in used] == [uid] and used[0].run_id == "run-7"
    assert used[0].feature_set == "frequency,recency" and used[0].scope_counts["social"] == 1
    assert [u.run_id for u in ledger.usages("u2")] == ["run-7", "run-8"]
    assert len(ledger.usages()) == 2 and ledger.usages("nobody") == []
    with pytest.raises(ValueError, match="n_users"):
        ledger.record_usage("r", 0, "retention_modeling", "f", {}, 3, 1, head.root_hex, day(1), ["u1"])
    with pytest.raises(ValueError, match="unknown scope"):
        ledger.record_usage("r", 0, "retention_modeling", "f", {"gps": 1}, 1, 1, head.root_hex, day(1), ["u1"])
    assert len(ledger.usages()) == 2
    assert ledger.verify().ok


def test_writing_without_the_key_is_refused(ledger):
    ro = ConsentLedger.open(ledger.path)
    with pytest.raises(LedgerError, match="without the node key"):
        ro.append(grant("u1", "social", day(0)))
    res = ro.verify()
    assert res.ok and res.key_source == "ledger (self-declared)"
    ro.close()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- property: vectorised replay == naive per-record replay ---------------------------------
def naive_state(records, purpose, at):
    """Literal reading of the documented semantics, one record at a time."""
    at_us = to_us(at)
    rel = [(to_us(r.effective_at), i, r) for i, r in enumerate(records)
           if r.purpose == purpose and to_us(r.effective_at) <= at_us]
    state: dict[tuple[str, str], int | None] = {}
    subjects = []
    for _, _, r in sorted(rel, key=lambda x: (x[0], x[1])):
        if r.subject_id not in subjects:
            subjects.append(r.subject_id)
        if r.action == "grant":
            for s in r.scopes:
                state[(r.subject_id, s)] = None if r.expires_at is None else to_us(r.expires_at)
        else:
            for s in r.scopes or SCOPES:
                state.pop((r.subject_id, s), None)
    return {u: {s: (u, s) in state and (state[(u, s)] is None or state[(u, s)] > at_us) for s in SCOPES}
            for u in subjects}


record_st = st.builds(
    lambda subj, purpose, action, scopes, eff, exp: (subj, purpose, action, tuple(scopes), eff, exp),
    st.sampled_from(["a", "b", "c"]), st.sampled_from(["retention_modeling", "analytics"]),
    st.sampled_from(["grant", "grant", "withdraw", "expire"]), st.sets(st.sampled_from(SCOPES[:4]), max_size=3),
    st.integers(0, 8), st.one_of(st.none(), st.integers(1, 6)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.lists(record_st, min_size=1, max_size=8), min_size=1, max_size=3),
       times=st.lists(st.integers(-1, 10), min_size=1, max_size=4))
def test_state_at_matches_naive_replay(key_file, batches, times):
    with tempfile.TemporaryDirectory() as tmp:
        led = ConsentLedger.open(Path(tmp) / "l.sqlite", key_path=key_file, create=True, controller="m1")
        records = []
        for batch in batches:
            recs = []
            for subj, purpose, action, scopes, eff, exp in batch:
                if action == "grant":
                    recs.append(ConsentRecord.grant(subj, "m1", purpose, scopes or ("device",), day(eff),
                                                    expires_at=None if exp is None else day(eff + exp)))
                else:
                    recs.append(ConsentRecord(f"w{len(records) + len(recs)}", subj, "m1", purpose, scopes, action,
                                              day(eff)))
            led.append_many(recs)
            records += recs
        for t in times:
            for purpose in ("retention_modeling", "analytics"):
                got = led.state_at(purpose, day(t))
                want = naive_state(records, purpose, day(t))
                assert sorted(got.index) == sorted(want)
                for u, row in want.items():
                    assert got.loc[u].to_dict() == row, (u, t, purpose)
                few = led.state_at(purpose, day(t), subjects=["b", "zz", "a"])  # via the subject index
                want_few = got.reindex(pd.Index(["b", "zz", "a"], dtype=object, name="subject_id"), fill_value=False)
                pd.testing.assert_frame_equal(few, want_few)
        led.close()
