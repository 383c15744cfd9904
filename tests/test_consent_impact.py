"""Erasure impact (``fedretain.consent.impact``): a user who withdrew between two runs.

Run A trains on alice in rounds 1-3 (and evaluates her in round 2); alice withdraws; run B
trains without her. The officer's view must list every model of run A from the first round
that used her (with the hashes the platform recorded), the consent she had then, that she no
longer consents, the DP bound of each run, and nothing of run B.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

from fedretain.consent.impact import DPBound, read_run_record, subject_impact, withdrawn_users_in_models
from fedretain.consent.ledger import ConsentLedger
from fedretain.consent.records import ConsentRecord

PURPOSE = "retention_modeling"
T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)


def _run_json(tmp_path, run_id, rounds, dp_mode="local", eps=3.0):
    folder = tmp_path / run_id
    (folder / "checkpoints").mkdir(parents=True)
    entries = []
    for r in rounds:
        ckpt = folder / "checkpoints" / f"round_{r:04d}.pt"
        ckpt.write_bytes(f"model {run_id} {r}".encode())
        entries.append({"round": r, "checkpoint": str(ckpt)})
    rec = {"run_id": run_id, "config": {"dp_mode": dp_mode, "target_epsilon": eps, "target_delta": 1e-5},
           "rounds": entries}
    (folder / "run.json").write_text(json.dumps(rec))
    return folder / "run.json"


def _ledger(tmp_path):
    led = ConsentLedger.create(tmp_path / "consent.db", controller="shop", key_path=tmp_path / "key.pem")
    for user in ("alice", "bob"):
        led.append(ConsentRecord.grant(user, "shop", PURPOSE, ["purchase_history", "engagement"], T0))
    return led


def _use(led, run_id, rnd, phase, at, users):
    head = led.head()
    led.record_usage(run_id, rnd, PURPOSE, f"{phase}:recency_days", {"purchase_history": len(users)}, len(users),
                     head.size, head.root_hex, at, users)


def test_withdrawal_between_two_runs(tmp_path):
    with _ledger(tmp_path) as led:
        for rnd in (1, 2, 3):
            _use(led, "run-a", rnd, "train", "2024-02-01", ["alice", "bob"])
        _use(led, "run-a", 2, "evaluate", "2024-02-01", ["alice"])
        led.append(ConsentRecord.withdraw("alice", "shop", PURPOSE, "2024-03-01"))
        for rnd in (1, 2):
            _use(led, "run-b", rnd, "train", "2024-04-01", ["bob"])
        runs = [read_run_record(_run_json(tmp_path, "run-a", [1, 2, 3])),
                read_run_record(_run_json(tmp_path, "run-b", [1, 2], dp_mode="none"))]
        impact = subject_impact(led, "alice", runs=runs, now=datetime(2024, 5, 1, tzinfo=timezone.utc))

        assert impact.scopes_now == {PURPOSE: ()}
        assert [(u.run_id, u.round, u.phase) for u in impact.uses] == [
            ("run-a", 1, "train"), ("run-a", 2, "train"), ("run-a", 3, "train"), ("run-a", 2, "evaluate")]
        assert all(set(u.scopes_then) == {"purchase_history", "engagement"} for u in impact.uses)
        assert not any(u.consented_now for u in impact.uses)
        # every model of run A from round 1 on, with the hash of the checkpoint the platform kept
        replaced = impact.models_to_replace
        assert [(m.run_id, m.round) for m in replaced] == [("run-a", 1), ("run-a", 2), ("run-a", 3)]
        assert all(m.sha256 and len(m.sha256) == 64 for m in replaced)
        # round 3 only replaces round 3's model onward; evaluation changed no weights
        r3 = impact.uses[2]
        assert [m.round for m in r3.replaced_by_retrain] == [3]
        assert impact.uses[3].replaced_by_retrain == () and impact.uses[3].produced is None
        assert impact.uses[0].dp == DPBound("local", 3.0, 1e-5)
        assert len(impact.trained_after_withdrawal) == 3
        assert "run-b" not in json.dumps(impact.to_dict())

        bob = subject_impact(led, "bob", runs=runs, now=datetime(2024, 5, 1, tzinfo=timezone.utc))
        assert bob.trained_after_withdrawal == [] and {u.run_id for u in bob.uses} == {"run-a", "run-b"}
        assert next(u for u in bob.uses if u.run_id == "run-b").dp.epsilon is None  # non-private run: no bound

        table = withdrawn_users_in_models(led, runs=runs, now=datetime(2024, 5, 1, tzinfo=timezone.utc))
        assert table == [{"run_id": "run-a", "purpose": PURPOSE, "withdrawn_users": 1, "users_trained_on": 2,
                          "from_round": 1, "models": [m.to_dict() for m in replaced]}]


def test_before_the_withdrawal_nothing_is_flagged(tmp_path):
    with _ledger(tmp_path) as led:
        _use(led, "run-a", 1, "train", "2024-02-01", ["alice"])
        led.append(ConsentRecord.withdraw("alice", "shop", PURPOSE, "2024-03-01"))
        early = datetime(2024, 2, 15, tzinfo=timezone.utc)
        assert withdrawn_users_in_models(led, now=early) == []
        assert subject_impact(led, "alice", now=early).uses[0].consented_now
