"""A node's noisy answer on the wire, and the server's sum of answers into figures with intervals.

A :class:`NodeAnswer` carries only noisy cells, their noise sd and public parameters (the
query, ε, δ, σ): no exact counts, user ids, or consent-ledger sizes. The server adds the
answers cell by cell (noise variances add) and turns the sums into the figures people read
(:func:`combine`): retention rates per cohort and pooled over cohorts, repeat rates, spend
per retained user — each with an interval and a status from :mod:`.intervals`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from fedretain.analytics.intervals import IntervalPolicy, ratio_estimates
from fedretain.analytics.queries import CELL_COLUMNS, PERIOD_DAYS, QuerySpec

FIGURE_COLUMNS = ("level", "group", "cohort", "step", "figure", "unit", "numerator", "numerator_sd", "denominator",
                  "denominator_sd", "estimate", "sd", "ci_low", "ci_high", "status")


@dataclass
class NodeAnswer:
    """One merchant's noisy answer to one query."""

    merchant_id: str
    query_id: str
    cells: pd.DataFrame  # CELL_COLUMNS + value (noisy) + sd (noise sd)
    epsilon: float
    delta: float
    noise_multiplier: float
    l2_sensitivity: float
    mechanism: str

    def to_config(self) -> dict[str, Any]:
        c = self.cells
        return {
            "merchant-id": self.merchant_id, "query-id": self.query_id, "epsilon": float(self.epsilon),
            "delta": float(self.delta), "noise-multiplier": float(self.noise_multiplier),
            "l2-sensitivity": float(self.l2_sensitivity), "mechanism": self.mechanism,
            "group": [str(v) for v in c["group"]], "cohort": [str(v) for v in c["cohort"]],
            "step": [int(v) for v in c["step"]], "measure": [str(v) for v in c["measure"]],
            "value": [float(v) for v in c["value"]], "sd": [float(v) for v in c["sd"]],
        }

    @classmethod
    def from_config(cls, cfg: Any) -> NodeAnswer:
        cols = {k: list(cfg[k]) if k in cfg else [] for k in (*CELL_COLUMNS, "value", "sd")}
        n = {len(v) for v in cols.values()}
        if len(n) != 1:
            raise ValueError(f"answer of {cfg.get('merchant-id')}: cell columns have different lengths")
        cells = pd.DataFrame(cols).astype({"step": "int64", "value": float, "sd": float})
        return cls(str(cfg["merchant-id"]), str(cfg["query-id"]), cells, float(cfg["epsilon"]), float(cfg["delta"]),
                   float(cfg["noise-multiplier"]), float(cfg["l2-sensitivity"]), str(cfg["mechanism"]))


@dataclass
class QueryResult:
    """The pooled answer: summed cells and the figures derived from them."""

    spec: QuerySpec
    cells: pd.DataFrame  # CELL_COLUMNS + value + sd (sums over nodes)
    figures: pd.DataFrame  # FIGURE_COLUMNS
    merchants: list[str]
    policy: IntervalPolicy
    nodes: list[dict[str, Any]] = field(default_factory=list)
    auto: dict[str, Any] | None = None  # auto granularity: the choice, noisy size, ε split (granularity.auto_record)

    def curve(self) -> pd.DataFrame:
        """The headline figures: pooled over cohorts (retention) or per window (other queries)."""
        return self.figures.loc[self.figures["level"] != "cohort"].reset_index(drop=True)

    def suppression_advice(self) -> str | None:
        """What to change when figures are suppressed (``None`` when every figure is shown)."""
        return suppression_advice(self.spec, self.figures, self.policy)


def sum_answers(answers: list[NodeAnswer]) -> pd.DataFrame:
    """Cell-wise sum of values and of noise variances over nodes (union of the nodes' cells)."""
    if not answers:
        raise ValueError("no answers to combine")
    frames = [a.cells.assign(var=a.cells["sd"] ** 2) for a in answers]
    both = pd.concat(frames, ignore_index=True)
    out = both.groupby(list(CELL_COLUMNS), sort=False, as_index=False)[["value", "var"]].sum()
    out["sd"] = np.sqrt(out.pop("var"))
    return out


def _pivot(cells: pd.DataFrame, measure: str, keys: list[str]) -> pd.DataFrame:
    part = cells.loc[cells["measure"] == measure, [*keys, "value", "sd"]]
    return part.rename(columns={"value": f"{measure}", "sd": f"{measure}_sd"})


def _figures(df: pd.DataFrame, num: str, den: str, level: str, figure: str, unit: str, is_rate: bool,
             policy: IntervalPolicy) -> pd.DataFrame:
    # Counts and spend cannot be negative: a noisy sum below 0 is shown as 0 (post-processing
    # of a DP release, so still private). The sd stays the noise sd, so every interval still
    # covers the exact figure as often as it says; the raw noisy sums stay in ``cells``.
    df = df.assign(**{num: df[num].clip(lower=0.0), den: df[den].clip(lower=0.0)})
    est = ratio_estimates(df[num], df[f"{num}_sd"], df[den], df[f"{den}_sd"], policy, is_rate=is_rate)
    out = pd.DataFrame({
        "level": level, "group": df["group"].to_numpy(), "cohort": df["cohort"].to_numpy(),
        "step": df["step"].to_numpy(), "figure": figure, "unit": unit,
        "numerator": df[num].to_numpy(), "numerator_sd": df[f"{num}_sd"].to_numpy(),
        "denominator": df[den].to_numpy(), "denominator_sd": df[f"{den}_sd"].to_numpy(), **est,
    })
    return out[list(FIGURE_COLUMNS)]


