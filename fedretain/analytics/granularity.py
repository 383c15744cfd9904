"""Retention granularity chosen from the shops' size: a small DP size release, then the grid.

Why a release first. How many cohorts and periods a retention curve can show depends on how
many users each cohort holds, and that number is itself private: a choice made from the
exact size would leak it through the shape of the answer. So with ``auto`` granularity every
node first releases a *noisy size* — the number of its users counted by the query (consent
for the query's scopes), split by how long before the query end their first purchase was
(:data:`SIZE_EDGES`, public buckets; users without a first purchase in 730 days, or none, are
``older``) and by the query's group. Each user is in exactly one (group, bucket) cell, so the
vector has L2 sensitivity 1 and is released with the same Gaussian mechanism as every
analytics answer (:mod:`.mechanisms`), charged to the node's analytics budget under its own
release id (``<query id>-size``, mode ``analytics:size``).

The budget is split (:func:`split_budget`): the size release gets ``size_share`` of ε (20 %
by default; the Opacus RDP accountant cannot calibrate much less than ε = 0.2 at small δ, so
the share is raised to the smallest ε it can, at most half of ε) and half of δ; the query gets
the rest. A node checks that its budget covers both before it spends anything.

The server sums the noisy sizes and, for each candidate grid (period length, cohorts,
periods), predicts every cohort's size (first purchases spread evenly within a bucket) and
the share of figures expected to be publishable: a figure is published when its noisy
denominator exceeds ``min_snr`` noise sd, and the noise sd follows from the query's ε, δ,
sensitivity and number of merchants (:func:`expected_share`). It picks the grid with the
most per-cohort figures expected to be publishable, among the grids expected to publish at
least ``target`` of their figures (ties: the higher share; none: the highest share).
Everything after the release is post-processing of DP outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd

from fedretain.analytics.intervals import IntervalPolicy
from fedretain.analytics.mechanisms import noise_multiplier
from fedretain.analytics.queries import (
    PERIOD_DAYS,
    QueryError,
    QueryInputs,
    QuerySpec,
    _first_purchases,
    cohort_periods,
    observed_periods,
)

SIZE_EDGES: tuple[int, ...] = (0, 35, 91, 182, 365, 730)  # days before the query end
OLDER = "older"
BUCKETS: tuple[str, ...] = (*(f"{a}-{b}d" for a, b in zip(SIZE_EDGES, SIZE_EDGES[1:])), OLDER)
MAX_COUNT: dict[str, int] = {"month": 12, "week": 13}  # most cohorts / periods auto considers
DEFAULT_SIZE_SHARE = 0.2
DEFAULT_TARGET = 0.8
SIZE_SUFFIX = "-size"
SIZE_MODE = "analytics:size"
AUTO = "auto"
SIZE_ACTION = "analytics_size"  # message type query.analytics_size
_EPS_STEPS = (0.2, 0.25, 0.3, 0.4, 0.5)  # ε tried for the size release when the share is too small to calibrate


@dataclass(frozen=True)
class AutoSettings:
    """Which of period / periods / cohorts are chosen from the size release, and how."""

    period: bool = True
    periods: bool = True
    cohorts: bool = True
    size_share: float = DEFAULT_SIZE_SHARE
    target: float = DEFAULT_TARGET

    def __post_init__(self) -> None:
        if not 0 < float(self.size_share) <= 0.5:
            raise QueryError(f"the size release's share of ε must be in (0, 0.5], got {self.size_share}")
        if not 0 < float(self.target) < 1:
            raise QueryError(f"the target share of publishable figures must be in (0, 1), got {self.target}")

    @property
    def active(self) -> bool:
        """A size release happens only when a count is auto (with both counts explicit, auto period = month)."""
        return self.periods or self.cohorts

    def names(self) -> list[str]:
        return [n for n in ("period", "cohorts", "periods") if getattr(self, n)]


NO_AUTO = AutoSettings(False, False, False)


@dataclass(frozen=True)
class BudgetSplit:
    """(ε, δ) of the size release and of the query; they add up to what the merchant asked for."""

    size_epsilon: float
    size_delta: float
    query_epsilon: float
    query_delta: float
    note: str = ""

    @property
    def total_epsilon(self) -> float:
        return self.size_epsilon + self.query_epsilon

    @property
    def total_delta(self) -> float:
        return self.size_delta + self.query_delta


def _calibrates(epsilon: float, delta: float) -> bool:
    try:
        noise_multiplier(epsilon, delta)
    except (ValueError, RuntimeError):  # opacus: "The privacy budget is too low."; PrivacyError
        return False
    return True


def split_budget(epsilon: float, delta: float, size_share: float) -> BudgetSplit:
    """Split the query's (ε, δ): ``size_share`` of ε (raised to what the accountant can calibrate) and δ/2."""
    d_size = delta / 2
    e_size = size_share * epsilon
    note = f"{size_share:.0%} of ε"
    if not _calibrates(e_size, d_size):
        e_size = next((e for e in _EPS_STEPS if e <= epsilon / 2 and _calibrates(e, d_size)), 0.0)
        if not e_size:
            raise QueryError(
                f"auto granularity needs a size release of about ε=0.2 (the RDP accountant cannot calibrate less "
                f"at δ={d_size:g}), more than half of ε={epsilon:g}: raise --epsilon, or give --cohorts and "
                f"--periods as numbers (no size release)")
        note = (f"{e_size / epsilon:.0%} of ε: {size_share:.0%} (ε={size_share * epsilon:g}) is below what the "
                f"accountant can calibrate")
    return BudgetSplit(e_size, d_size, epsilon - e_size, delta - d_size, note)


