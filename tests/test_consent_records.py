"""Consent records: vocabulary validation naming the field, canonical encoding, signing keys."""

from __future__ import annotations

import json
import os
import stat
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedretain.consent import signing
from fedretain.consent.records import (
    FIELDS,
    ConsentRecord,
    RecordError,
    canonical_json_columns,
    format_ts,
    parse_ts,
    to_us,
)
from fedretain.consent.vocab import PURPOSES, SCOPES, VOCAB_VERSION, UnknownTermError

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)


def rec(**kw):
    base = dict(record_id="r1", subject_id="u1", controller="m1", purpose="retention_modeling",
                scopes=("purchase_history",), action="grant", effective_at=T0)
    base.update(kw)
    return ConsentRecord(**base)


@pytest.mark.parametrize(("field", "value"), [
    ("purpose", "marketing"), ("scopes", ("purchase_history", "gps")), ("action", "revoke"),
])
def test_unknown_terms_name_the_field(field, value):
    with pytest.raises(UnknownTermError) as err:
        rec(**{field: value})
    assert f"field {field!r}" in str(err.value)
    assert str(value if field != "scopes" else "gps") in str(err.value)
    assert err.value.field == field


@pytest.mark.parametrize(("kw", "field"), [
    ({"subject_id": " "}, "subject_id"),
    ({"controller": ""}, "controller"),
    ({"scopes": ()}, "scopes"),  # a grant must name scopes
    ({"effective_at": "yesterday"}, "effective_at"),
    ({"effective_at": "1969-12-31T00:00:00Z"}, "effective_at"),
    ({"expires_at": T0}, "expires_at"),  # expiring when it starts
    ({"action": "withdraw", "expires_at": T0 + timedelta(days=1)}, "expires_at"),
    ({"subject_id": 42}, "subject_id"),
])
def test_invalid_fields_are_named(kw, field):
    with pytest.raises(RecordError) as err:
        rec(**kw)
    assert err.value.field == field
    assert f"field {field!r}" in str(err.value)


def test_normalisation():
    r = rec(scopes="engagement; purchase_history,engagement", effective_at="2024-01-01T08:00:00+08:00",
            purpose=" retention_modeling ")
    assert r.scopes == ("engagement", "purchase_history")
    assert r.effective_at == T0
    assert r.purpose == "retention_modeling"
    assert r.vocab_version == VOCAB_VERSION
    w = rec(action="withdraw", scopes=())
    assert w.scopes == ()  # withdraw with no scopes = every scope
    naive = rec(effective_at=datetime(2024, 1, 1))  # naive means UTC
    assert naive.effective_at == T0


def test_canonical_bytes_are_sorted_compact_json_and_round_trip():
    r = rec(expires_at=T0 + timedelta(days=30), jurisdiction="CN", notice_version="v2", recorded_by="op")
    text = r.canonical_json()
    d = json.loads(text)
    assert list(d) == sorted(d) == list(FIELDS)
    assert text == json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert r.canonical_bytes() == text.encode("utf-8")
    assert d["effective_at"] == "2024-01-01T00:00:00.000000Z"
    back = ConsentRecord.from_json(text)
    assert back == r and back.canonical_bytes() == r.canonical_bytes()


def test_from_json_rejects_unknown_fields():
    d = json.loads(rec().canonical_json())
    d["extra"] = 1
    with pytest.raises(RecordError, match="extra"):
        ConsentRecord.from_json(d)


texts = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12).filter(lambda s: s.strip() == s)


@settings(max_examples=150, deadline=None)
@given(subject=texts, controller=texts, by=st.text(st.characters(blacklist_categories=("Cs",)), max_size=10)
       .filter(lambda s: s.strip() == s),
       purpose=st.sampled_from(PURPOSES), scopes=st.sets(st.sampled_from(SCOPES), min_size=1),
       seconds=st.integers(0, 4_000_000_000), micro=st.integers(0, 999_999))
def test_canonical_encoder_equals_json_dumps(subject, controller, by, purpose, scopes, seconds, micro):
    eff = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=seconds, microseconds=micro)
    r = ConsentRecord("id-" + subject, subject, controller, purpose, tuple(scopes), "grant", eff, recorded_by=by)
    d = r.to_dict()
    assert r.canonical_json() == json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # the column-wise bulk encoder produces the very same text
    cols = {k: [v] for k, v in r._canonical_values().items()}
    assert canonical_json_columns(cols) == [r.canonical_json()]
    assert to_us(eff) == seconds * 1_000_000 + micro
    assert parse_ts(format_ts(eff)) == eff


def test_signing_key_file_is_private_and_round_trips(tmp_path):
    path = tmp_path / "node.key"
    key = signing.generate_key()
    signing.save_private_key(key, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = signing.load_private_key(path)
    assert signing.fingerprint(loaded) == signing.fingerprint(key)
    sig = signing.sign(loaded, b"msg")
    pub = signing.load_public_key(signing.public_key_pem(key))
    assert signing.verify_signature(pub, sig, b"msg")
    assert not signing.verify_signature(pub, sig, b"msg2")
    with pytest.raises(signing.KeyFileError, match="already exists"):
        signing.save_private_key(key, path)
    os.chmod(path, 0o644)
    with pytest.raises(signing.KeyFileError, match="chmod 600"):
        signing.load_private_key(path)
    with pytest.raises(signing.KeyFileError, match="does not exist"):
        signing.load_private_key(tmp_path / "missing.key")
