"""Incremental replay (issue 14): the replay columns kept across rounds give exactly the state a fresh
replay of the file gives, see appended withdrawals at once, and are never served for a replaced file."""

from __future__ import annotations

import shutil
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest

from fedretain.consent import replay_cache
from fedretain.consent.gate import ConsentError, decide
from fedretain.consent.incremental import IncrementalLedger
from fedretain.consent.ledger import ConsentLedger
from fedretain.consent.records import ConsentRecord, to_us
from fedretain.consent.replay import log_frame, replay_state
from fedretain.consent.vocab import SCOPES

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
PURPOSES = ("retention_modeling", "ltv_modeling", "analytics")
P = PURPOSES[0]


@pytest.fixture(autouse=True)
def _fresh_cache():
    replay_cache.clear()
    yield
    replay_cache.clear()


def random_records(rng: np.random.Generator, n: int, start: int, n_subj: int) -> list[ConsentRecord]:
    """Grants (some expiring), withdrawals and expiries over a few purposes; times anywhere (back-dated)."""
    out = []
    for i in range(start, start + n):
        subj, purpose = f"u{rng.integers(n_subj)}", PURPOSES[rng.integers(len(PURPOSES))]
        scopes = tuple(s for s in SCOPES if rng.random() < 0.4) or (SCOPES[0],)
        at = T0 + timedelta(days=int(rng.integers(0, 60)))  # coarse: many equal effective times
        kind = rng.random()
        if kind < 0.55:
            exp = at + timedelta(days=int(rng.integers(1, 30))) if rng.random() < 0.3 else None
            out.append(ConsentRecord.grant(subj, "m1", purpose, scopes, at, expires_at=exp, record_id=f"r{i}"))
        elif kind < 0.85:
            out.append(ConsentRecord.withdraw(subj, "m1", purpose, at, scopes if rng.random() < 0.5 else (),
                                              record_id=f"r{i}"))
        else:
            out.append(ConsentRecord(f"r{i}", subj, "m1", purpose, scopes, "expire", at))
    return out


def uncached(ledger: ConsentLedger, purpose: str, at: datetime, subjects=None, size=None) -> pd.DataFrame:
    """The replay as it was before the cache: every record read from the file."""
    return replay_state(log_frame(ledger.connection, purpose, at, size=size), to_us(at, "at"), subjects)