def size_spec(spec: QuerySpec, split: BudgetSplit) -> QuerySpec:
    """The size release as a spec: the query's scopes, groups and end; its own id and (ε, δ)."""
    return replace(spec, epsilon=split.size_epsilon, delta=split.size_delta, query_id=spec.query_id + SIZE_SUFFIX)


# -- node side: the exact size cells ----------------------------------------------------------------
def size_cells(spec: QuerySpec, inputs: QueryInputs) -> pd.DataFrame:
    """Users counted by ``spec`` per (group, first-purchase age bucket); every cell of the fixed domain."""
    _, first = _first_purchases(inputs, spec.end_ts())
    age = ((spec.end_ts() - first) / pd.Timedelta(days=1)).reindex(inputs.groups.index)
    idx = np.searchsorted(np.asarray(SIZE_EDGES, float), age.to_numpy(float), side="right") - 1
    idx = np.where(np.isnan(age.to_numpy(float)) | (idx >= len(BUCKETS) - 1) | (idx < 0), len(BUCKETS) - 1, idx)
    counted = pd.DataFrame({"group": inputs.groups.to_numpy(), "bucket": np.asarray(BUCKETS, dtype=object)[idx]})
    counts = counted.groupby(["group", "bucket"], sort=False).size().rename("value")
    grid = pd.MultiIndex.from_product([inputs.group_labels, BUCKETS], names=["group", "bucket"])
    return counts.reindex(grid, fill_value=0).astype(float).reset_index()


# -- wire format -------------------------------------------------------------------------------------
@dataclass
class SizeAnswer:
    """One merchant's noisy size release: noisy counts per (group, bucket) and their noise sd."""

    merchant_id: str
    release_id: str
    cells: pd.DataFrame  # group, bucket, value (noisy), sd
    epsilon: float
    delta: float
    noise_multiplier: float
    mechanism: str

    def to_config(self) -> dict[str, Any]:
        c = self.cells
        return {"merchant-id": self.merchant_id, "query-id": self.release_id, "epsilon": float(self.epsilon),
                "delta": float(self.delta), "noise-multiplier": float(self.noise_multiplier), "l2-sensitivity": 1.0,
                "mechanism": self.mechanism, "group": [str(v) for v in c["group"]],
                "bucket": [str(v) for v in c["bucket"]], "value": [float(v) for v in c["value"]],
                "sd": [float(v) for v in c["sd"]]}

    @classmethod
    def from_config(cls, cfg: Any) -> SizeAnswer:
        cols = {k: list(cfg[k]) for k in ("group", "bucket", "value", "sd")}
        if len({len(v) for v in cols.values()}) != 1:
            raise ValueError(f"size release of {cfg.get('merchant-id')}: columns have different lengths")
        return cls(str(cfg["merchant-id"]), str(cfg["query-id"]), pd.DataFrame(cols).astype({"value": float,
                                                                                            "sd": float}),
                   float(cfg["epsilon"]), float(cfg["delta"]), float(cfg["noise-multiplier"]), str(cfg["mechanism"]))


@dataclass(frozen=True)
class SizeEstimate:
    """The summed noisy sizes over merchants (noise variances add)."""

    counts: pd.DataFrame  # group, bucket, value, sd
    n_merchants: int

    @property
    def total(self) -> float:
        return float(self.counts["value"].sum())

    @property
    def total_sd(self) -> float:
        return float(np.sqrt((self.counts["sd"] ** 2).sum()))