def _retention(spec: QuerySpec, cells: pd.DataFrame, policy: IntervalPolicy) -> pd.DataFrame:
    unit = f"share of cohort buying again in period (period = {PERIOD_DAYS[spec.period]} days)"
    size = _pivot(cells, "users", ["group", "cohort"])
    ret = _pivot(cells, "retained", ["group", "cohort", "step"]).merge(size, on=["group", "cohort"], how="left")
    per_cohort = _figures(ret, "retained", "users", "cohort", "retention_rate", unit, True, policy)
    # pooled over the cohorts observed at each period: Σ retained / Σ cohort size (variances add)
    pooled = ret.assign(retained_var=ret["retained_sd"] ** 2, users_var=ret["users_sd"] ** 2).groupby(
        ["group", "step"], sort=False, as_index=False)[["retained", "retained_var", "users", "users_var"]].sum()
    pooled["retained_sd"] = np.sqrt(pooled.pop("retained_var"))
    pooled["users_sd"] = np.sqrt(pooled.pop("users_var"))
    pooled["cohort"] = "pooled"
    curve = _figures(pooled, "retained", "users", "curve", "retention_rate", unit, True, policy)
    return pd.concat([curve, per_cohort], ignore_index=True)


def _windowed(spec: QuerySpec, cells: pd.DataFrame, policy: IntervalPolicy) -> pd.DataFrame:
    keys = ["group", "cohort", "step"]
    if spec.kind == "repeat_rate":
        df = _pivot(cells, "repeat", keys).merge(_pivot(cells, "eligible", keys), on=keys)
        return _figures(df, "repeat", "eligible", "window", "repeat_rate",
                        "share of first-time buyers buying again within the window", True, policy)
    df = _pivot(cells, "spend", keys).merge(_pivot(cells, "retained", keys), on=keys).merge(
        _pivot(cells, "eligible", keys), on=keys)
    spend = _figures(df, "spend", "retained", "window", "spend_per_retained_user",
                     f"currency units per retained user in the window (each user clipped at {spec.spend_cap:g})",
                     False, policy)
    rate = _figures(df, "retained", "eligible", "window", "retention_rate",
                    "share of first-time buyers buying again within the window", True, policy)
    return pd.concat([spend, rate], ignore_index=True)


def combine(spec: QuerySpec, answers: list[NodeAnswer], policy: IntervalPolicy | None = None) -> QueryResult:
    """Sum the nodes' noisy answers to ``spec`` and derive every figure with its interval."""
    policy = policy or IntervalPolicy()
    for a in answers:
        if a.query_id != spec.query_id:
            raise ValueError(f"answer of {a.merchant_id} is for query {a.query_id}, not {spec.query_id}")
        if abs(a.epsilon - spec.epsilon) > 1e-12 or abs(a.delta - spec.delta) > 1e-15:
            raise ValueError(f"answer of {a.merchant_id} used (ε={a.epsilon}, δ={a.delta}), not the query's")
    cells = sum_answers(answers)
    figures = _retention(spec, cells, policy) if spec.kind == "retention_curve" else _windowed(spec, cells, policy)
    figures = figures.sort_values(["level", "group", "cohort", "step", "figure"], kind="stable", ignore_index=True)
    return QueryResult(spec, cells, figures, [a.merchant_id for a in answers], policy)


def suppression_advice(spec: QuerySpec, figures: pd.DataFrame, policy: IntervalPolicy) -> str | None:
    """Plain advice for a query whose figures were suppressed: which knobs shrink the noise or grow cells.

    The noise sd of every cell is proportional to sqrt(cells one user can change) / ε, and a
    figure is shown when its denominator exceeds ``min_snr`` noise sd; so more ε, fewer cells
    per user, or larger cells (longer periods, fewer groups) each help.
    """
    n = len(figures)
    sup = int((figures["status"] == "suppressed").sum()) if n else 0
    if sup == 0:
        return None
    tips = [f"raise --epsilon (now {spec.epsilon:g}; the noise sd falls as 1/ε)"]
    if spec.kind == "retention_curve":
        tips.append(f"use fewer --periods (now {spec.periods}: each following period is one more cell per user, "
                    f"so more noise on every cell)")
        if spec.period == "week":
            tips.append("use --period month (bigger cohorts)")
        tips.append(f"use fewer --cohorts (now {spec.cohorts}) and read the pooled curve")
    elif spec.kind == "repeat_rate" and len(spec.windows) > 1:
        tips.append(f"ask for fewer --windows (now {len(spec.windows)}: each adds two cells per user)")
    if spec.by != "none":
        tips.append(f"drop --by {spec.by} (each group splits the users)")
    tips.append(f"or accept noisier figures with a lower --min-snr (now {policy.min_snr:g})")
    return (f"{sup} of {n} figures suppressed: their noisy denominators are below {policy.min_snr:g} noise sd. "
            "To publish more: " + "; ".join(tips) + ".")