@pytest.mark.parametrize("seed", range(3))
def test_cached_replay_after_appends_equals_a_fresh_replay(tmp_path, seed):
    rng = np.random.default_rng(seed)
    db, key = tmp_path / "consent.db", tmp_path / "k.pem"
    times = [T0 + timedelta(days=d) for d in (-1, 0, 17, 30, 30.5, 59, 70)]
    subjects = pd.Index([f"u{i}" for i in range(45)], dtype=object)  # some without any record
    with ConsentLedger.create(db, controller="m1", key_path=key) as ledger:
        ledger.append_many(random_records(rng, 60, 0, 40))
        n = 60
        for _ in range(4):  # rounds: a cached state, then k appended records (back-dated ones too)
            for purpose in PURPOSES[:2]:
                ledger.state_at(purpose, times[0])  # fills / extends the cache
            k = int(rng.integers(1, 25))
            ledger.append_many(random_records(rng, k, n, 44))  # new subjects too
            n += k
            with ConsentLedger.open(db) as fresh:
                for purpose in PURPOSES:
                    for at in times:
                        pd.testing.assert_frame_equal(ledger.state_at(purpose, at), uncached(fresh, purpose, at))
                        pd.testing.assert_frame_equal(ledger.state_at(purpose, at, subjects=subjects),
                                                      uncached(fresh, purpose, at, subjects))
                    assert replay_cache._CACHE[(str(db.resolve()), purpose)].size == n
                size = int(rng.integers(n // 2, n))  # a shorter verified prefix: replayed from the file
                pd.testing.assert_frame_equal(ledger.state_at(P, times[4], subjects, size=size),
                                              uncached(fresh, P, times[4], subjects, size))


def test_a_withdrawal_appended_between_rounds_removes_the_user_in_the_next_round(tmp_path):
    db, key, state = tmp_path / "consent.db", tmp_path / "k.pem", tmp_path / "state"
    users = pd.Index(["u1", "u2", "u3"], dtype=object)
    with ConsentLedger.create(db, controller="m1", key_path=key) as ledger:
        ledger.append_many([ConsentRecord.grant(u, "m1", P, ("purchase_history",), T0, record_id=f"g{u}")
                            for u in users])
    at = T0 + timedelta(days=10)
    with ConsentLedger.open(db) as ledger:  # the node opens its ledger every round
        first = decide(IncrementalLedger(ledger, state, "run-1"), P, at, users)
    assert list(first.grants.index) == ["u1", "u2", "u3"]
    assert replay_cache._CACHE, "the first round keeps the replay columns"
    with ConsentLedger.open(db, key_path=key) as ledger:  # back-dated: effective before the cached grants' time
        ledger.append(ConsentRecord.withdraw("u2", "m1", P, T0 - timedelta(days=1), record_id="w-early"))
        ledger.append(ConsentRecord.withdraw("u3", "m1", P, T0 + timedelta(days=2), record_id="w3"))
    with ConsentLedger.open(db) as ledger:
        calls = []
        real = replay_cache._extend
        replay_cache._extend = lambda conn, e, p, size: (calls.append(e.size), real(conn, e, p, size))[1]
        try:
            second = decide(IncrementalLedger(ledger, state, "run-1"), P, at + timedelta(hours=1), users)
        finally:
            replay_cache._extend = real
    assert calls == [3], "the second round reads only the records appended after the cached 3"
    assert list(second.grants.index) == ["u1", "u2"]  # the back-dated withdrawal is overridden by the later grant
    assert second.ledger_size == 5


def _rounds_then_rollback(tmp_path, replace):
    db, key, state = tmp_path / "consent.db", tmp_path / "k.pem", tmp_path / "state"
    users = pd.Index(["u1", "u2"], dtype=object)
    with ConsentLedger.create(db, controller="m1", key_path=key) as ledger:
        ledger.append_many([ConsentRecord.grant(u, "m1", P, ("purchase_history",), T0, record_id=f"g{u}")
                            for u in users])
    old = tmp_path / "old.db"
    shutil.copyfile(db, old)  # the attacker keeps a copy while both users still grant
    at = T0 + timedelta(days=10)
    with ConsentLedger.open(db, key_path=key) as ledger:
        ledger.append(ConsentRecord.withdraw("u1", "m1", P, T0 + timedelta(days=1), record_id="w1"))
        d = decide(IncrementalLedger(ledger, state, "run-1"), P, at, users)
    assert list(d.grants.index) == ["u2"]
    replace(old, db)  # between rounds: the older copy takes the ledger's place
    return db, key, state, users, at


@pytest.mark.parametrize("how", ["rename", "overwrite-in-place"])
def test_an_older_copy_of_the_file_is_refused_and_never_served_from_the_cache(tmp_path, how):
    def replace(old, db):
        if how == "rename":
            old.replace(db)  # a new inode
        else:
            db.write_bytes(old.read_bytes())  # same inode, older bytes

    db, key, state, users, at = _rounds_then_rollback(tmp_path, replace)
    with ConsentLedger.open(db) as ledger:  # the node's next round: the verifier refuses the shrunk ledger
        with pytest.raises(ConsentError, match="shrank from 3 to 2"):
            decide(IncrementalLedger(ledger, state, "run-1"), P, at, users)
        # and the state read straight from the rolled-back file is the file's own, not the cached one
        pd.testing.assert_frame_equal(ledger.state_at(P, at, users), uncached(ledger, P, at, users))
        assert ledger.state_at(P, at, users).loc["u1"].any()  # the older file still grants u1


def test_a_same_size_file_with_another_history_is_not_served_from_the_cache(tmp_path):
    db, key = tmp_path / "consent.db", tmp_path / "k.pem"
    at = T0 + timedelta(days=10)
    with ConsentLedger.create(db, controller="m1", key_path=key) as ledger:
        ledger.append(ConsentRecord.grant("u1", "m1", P, ("purchase_history",), T0, record_id="g1"))
        ledger.append(ConsentRecord.grant("u2", "m1", P, ("purchase_history",), T0, record_id="g2"))
        assert ledger.state_at(P, at).to_numpy().any(axis=1).tolist() == [True, True]
    other = tmp_path / "other"
    other.mkdir()
    with ConsentLedger.create(other / "consent.db", controller="m1", key_path=key) as ledger:
        ledger.append(ConsentRecord.grant("u1", "m1", P, ("purchase_history",), T0, record_id="g1"))
        ledger.append(ConsentRecord.withdraw("u2", "m1", P, T0, record_id="w2"))
    db.write_bytes((other / "consent.db").read_bytes())  # same path, same inode, same size, another tip
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"consent.db{suffix}").unlink(missing_ok=True)
    with ConsentLedger.open(db) as ledger:
        assert ledger.state_at(P, at).to_numpy().any(axis=1).tolist() == [True, False]