def sum_sizes(answers: list[SizeAnswer]) -> SizeEstimate:
    if not answers:
        raise ValueError("no size releases to sum")
    both = pd.concat([a.cells.assign(var=a.cells["sd"] ** 2) for a in answers], ignore_index=True)
    out = both.groupby(["group", "bucket"], sort=False, as_index=False)[["value", "var"]].sum()
    out["sd"] = np.sqrt(out.pop("var"))
    return SizeEstimate(out, len(answers))


# -- server side: the choice ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Choice:
    """The grid chosen and why (all derived from noisy sizes: post-processing)."""

    period: str
    cohorts: int
    periods: int
    expected_share: float
    figures: float  # per-cohort retention figures expected to be publishable (over groups)
    met_target: bool
    considered: int
    small_groups: tuple[str, ...] = ()  # groups no grid can publish: not counted in the share

    def summary(self, size: SizeEstimate, split: BudgetSplit) -> str:
        unit = "monthly" if self.period == "month" else "weekly"
        return (f"auto: {self.cohorts} {unit} cohort{'s' * (self.cohorts != 1)} × {self.periods} "
                f"period{'s' * (self.periods != 1)}, from ≈{max(size.total, 0.0):,.0f} users "
                f"(noisy, ε={split.size_epsilon:g})")


def _bucket_rates(size: SizeEstimate, group: str) -> list[tuple[float, float, float]]:
    """(age from, age to, users per day) of each bounded bucket; negative noisy counts count as 0."""
    rows = size.counts.loc[size.counts["group"] == group].set_index("bucket")["value"]
    return [(float(a), float(b), max(float(rows.get(label, 0.0)), 0.0) / (b - a))
            for label, a, b in zip(BUCKETS, SIZE_EDGES, SIZE_EDGES[1:])]


def _cohort_size(rates: list[tuple[float, float, float]], young: float, old: float) -> float:
    """Expected users whose first purchase was ``young``..``old`` days before the end."""
    return sum(rate * max(0.0, min(old, b) - max(young, a)) for a, b, rate in rates)


def _grid(spec: QuerySpec, period: str, size: SizeEstimate) -> list[tuple[int, dict[str, float]]]:
    """(most periods observed, expected size per group) of the newest MAX_COUNT cohorts, newest first."""
    wide = replace(spec, period=period, cohorts=MAX_COUNT[period], periods=MAX_COUNT[period])
    end = spec.end_ts()
    groups = list(dict.fromkeys(size.counts["group"]))
    rates = {g: _bucket_rates(size, g) for g in groups}
    out = []
    for p in reversed(cohort_periods(wide)):
        young = (end - (p + 1).start_time) / pd.Timedelta(days=1)
        old = (end - p.start_time) / pd.Timedelta(days=1)
        out.append((observed_periods(wide, p), {g: _cohort_size(rates[g], young, old) for g in groups}))
    return out


GroupStats = dict[str, tuple[float, float, float]]  # group -> (expected shown, figures, expected shown per-cohort)


def expected_figures(grid: list[tuple[int, dict[str, float]]], cohorts: int, periods: int, noise_sd: float,
                     min_snr: float) -> GroupStats:
    """Per group: (figures expected to be publishable, figures, of which per-cohort publishable) of a grid.

    The grid is the newest ``cohorts`` cohorts followed for ``periods`` periods. ``noise_sd`` is
    the pooled noise sd of one count cell. A figure is published when its noisy denominator
    exceeds ``min_snr`` sd: probability Φ(μ/sd − min_snr). Per-cohort figures share their
    cohort's size; the pooled curve at period k sums the cohorts observed for k periods.
    """
    phi = NormalDist().cdf
    cells = grid[:cohorts]
    out: GroupStats = {}
    for g in (list(cells[0][1]) if cells else []):
        obs = [min(periods, o) for o, _ in cells]
        mu = [s[g] for _, s in cells]
        per_cohort = sum(o * phi(m / noise_sd - min_snr) for o, m in zip(obs, mu))
        shown, total = per_cohort, float(sum(obs))
        for k in range(1, max(obs, default=0) + 1):
            pooled = [m for o, m in zip(obs, mu) if o >= k]
            shown += phi(sum(pooled) / (noise_sd * math.sqrt(len(pooled))) - min_snr)
            total += 1
        out[g] = (shown, total, per_cohort)
    return out


def _share(stats: GroupStats, groups: set[str]) -> tuple[float, float]:
    """(expected share of publishable figures, expected publishable per-cohort figures) over ``groups``."""
    shown = sum(v[0] for g, v in stats.items() if g in groups)
    total = sum(v[1] for g, v in stats.items() if g in groups)
    return (shown / total if total else 0.0), sum(v[2] for g, v in stats.items() if g in groups)


