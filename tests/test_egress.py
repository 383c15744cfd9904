"""The egress manifest (fedretain/egress.py) against real runs: every reply every node sends, in
each DP mode, is read back from the nodes' egress audit copies and checked key by key; then
every number in it is compared with the node's exact counts (a per-user-derived value sent in
the clear would match one of them)."""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict

from fedretain.egress import (
    AUDIT_ENV,
    MANIFEST,
    EgressError,
    Protection,
    egress_guard,
    violations,
)

PURPOSE = "retention_modeling"
FEATURES = ("recency_days", "frequency", "monetary_total", "views_30d")


# -- the guard on the node (no simulation) -----------------------------------------------------------
def _incoming(mode: str, kind: str = "train") -> Message:
    """A message as a node receives it (built from public Metadata, outside a running app)."""
    md = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="",
                  created_at=time.time(), ttl=60.0, message_type=kind)
    return Message(content=RecordDict({"config": ConfigRecord({"dp-mode": mode})}), metadata=md)


def _guard(msg: Message, content: RecordDict, node_config: dict | None = None) -> Message:
    ctx = Context(run_id=1, node_id=1, node_config=node_config or {}, state=RecordDict(), run_config={})
    return egress_guard(msg, ctx, lambda m, c: Message(content, reply_to=m))


def test_a_declared_dp_reply_passes_the_guard():
    msg = _incoming("local")
    out = _guard(msg, RecordDict({"metrics": MetricRecord({"num-examples": 1, "epsilon": 1.2}),
                                  "lineage": ConfigRecord({"merchant-id": "m", "ledger-size": 4})}))
    assert dict(out.content["metrics"])["epsilon"] == 1.2


@pytest.mark.parametrize("mode", ["local", "central", "aggregate", "unknown"])
def test_exact_counts_and_undeclared_keys_fail_closed_on_the_node(mode):
    for bad in ({"users-used": 250}, {"num-examples": 250}, {"sum": [1.0, 2.0]}, {"auc": 0.71}):
        with pytest.raises(EgressError) as err:
            _guard(_incoming(mode), RecordDict({"metrics": MetricRecord(bad)}))
        assert next(iter(bad)) in str(err.value) and "250" not in str(err.value)  # names the key, not the value


def test_dp_mode_none_may_send_exact_values_but_not_undeclared_ones():
    _guard(_incoming("none"), RecordDict({"metrics": MetricRecord({"num-examples": 250, "users-used": 260})}))
    with pytest.raises(EgressError, match="sumsq"):
        _guard(_incoming("none"), RecordDict({"stats": MetricRecord({"sumsq": [1.0]})}))


def test_a_node_that_requires_dp_refuses_a_run_without_it():
    calls = []
    ctx = Context(run_id=1, node_id=1, node_config={"require-dp": True}, state=RecordDict(), run_config={})
    with pytest.raises(EgressError, match="require-dp"):
        egress_guard(_incoming("none"), ctx, lambda m, c: calls.append(m))
    assert calls == []  # refused before the handler ran
    _guard(_incoming("local"), RecordDict({"metrics": MetricRecord({"num-examples": 1})}), {"require-dp": True})


def test_witness_record_is_public_by_declaration_only_for_its_header_fields():
    ok = RecordDict({"witness": ConfigRecord({"merchant-id": "m", "kinds": ["consent"], "consent-size": 9,
                                              "consent-root": "ab", "consent-signature": "cd",
                                              "consent-proof": ["ef"], "budget-error": "no signed head"})})
    _guard(_incoming("aggregate"), ok)
    with pytest.raises(EgressError, match="subjects"):
        _guard(_incoming("aggregate"), RecordDict({"witness": ConfigRecord({"subjects": "u1,u2"})}))


def test_every_manifest_entry_says_why():
    assert all(f.why and f.protection in Protection for f in MANIFEST)
    assert not any(f.protection is Protection.EXACT and f.modes != ("none",) for f in MANIFEST)


# -- real simulations, one per DP mode ---------------------------------------------------------------
@pytest.fixture(scope="module")
def silos(tmp_path_factory, synth_silos):
    from fedretain.privacy.budget import BudgetLedger, ledger_path

    data = tmp_path_factory.mktemp("egress") / "silos"
    shutil.copytree(synth_silos[0].parent, data)
    out = sorted(p for p in data.iterdir() if p.is_dir())
    for silo in out:
        with BudgetLedger.open(ledger_path(silo / ".node"), create=True) as ledger:
            ledger.set_budget(PURPOSE, 100.0)
    return out


def run_audited(settings, data_dir: Path, audit: Path, secure: bool = False) -> list[dict]:
    """Run a real simulation with the nodes' egress audit on; return every reply they sent."""
    from fedretain.server.secagg import run_secagg_simulation
    from fedretain.server.simulation import run_in_simulation

    old = os.environ.get(AUDIT_ENV)
    os.environ[AUDIT_ENV] = str(audit)  # inherited by the Ray workers that run the nodes
    try:
        (run_secagg_simulation if secure else run_in_simulation)(settings, data_dir)
    finally:
        os.environ.pop(AUDIT_ENV) if old is None else os.environ.__setitem__(AUDIT_ENV, old)
    return [json.loads(p.read_text()) for p in sorted(audit.glob("*.json"))]


