"""PNG figures of a pooled analytics answer: estimates with their confidence intervals.

Made to be read by a person: axes say what and in which unit, the legend names each group
and its (noisy) number of users, intervals are drawn, flagged figures are hollow/hatched,
suppressed ones are left out and named in the footnote, and the title states ε, δ, the
number of merchants pooled and the last day of data.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import PercentFormatter  # noqa: E402

from fedretain.analytics.queries import PERIOD_DAYS  # noqa: E402
from fedretain.analytics.results import QueryResult  # noqa: E402
from fedretain.report import figure_png  # noqa: E402

_BY_TITLE = {"none": "all users", "referral": "referral channel", "member_tier": "member tier",
             "category": "merchant category", "city_tier": "city tier"}
_COLORS = plt.get_cmap("tab10").colors  # type: ignore[attr-defined]  # a ListedColormap


def _title(result: QueryResult, what: str) -> str:
    s = result.spec
    n = len(result.merchants)
    last_day = (s.end_ts() - pd.Timedelta(days=1)).date()
    by = ", all users" if s.by == "none" else f" by {_BY_TITLE[s.by]}"
    dp = f"ε={s.epsilon:g}, δ={s.delta:g}"
    if result.auto:  # the size release that chose the grid is part of the spend
        e_size, d_size = result.auto["budget_split"]["size_epsilon"], result.auto["budget_split"]["size_delta"]
        dp = f"ε={s.epsilon + e_size:g} ({e_size:g} size + {s.epsilon:g} query), δ={s.delta + d_size:g}"
    return (f"{what}{by}\n{n} merchant{'s' if n != 1 else ''} pooled · "
            f"DP per merchant {dp} · data up to {last_day}")


def _group_name(group: str) -> str:
    return group.replace("_", " ")


def _split_groups(figs: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Groups with at least one figure shown, and groups whose figures are all suppressed."""
    shown = figs.loc[figs["status"] != "suppressed", "group"].unique()
    groups = sorted(figs["group"].unique())
    return [g for g in groups if g in shown], [g for g in groups if g not in shown]


def _footnote(fig: plt.Figure, result: QueryResult, figs: pd.DataFrame, hidden: list[str], flagged_style: str,
              extra: str = "", *, intervals: str = "Shaded bands and error bars") -> None:
    pol = result.policy
    text = (f"{intervals}: {pol.confidence:.0%} confidence intervals from the DP noise. "
            f"{flagged_style}: flagged (interval wider than {pol.flag_width:g}). ")
    if hidden:
        text += f"Not shown, too few users (noise dominates): {', '.join(_group_name(g) for g in hidden)}. "
    n_sup = int(((figs["status"] == "suppressed") & ~figs["group"].isin(hidden)).sum())
    if n_sup:
        text += f"{n_sup} other point(s) suppressed: denominator below {pol.min_snr:g} noise sd. "
    fig.text(0.01, -0.01, text + extra, fontsize=7.5, color="dimgray", ha="left", va="top", wrap=True)


def _nothing_shown(ax: plt.Axes, result: QueryResult) -> None:
    """Say so, in the plot, when every figure was suppressed (rather than draw empty axes)."""
    ax.text(0.5, 0.5, f"Every figure is suppressed: too few consented users for ε={result.spec.epsilon:g}\n"
                      "(the DP noise would dominate). Try a larger ε, no breakdown,\n"
                      "or fewer periods/cohorts (each adds noise to every figure).",
            transform=ax.transAxes, ha="center", va="center", fontsize=9, color="dimgray")