def choose(spec: QuerySpec, auto: AutoSettings, size: SizeEstimate, split: BudgetSplit,
           policy: IntervalPolicy) -> Choice:
    """The grid with the most figures expected to be publishable, among those expected to publish at least
    ``auto.target`` of their figures (``spec`` has its end).

    A cohort expected to be empty adds no publishable figure but lowers the share, so it is not
    chosen. A group that no grid can publish (``--by`` with a tiny group, e.g. ``unknown``) is left
    out of the share and named in :attr:`Choice.small_groups`: its figures stay suppressed whatever
    the grid, and counting them would only force the coarsest grid on the other groups.
    """
    sigma = noise_multiplier(split.query_epsilon, split.query_delta)
    cands: list[tuple[str, int, int, GroupStats]] = []
    for period in (PERIOD_DAYS if auto.period else (spec.period,)):
        grid = _grid(spec, period, size)
        most = len(grid)
        for c in (range(1, most + 1) if auto.cohorts else (min(spec.cohorts, most),)):
            top = max((o for o, _ in grid[:c]), default=0)
            for p in (range(1, top + 1) if auto.periods else (spec.periods,)):
                sd = sigma * math.sqrt(1 + min(p, top)) * math.sqrt(size.n_merchants)
                cands.append((period, c if auto.cohorts else spec.cohorts, p,
                              expected_figures(grid, c, p, sd, policy.min_snr)))
    if not cands:
        raise QueryError("auto granularity found no cohort observed before the query end")
    groups = {g for *_, st in cands for g in st}
    reachable = {g for g in groups if any(st[g][1] and st[g][0] / st[g][1] >= auto.target for *_, st in cands)}
    counted = reachable or groups
    best: Choice | None = None
    fallback: Choice | None = None
    for period, c, p, st in cands:
        share, figures = _share(st, counted)
        ch = Choice(period, c, p, share, figures, share >= auto.target, len(cands),
                    tuple(sorted(groups - counted)))
        key = (round(figures, 6), share)
        if ch.met_target and (best is None or key > (round(best.figures, 6), best.expected_share)):
            best = ch
        if fallback is None or (share, -figures) > (fallback.expected_share, -fallback.figures):
            fallback = ch
    chosen = best or fallback
    assert chosen is not None
    return chosen


def reason(choice: Choice, auto: AutoSettings, policy: IntervalPolicy) -> str:
    """Why this grid, in words (for the result JSON and the CLI)."""
    small = (f"; group(s) {', '.join(choice.small_groups)} have too few users for any grid (their figures stay "
             f"suppressed) and are not counted" if choice.small_groups else "")
    if choice.met_target:
        return (f"of {choice.considered} grids considered, the one with the most figures expected to be "
                f"publishable (≈{choice.figures:.0f} per-cohort figures, denominator above {policy.min_snr:g} noise "
                f"sd) among those expected to publish at least {auto.target:.0%} of their figures: expected "
                f"{choice.expected_share:.0%}{small}")
    return (f"no grid of the {choice.considered} considered is expected to publish {auto.target:.0%} of its "
            f"figures; this one publishes the largest share (expected {choice.expected_share:.0%}): the shop is "
            f"small for this ε{small}")


def auto_record(choice: Choice, auto: AutoSettings, size: SizeEstimate, split: BudgetSplit,
                policy: IntervalPolicy, release_id: str) -> dict[str, Any]:
    """What the result JSON says about the automatic choice."""
    by_group = size.counts.groupby("group", sort=False)["value"].sum()
    return {
        "summary": choice.summary(size, split), "auto": auto.names(),
        "chosen": {"period": choice.period, "cohorts": choice.cohorts, "periods": choice.periods},
        "expected_publishable_share": choice.expected_share, "target_share": auto.target,
        "met_target": choice.met_target, "groups_too_small": list(choice.small_groups),
        "reason": reason(choice, auto, policy),
        "noisy_users": max(size.total, 0.0), "noisy_users_sd": size.total_sd,
        "noisy_users_by_group": {str(g): max(float(v), 0.0) for g, v in by_group.items()},
        "size_buckets_days": list(SIZE_EDGES), "size_release_id": release_id, "size_share": auto.size_share,
        "budget_split": {"size_epsilon": split.size_epsilon, "size_delta": split.size_delta,
                         "query_epsilon": split.query_epsilon, "query_delta": split.query_delta,
                         "note": split.note},
    }
