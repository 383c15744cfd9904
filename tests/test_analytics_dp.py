"""DP analytics on synthetic merchants, node path in-process (no Ray): accuracy against the exact
pooled answer computed here, the friend-vs-organic gap, the budget ledger, refusals, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedretain.analytics.charge import QueryRefused
from fedretain.analytics.intervals import IntervalPolicy
from fedretain.analytics.mechanisms import GaussianMechanism
from fedretain.analytics.queries import QuerySpec, exact_cells, query_inputs
from fedretain.analytics.results import NodeAnswer, combine

CONSENT_AT = "2026-11-01T00:00:00+00:00"
BUDGET = 12.0
RELEASES = 25  # independent ε=1 queries for the coverage check (one charged through the node, the rest re-noised)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    """Three synthetic merchants (12,000 users) with consent ledgers and an analytics budget each."""
    from fedretain.clients.node import MerchantNode
    from fedretain.clients.provision import provision_node
    from fedretain.privacy.budget import BudgetLedger, ledger_path
    from fedretain.synth import generate

    out = []
    for silo in generate(tmp_path_factory.mktemp("analytics") / "silos", n_merchants=3, n_users=12_000, seed=3):
        cfg = provision_node(silo)
        with BudgetLedger.open(ledger_path(cfg.state_dir), create=True) as led:
            led.set_budget("analytics", BUDGET, note="test")
        out.append(MerchantNode(cfg))
    return out


def _end(nodes) -> str:
    return min(n.data_end() for n in nodes).isoformat()


@pytest.fixture(scope="module")
def gated(nodes):
    """Each node's consent decision and gated data for 'analytics' now (nodes ignore a query's consent_at)."""
    return [node.gate("analytics") for node in nodes]


def exact_retention(gated, end: pd.Timestamp, cohorts: int, periods: int) -> tuple[dict, dict]:
    """Exact pooled retention by user loop (independent of fedretain.analytics): cohort cells and the curve.

    Users counted: granted 'analytics' with purchase_history now (the gate decides consent; a query's consent_at
    is ignored).
    """
    month_starts = pd.date_range(end=end, periods=24, freq="MS")
    observed = [m for m in month_starts if m + pd.offsets.MonthBegin(1) + pd.Timedelta(days=30) <= end][-cohorts:]
    size: dict[str, int] = {}
    kept: dict[tuple[str, int], int] = {}
    for decision, data in gated:
        ok = set(decision.grants.index[decision.grants["purchase_history"].to_numpy(bool)])
        ev = data.events
        buys = ev.loc[(ev["event"] == "purchase") & (ev["ts"] < end) & ev["user_id"].isin(ok)]
        for _user, ts in buys.groupby("user_id")["ts"]:
            t = np.sort(ts.to_numpy("datetime64[ns]"))
            first = pd.Timestamp(t[0])
            days = (t[1:] - t[0]) / np.timedelta64(1, "D")  # later purchases, days after the first
            start = pd.Timestamp(first.year, first.month, 1)
            if start not in observed:
                continue
            label = f"{first.year}-{first.month:02d}"
            size[label] = size.get(label, 0) + 1
            nxt = start + pd.offsets.MonthBegin(1)
            for k in range(1, periods + 1):
                if nxt + pd.Timedelta(days=30 * k) > end:
                    break
                if np.any((days > 30 * (k - 1)) & (days <= 30 * k)):
                    kept[(label, k)] = kept.get((label, k), 0) + 1
                else:
                    kept.setdefault((label, k), 0)
    for m in observed:  # cohorts and cells observed but without users
        label = m.strftime("%Y-%m")
        size.setdefault(label, 0)
        nxt = m + pd.offsets.MonthBegin(1)
        for k in range(1, periods + 1):
            if nxt + pd.Timedelta(days=30 * k) <= end:
                kept.setdefault((label, k), 0)
    cells = {(c, k): (v, size[c]) for (c, k), v in kept.items()}
    curve: dict[int, tuple[int, int]] = {}
    for (_c, k), (v, n) in cells.items():
        a, b = curve.get(k, (0, 0))
        curve[k] = (a + v, b + n)
    return cells, curve


def _covered(figs: pd.DataFrame, level: str, key, truth: float) -> bool:
    row = figs.loc[key]
    assert row["status"] != "suppressed", (level, key)
    return bool(row["ci_low"] - 1e-12 <= truth <= row["ci_high"] + 1e-12)


def test_dp_retention_curve_is_within_its_interval_of_the_exact_curve(nodes, gated):
    from fedretain.clients.analytics_handlers import answer_query

    spec = QuerySpec("retention_curve", epsilon=1.0, end=_end(nodes), consent_at=CONSENT_AT)
    exact_cells_, exact_curve = exact_retention(gated, spec.end_ts(), spec.cohorts, spec.periods)

    # the node's exact cells, summed over nodes, are the exact answer computed above
    per_node = [exact_cells(spec, query_inputs(spec, data, node.silo.merchant))
                for node, (_, data) in zip(nodes, gated)]
    pooled = pd.concat(per_node).groupby(["cohort", "step", "measure"])["value"].sum()
    for (c, k), (v, n) in exact_cells_.items():
        assert pooled[(c, k, "retained")] == v and pooled[(c, 0, "users")] == n

    results = [combine(spec, [answer_query(n, spec) for n in nodes])]  # the real, charged query
    mech = GaussianMechanism.calibrated(spec.epsilon, spec.delta, spec.l2_sensitivity())
    for _ in range(RELEASES - 1):  # more ε=1 releases of the same answer: same mechanism, fresh noise
        answers = []
        for node, cells in zip(nodes, per_node):
            bounds = np.array([spec.bound(m) for m in cells["measure"]])
            noisy, sd = mech.release(cells["value"].to_numpy(float), bounds)
            answers.append(NodeAnswer(node.merchant_id, spec.query_id, cells.assign(value=noisy, sd=sd),
                                      spec.epsilon, spec.delta, mech.noise_multiplier, mech.l2_sensitivity, "gaussian"))
        results.append(combine(spec, answers))

    big_cells = {key: v / n for key, (v, n) in exact_cells_.items() if n >= 1000}
    big_curve = {k: v / n for k, (v, n) in exact_curve.items() if n >= 1000}
    assert len(big_cells) >= 12 and len(big_curve) >= 4  # the check below has something to check
    hits, total, per_query = 0, 0, []
    for res in results:
        f = res.figures.set_index(["level", "cohort", "step"])
        h = sum(_covered(f, "cohort", ("cohort", c, k), t) for (c, k), t in big_cells.items())
        h += sum(_covered(f, "curve", ("curve", "pooled", k), t) for k, t in big_curve.items())
        n = len(big_cells) + len(big_curve)
        per_query.append(h / n)
        hits, total = hits + h, total + n
    print(f"coverage of cells with 1000+ users: {hits}/{total} = {hits / total:.3f} over {len(results)} queries; "
          f"per query min {min(per_query):.2f}, median {np.median(per_query):.2f}")
    assert hits / total >= 0.90
    assert np.median(per_query) >= 0.90


def test_friend_referred_users_retain_better_in_the_dp_output(nodes):
    from fedretain.clients.analytics_handlers import answer_query

    end = _end(nodes)
    rep = QuerySpec("repeat_rate", by="referral", epsilon=1.0, end=end, consent_at=CONSENT_AT)
    res = combine(rep, [answer_query(n, rep) for n in nodes])
    f = res.curve().set_index(["group", "step"])
    friend, organic = f.loc[("friend_share", 30)], f.loc[("organic", 30)]
    gap = friend["estimate"] - organic["estimate"]
    gap_sd = float(np.hypot(friend["sd"], organic["sd"]))
    print(f"30-day repeat rate: friend {friend['estimate']:.3f} ± {1.96 * friend['sd']:.3f}, organic "
          f"{organic['estimate']:.3f} ± {1.96 * organic['sd']:.3f}, gap {gap:.3f} ± {1.96 * gap_sd:.3f}")
    assert friend["status"] != "suppressed" and organic["status"] != "suppressed"
    assert gap - 1.96 * gap_sd > 0.0  # the gap is significant in the DP output alone
    assert 0.08 < gap < 0.30

    ret = QuerySpec("retention_curve", by="referral", epsilon=1.0, periods=1, cohorts=5, end=end,
                    consent_at=CONSENT_AT)
    curve = combine(ret, [answer_query(n, ret) for n in nodes]).curve().set_index(["group", "step"])
    assert curve.loc[("friend_share", 1), "estimate"] > curve.loc[("organic", 1), "estimate"]


def test_ledger_shows_each_query_and_over_budget_changes_nothing(nodes, tmp_path):
    from fedretain.clients.analytics_handlers import answer_query, node_status
    from fedretain.privacy.budget import BudgetLedger, ledger_path

    node = nodes[0]
    spec = QuerySpec("spend_per_retained_user", by="member_tier", epsilon=0.5, end=_end(nodes), consent_at=CONSENT_AT)
    before = node_status(node)["committed-epsilon"]
    answer = answer_query(node, spec)
    assert set(answer.cells.columns) == {"group", "cohort", "step", "measure", "value", "sd"}
    with BudgetLedger.open(ledger_path(node.config.state_dir)) as led:
        runs = {r.run_id: r for r in led.runs("analytics")}
        (spend,) = led.spends(spec.query_id, "analytics")
    assert runs[spec.query_id].epsilon == 0.5 and runs[spec.query_id].mode == "analytics:spend_per_retained_user"
    assert 0.49 <= spend.epsilon <= 0.5
    assert node_status(node)["committed-epsilon"] == pytest.approx(before + 0.5)
    with node.ledger() as cl:
        usage = [u for u in cl.usages() if u.run_id == spec.query_id]
    assert len(usage) == 1 and usage[0].purpose == "analytics"
    assert "spend_per_retained_user(by=member_tier" in usage[0].feature_set
    assert set(usage[0].scope_counts) == {"profile", "purchase_history"}

    with pytest.raises(QueryRefused, match="already answered"):
        answer_query(node, spec)

    def snapshot():
        with BudgetLedger.open(ledger_path(node.config.state_dir)) as led:
            b = (led.runs(), led.spends(), led.committed("analytics"))
        with node.ledger() as cl:
            return b, len(cl.usages())

    state = snapshot()
    remaining = BUDGET - state[0][2][0]
    greedy = QuerySpec("retention_curve", epsilon=remaining + 0.5, end=_end(nodes), consent_at=CONSENT_AT)
    with pytest.raises(QueryRefused, match=r"remains.*nothing recorded"):
        answer_query(node, greedy)
    assert snapshot() == state

    late = QuerySpec("repeat_rate", end="2027-01-01", consent_at=CONSENT_AT)
    with pytest.raises(QueryRefused, match="after this merchant's data end"):
        answer_query(node, late)
    assert snapshot() == state


def test_outputs_are_written_and_complete(nodes, tmp_path):
    from fedretain.clients.analytics_handlers import answer_query
    from fedretain.server.analytics import write_outputs

    spec = QuerySpec("retention_curve", by="referral", epsilon=1.0, end=_end(nodes), consent_at=CONSENT_AT)
    res = combine(spec, [answer_query(n, spec) for n in nodes], IntervalPolicy())
    paths = write_outputs(res, tmp_path)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["png"].stat().st_size > 20_000
    table = pd.read_csv(paths["csv"])
    assert {"level", "group", "cohort", "step", "estimate", "ci_low", "ci_high", "status"} <= set(table.columns)
    assert set(table["group"]) == {"friend_share", "organic", "unknown"}
    shown = table.loc[table["status"] != "suppressed"]
    assert (shown["ci_low"] <= shown["estimate"]).all() and (shown["estimate"] <= shown["ci_high"]).all()
    record = json.loads(Path(paths["json"]).read_text())
    assert record["status"] == "completed" and record["query"]["query_id"] == spec.query_id
    assert record["privacy"]["epsilon_per_merchant"] == 1.0 and len(record["merchants"]) == 3
    assert "user_id" not in paths["json"].read_text()