def plot_retention(result: QueryResult) -> bytes:
    spec = result.spec
    curve = result.curve()
    days = PERIOD_DAYS[spec.period]
    groups, hidden = _split_groups(curve)
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    handles = []
    for i, group in enumerate(groups):
        g = curve.loc[curve["group"] == group].sort_values("step")
        shown = g.loc[g["status"] != "suppressed"]
        color = _COLORS[i % len(_COLORS)]
        size = float(g.loc[g["step"] == g["step"].min(), "denominator"].iloc[0])
        ax.fill_between(shown["step"], shown["ci_low"], shown["ci_high"], color=color, alpha=0.18, lw=0)
        ax.errorbar(shown["step"], shown["estimate"], yerr=[shown["estimate"] - shown["ci_low"],
                    shown["ci_high"] - shown["estimate"]], fmt="none", ecolor=color, elinewidth=0.8, capsize=3,
                    alpha=0.7)
        ax.plot(shown["step"], shown["estimate"], "-", color=color, lw=1.8)
        ok = (shown["status"] == "ok").to_numpy()
        ax.plot(shown["step"][ok], shown["estimate"][ok], "o", color=color, ms=5.5)
        ax.plot(shown["step"][~ok], shown["estimate"][~ok], "o", mfc="white", mec=color, ms=5.5)
        handles.append(Line2D([], [], color=color, marker="o", lw=1.8,
                              label=f"{_group_name(group)} (≈{max(size, 0):,.0f} users)"))
    shown_steps = sorted(curve.loc[curve["status"] != "suppressed", "step"].unique()) or sorted(curve["step"].unique())
    ax.set_xticks(shown_steps)
    ax.set_xlim(min(shown_steps) - 0.3, max(shown_steps) + 0.3)
    if len(shown_steps) <= 6:
        ax.set_xticklabels([f"{k}\n(days {days * (k - 1) + 1}–{days * k})" for k in shown_steps], fontsize=8)
        ax.set_xlabel(f"period k: {spec.period}s after the first purchase")
    else:
        ax.set_xlabel(f"period k: {spec.period}s after the first purchase (days {days}·(k−1)+1 to {days}·k)")
    ax.set_ylabel("share of cohort buying again in period k")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    top = np.nanmax(curve.loc[curve["status"] != "suppressed", "ci_high"].to_numpy(float), initial=0.1)
    ax.set_ylim(0, min(1.0, top * 1.1 + 0.02))
    ax.grid(alpha=0.3)
    if not handles:
        _nothing_shown(ax, result)
        ax.set_ylim(0, 1)
    else:
        ax.legend(handles=handles, title=f"{_BY_TITLE[spec.by]}\n(users in the cohorts, summed)", fontsize=8,
                  title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title(_title(result, f"Cohort retention curve ({spec.period}ly cohorts, pooled)"), fontsize=10)
    _footnote(fig, result, curve, hidden, "Hollow markers",
              f"Each point pools the {spec.period}ly cohorts observed for k full periods.")
    return figure_png(fig)


def _bars(result: QueryResult, figure: str, ylabel: str, *, percent: bool, what: str, den_label: str) -> bytes:
    figs = result.curve()
    figs = figs.loc[figs["figure"] == figure]
    groups, hidden = _split_groups(figs)
    steps = sorted(figs["step"].unique())
    width = 0.8 / max(len(groups), 1)
    fig, ax = plt.subplots(figsize=(7.5 if len(steps) > 1 else 5.5, 4.4))
    handles = []
    for i, group in enumerate(groups):
        g = figs.loc[figs["group"] == group].set_index("step").reindex(steps)
        x = np.arange(len(steps)) + (i - (len(groups) - 1) / 2) * width
        color = _COLORS[i % len(_COLORS)]
        st = g["status"].to_numpy()
        shown, flagged = st != "suppressed", st == "flagged"
        est, lo, hi = (g[c].to_numpy(float) for c in ("estimate", "ci_low", "ci_high"))
        ax.bar(x[shown & ~flagged], est[shown & ~flagged], width * 0.92, color=color)
        ax.bar(x[flagged], est[flagged], width * 0.92, facecolor="white", edgecolor=color, hatch="//")
        ax.errorbar(x[shown], est[shown], yerr=[est[shown] - lo[shown], hi[shown] - est[shown]], fmt="none",
                    ecolor="black", capsize=4, lw=1)
        for xi in x[~shown]:
            ax.annotate("suppressed", (xi, 0), rotation=90, ha="center", va="bottom", fontsize=7, color="dimgray")
        handles.append(Patch(facecolor=color, edgecolor=color,
                             label=f"{_group_name(group)} (n≈{max(float(g['denominator'].iloc[0]), 0):,.0f})"))
    ax.set_xticks(np.arange(len(steps)))
    ax.set_xticklabels([f"within {s} days" for s in steps])
    ax.set_xlim(-0.6, len(steps) - 0.4)
    ax.set_xlabel("window after the first purchase")
    ax.set_ylabel(ylabel)
    if percent:
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.grid(alpha=0.3, axis="y")
    if not handles:
        _nothing_shown(ax, result)
    else:
        ax.legend(handles=handles, title=f"{_BY_TITLE[result.spec.by]}\n(n = {den_label},\n{steps[0]}-day window)",
                  fontsize=8, title_fontsize=8,
                  loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title(_title(result, what), fontsize=10)
    _footnote(fig, result, figs, hidden, "Hatched bars", intervals="Error bars")
    return figure_png(fig)


def plot_result(result: QueryResult) -> bytes:
    """The PNG for any query kind."""
    kind = result.spec.kind
    if kind == "retention_curve":
        return plot_retention(result)
    if kind == "repeat_rate":
        return _bars(result, "repeat_rate", "share of first-time buyers who bought again", percent=True,
                     what="Repeat-purchase rate", den_label="eligible first-time buyers")
    spec = result.spec
    return _bars(result, "spend_per_retained_user",
                 f"spend per retained user\n(currency units, each user clipped at {spec.spend_cap:g})",
                 percent=False, what=f"Spend per retained user within {spec.window_days} days",
                 den_label="retained users")


__all__ = ["plot_result", "plot_retention"]