def exact_counts(silos: list[Path]) -> set[float]:
    """Every exact count a node could leak: examples, held-out users, consent counts (per silo)."""
    from fedretain.clients.node import MerchantNode, NodeConfig

    out: set[float] = set()
    for silo in silos:
        prep = MerchantNode(NodeConfig.for_silo(silo)).prepare(PURPOSE, list(FEATURES), 30.0, None,
                                                              datetime.now(timezone.utc))
        d = prep.decision
        out |= {prep.n_train, prep.n_test, prep.n_train + prep.n_test, d.n_candidates, len(d.grants)}
        for phase in ("train", "evaluate"):
            out |= set(prep.usage(phase)[1].values())
    return {float(v) for v in out if v > 3}


def numbers(value) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, list):
        return [x for v in value for x in numbers(v)]
    if isinstance(value, str) and value.startswith("json:"):
        return numbers(json.loads(value[5:]))
    return []


def check_replies(replies: list[dict], mode: str, exact: set[float]) -> None:
    assert replies, "the nodes sent nothing"
    for r in replies:
        assert r["error"] is None, r["error"]
        assert r["dp_mode"] in (mode, "unknown")  # SecAgg+ stage messages carry no run config
        items = [(rec["kind"], name, key, value) for name, rec in r["records"].items()
                 for key, value in rec["items"].items()]
        assert violations(items, r["message_type"], r["dp_mode"]) == []
        for kind, name, key, value in items:
            if kind == "array" or key == "masked_params":
                continue  # the model / masked update: protected by the run's mechanism
            if name in ("lineage", "witness") or key.startswith("lineage-"):
                continue  # the signed ledger head: its size counts consent records (declared public)
            leaked = [v for v in numbers(value) if v in exact]
            assert not leaked, f"{r['message_type']} {name}.{key} carries an exact count of the node's users"


def _settings(tmp_path: Path, **kw):
    from fedretain.server.settings import RunSettings

    base = dict(rounds=2, local_epochs=1, batch_size=128, out_dir=str(tmp_path / "run"), min_nodes=3,
                features=FEATURES, hidden=(8,), target_epsilon=3.0)
    return RunSettings(**{**base, **kw})


def _record(settings) -> dict:
    return json.loads((Path(settings.out_dir) / "run.json").read_text())


@pytest.mark.heavy
@pytest.mark.parametrize("mode", ["central"])  # local: tests/test_attack_differencing.py checks its two runs
def test_every_reply_of_a_dp_run_is_declared_and_carries_no_exact_count(tmp_path, silos, mode):
    s = _settings(tmp_path, dp_mode=mode, run_id=f"egress-{mode}", max_grad_norm=1.0)
    replies = run_audited(s, silos[0].parent, tmp_path / "audit")
    check_replies(replies, mode, exact_counts(silos))
    kinds = {(r["node_config"].get("partition-id"), r["message_type"]) for r in replies}
    # query.witness: who the node is (its signed ledger heads); query.deliver_model: the acknowledgement of the
    # final model (clients/delivery.py)
    assert {k for _, k in kinds} == {"train", "evaluate", "query.witness", "query.deliver_model"}
    assert len({p for p, _ in kinds}) == 3
    rec = _record(s)
    assert rec["status"] == "completed" and rec["standardization"]["source"] == "public-clip-v1"
    final = rec["rounds"][-1]["evaluate"]
    assert final["hist-noise-sd"] > 1
    if "auc-status" not in final:  # else suppressed: the noise made a class total negative on these tiny silos
        assert final["auc-low"] <= final["auc"] <= final["auc-high"]
    assert rec["rounds"][0]["evaluate"] == {}  # one DP evaluation per run, of the final model


@pytest.mark.heavy
def test_every_reply_of_an_aggregate_run_under_secagg_is_declared(tmp_path, silos):
    s = _settings(tmp_path, dp_mode="aggregate", run_id="egress-agg",
                  extra={"aggregate-batch-size": 600, "server-learning-rate": 0.05, "aggregate-population": 3000})
    replies = run_audited(s, silos[0].parent, tmp_path / "audit", secure=True)
    check_replies(replies, "aggregate", exact_counts(silos))
    keys = {key for r in replies for rec in r["records"].values() for key in rec["items"]}
    assert {"masked_params", "pk1", "hist-pos"} <= keys  # SecAgg+ stages and the evaluation release were seen
    last = _record(s)["rounds"][-1]
    assert "auc-high" in last["evaluate"] or "auc-status" in last["evaluate"], last["nodes"]  # names node errors
    assert last["evaluate"].get("auc-high", 1.0) <= 1.0


def test_privacy_md_shows_the_manifest_as_declared_in_code():
    from fedretain.egress import render_markdown

    doc = (Path(__file__).resolve().parents[1] / "docs" / "PRIVACY.md").read_text()
    start, end = "<!-- egress-manifest:start -->\n", "\n<!-- egress-manifest:end -->"
    assert start in doc and end in doc, "docs/PRIVACY.md lost the egress manifest markers"
    assert doc.split(start, 1)[1].split(end, 1)[0] == render_markdown(), (
        "docs/PRIVACY.md's egress manifest is out of date: paste fedretain.egress.render_markdown()")
