"""Readable reports: plots (PNG) and a self-contained HTML page, plus the JSON beside it.

Plots are embedded as base64 so ``report.html`` can be handed on as one file.
"""

from __future__ import annotations

import base64
import html
import io
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedretain.html_table import html_table  # noqa: E402


def short(label: Any, width: int = 22) -> str:
    """A label that fits a chart: long names cut with an ellipsis (the tables show them whole)."""
    text = str(label)
    return text if len(text) <= width else text[: width - 1] + "…"


def figure_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def img_tag(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}"/>'


def plot_rounds(rounds: Sequence[dict[str, Any]]) -> bytes:
    """AUC and log loss of the global model per round (held-out users, example-weighted)."""
    r = [e["round"] for e in rounds]
    auc = [e.get("evaluate", {}).get("auc", np.nan) for e in rounds]
    ll = [e.get("evaluate", {}).get("log_loss", np.nan) for e in rounds]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    ax.plot(r, auc, "o-", color="tab:blue", label="AUC")
    ax.set_xlabel("round")
    ax.set_ylabel("AUC (mean over merchants)", color="tab:blue")
    ax.set_xticks(r)
    ax2 = ax.twinx()
    ax2.plot(r, ll, "s--", color="tab:red", label="log loss")
    ax2.set_ylabel("log loss", color="tab:red")
    ax.set_title("Global model per round")
    ax.grid(alpha=0.3)
    return figure_png(fig)


def plot_merchant_auc(per_merchant: dict[str, dict[str, float]], baseline: float | None = None) -> bytes:
    """Final-round AUC of the global model on each merchant's own held-out users."""
    names = list(per_merchant)
    auc = [per_merchant[n].get("auc", np.nan) for n in names]
    sizes = [per_merchant[n].get("num_examples", 0) for n in names]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    bars = ax.bar(range(len(names)), auc, color="tab:blue", tick_label=[short(n) for n in names])
    for bar, n in zip(bars, sizes):
        ax.annotate(f"n={int(n)}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="bottom", fontsize=8)
    if baseline is not None:
        ax.axhline(baseline, color="tab:gray", ls="--", label=f"centralized {baseline:.3f}")
        ax.legend(loc="lower right")
    ax.set_ylim(0.5, 1.0)
    ax.set_ylabel("AUC (merchant's held-out users)")
    ax.set_title("Per-merchant AUC of the global model")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    return figure_png(fig)


def plot_score_distribution(churn: np.ndarray, segments: Sequence[str], merchant: str) -> bytes:
    """Histogram of churn scores beside customers per segment (horizontal bars, labels never overlap)."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained", width_ratios=(1.1, 1))
    ax.hist(churn, bins=30, color="tab:orange", edgecolor="white")
    ax.set_xlabel("chance of leaving (not buying again within the horizon)")
    ax.set_ylabel("customers")
    ax.set_title(f"Scores of {short(merchant)}'s customers")
    labels, counts = np.unique(np.asarray(segments, dtype=str), return_counts=True)
    order = np.argsort(counts)
    y = np.arange(len(labels))
    ax2.barh(y, counts[order], color="tab:green")
    ax2.set_yticks(y, [textwrap.fill(str(lab), 16) for lab in labels[order]])
    for yi, c in zip(y, counts[order]):
        ax2.annotate(f" {int(c)}", (c, yi), va="center", fontsize=8)
    ax2.set_xlim(0, max(counts.max() if len(counts) else 1, 1) * 1.15)
    ax2.set_xlabel("customers")
    ax2.set_title("Customers per segment")
    return figure_png(fig)


def plot_consent_coverage(coverage: dict[str, dict[str, int]]) -> bytes:
    """Per merchant: users in the silo, users with consent for the purpose, users used for training."""
    names = list(coverage)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for i, (key, label) in enumerate([("candidates", "users in silo"), ("consented", "consented"),
                                      ("used", "used (buyers with label scope)")]):
        ax.bar(x + (i - 1) * 0.27, [coverage[n].get(key, 0) for n in names], width=0.27, label=label)
    ax.set_xticks(x, [short(n) for n in names], rotation=30, ha="right")
    ax.set_ylabel("users")
    ax.set_title("Consent coverage per merchant (purpose: retention_modeling)")
    ax.legend(fontsize=8)
    return figure_png(fig)


def table_html(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None,
               titles: dict[str, str] | None = None) -> str:
    """An HTML table of dict rows (columns: the first row's keys unless given; ``titles``: heading tooltips)."""
    if not rows:
        return "<p>(none)</p>"
    columns = list(columns or rows[0].keys())
    return html_table(columns, ([r.get(c) for c in columns] for r in rows), titles=titles)


# -- plain words for the numbers a merchant reads -----------------------------------------------------
GLOSSARY: dict[str, tuple[str, str]] = {
    "auc": ("AUC", "How well the model ranks customers: the chance that a customer who came back is scored "
                   "above one who did not. 0.5 is a coin toss, 1.0 a perfect ranking. It says nothing about "
                   "whether the percentages themselves are right (see log loss, Brier, ECE)."),
    "log_loss": ("log loss", "The penalty for confident mistakes: predicting 95 % for a customer who then "
                             "leaves costs a lot. Lower is better; 0 is perfect."),
    "brier": ("Brier", "Mean squared gap between the predicted chance and what happened (1 came back, 0 did "
                       "not). Lower is better; 0 is perfect."),
    "ece": ("ECE", "Expected calibration error: how far the predicted chances are from what actually happened, "
                   "averaged over groups of similar predictions. 0.02 means about 2 percentage points off."),
    "ltv_spearman": ("LTV ρ", "Spearman rank correlation between predicted and actual spend over the horizon: "
                              "1 means the customers are in exactly the right order of value, 0 no relation."),
    "gini": ("normalized Gini", "How much of the best possible ordering by spend the predicted value achieves: "
                                "1 = the biggest spenders are ranked first exactly, 0 = random order."),
    "ratio": ("mean-calibration ratio", "Mean predicted spend divided by mean actual spend: 1.00 is right on "
                                        "average; the target is within 0.85–1.15."),
    "train_loss": ("train loss", "The training objective on the merchants' training customers (chance of "
                                 "returning plus weighted value). Only useful to compare rounds."),
}


def metric_label(key: str) -> str:
    return GLOSSARY[key][0] if key in GLOSSARY else key


def metric_titles(keys: Sequence[str]) -> dict[str, str]:
    """Tooltips for table headings named by ``metric_label``."""
    return {GLOSSARY[k][0]: GLOSSARY[k][1] for k in keys if k in GLOSSARY}


def glossary_html(keys: Sequence[str]) -> str:
    items = "".join(f"<dt>{html.escape(GLOSSARY[k][0])}</dt><dd>{html.escape(GLOSSARY[k][1])}</dd>"
                    for k in keys if k in GLOSSARY)
    return f"<dl class='glossary'>{items}</dl>"


def currency_name(currency: str) -> str:
    """The money unit said explicitly: the code, or that merchant.json sets none."""
    return currency or "shop currency (no \"currency\" in merchant.json)"


def money(value: Any, currency: str = "") -> str:
    """``1,234.56 EUR`` (2 decimals, thousands separated; "–" when missing or not finite)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "–"
    if not math.isfinite(v):
        return "–"
    return f"{v:,.2f} {currency}".rstrip()


def percent(value: Any, digits: int = 1) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "–"
    return f"{v:.{digits}%}" if math.isfinite(v) else "–"


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;
line-height:1.45;overflow-wrap:break-word}
table{border-collapse:collapse;margin:1em 0;max-width:100%}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}td.long{overflow-wrap:anywhere}
th{background:#f0f0f0;overflow-wrap:normal}td.num{text-align:right;white-space:nowrap}th[title]{cursor:help;
text-decoration:underline dotted}
.scroll{max-width:100%;overflow-x:auto}h2{border-bottom:1px solid #ddd;padding-bottom:4px}
.ok{color:#1a7f37}.bad{color:#cf222e}.note{color:#555;font-size:.95em}
img{max-width:100%;height:auto}code{overflow-wrap:anywhere}
dl.glossary{display:grid;grid-template-columns:max-content 1fr;gap:.3em 1em}dl.glossary dt{font-weight:600}
dl.glossary dd{margin:0}"""


def write_html(path: Path, title: str, sections: Sequence[tuple[str, str]]) -> Path:
    """Write a self-contained HTML page of (heading, html-body) sections, atomically."""
    body = "".join(f"<h2>{html.escape(h)}</h2>\n{b}\n" for h, b in sections)
    page = (f"<!doctype html><html><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path


# -- the demo's report: what a merchant reads after a run ---------------------------------------------
COMPARED = ("auc", "log_loss", "brier", "ece", "ltv_spearman")


def _metric_row(name: str, m: dict[str, Any], keys: Sequence[str] = COMPARED) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name}
    for k in keys:
        row[metric_label(k)] = m.get(k)
    if "auc_low" in m and "auc_high" in m and keys[0] == "auc":
        row["AUC 95 % interval"] = f"{float(m['auc_low']):.3f} – {float(m['auc_high']):.3f}"
    return row


def _summary_section(record: dict[str, Any], summary: dict[str, Any]) -> str:
    fed, cen = summary["federated"], summary["centralized"]
    last = record["rounds"][-1].get("evaluate", {}) if record.get("rounds") else {}
    titles = {**metric_titles(COMPARED), "AUC 95 % interval": "Range that holds the AUC on customers like these "
                                                              "with 95 % confidence (bootstrap over held-out users)."}
    rows = [_metric_row("federated model (FedAvg), all held-out users pooled", fed),
            _metric_row("centralized yardstick: same model trained on pooled data", cen)]
    mean_auc = last.get("auc")
    two_aucs = ""
    if mean_auc is not None and math.isfinite(float(mean_auc)):
        two_aucs = (
            f"<p><b>Why the federated model has two AUCs.</b> {float(fed['auc']):.4f} above is measured on all "
            f"merchants' held-out customers pooled into one ranking; {float(mean_auc):.4f} (round table, last "
            "round) is the average of each merchant's AUC on its own held-out customers, weighted by their "
            "number. Same model, different question: the pooled AUC also compares customers of different shops "
            "(a shop where most customers come back makes every one of its customers look safer), the "
            "per-merchant average only asks how well each shop's own customers are ordered, which is what a "
            "merchant ranking its own win-back list needs. Small shops' AUCs are noisy (few held-out customers), "
            "so the two numbers can differ by a few hundredths either way.</p>")
    gap = float(cen["auc"]) - float(fed["auc"])
    return (
        f"<p>Run <code>{html.escape(str(record['run_id']))}</code>: {len(record.get('rounds', []))} rounds over "
        f"{len(summary['merchants'])} merchants; status <b>{html.escape(str(record['status']))}</b>. "
        "No raw data left a node: the server received model arrays and aggregate counts only.</p>"
        + table_html(rows, titles=titles)
        + "<p>Every number is measured on <i>held-out</i> customers: customers each merchant kept aside and never "
          "trained on, so they show how the model does on customers it has not seen.</p>"
        + f"<p><b>Federated vs centralized.</b> The yardstick is the same model trained as if all merchants had "
          f"pooled their data in one place — exactly what federation avoids. Its AUC is {gap:+.4f} from the "
          "federated model's: the cost (if positive) of keeping the data in each shop. Both are scored on the "
          "same held-out customers.</p>"
        + two_aucs
    )


def _scores_section(scores: Any, merchant: str, currency: str, horizon_days: float, calibrated: bool) -> str:
    cur = currency_name(currency)
    unit = f" ({currency})" if currency else ""
    rows = [{"rank": int(r["rank"]), "customer": str(r["user_id"]),
             "chance of leaving": percent(r["churn_probability"]),
             f"value if retained{unit}": money(r["value_if_retained"]),
             f"value at risk{unit}": money(r["expected_value_at_risk"]),
             f"past spend{unit}": money(r["past_spend"]), "segment": str(r["segment"])}
            for r in scores.head(15).to_dict("records")]
    titles = {
        "chance of leaving": f"Chance the customer does not buy again within {horizon_days:g} days.",
        f"value if retained{unit}": f"Expected spend in the next {horizon_days:g} days if the customer stays.",
        f"value at risk{unit}": "Chance of leaving × value if retained: what a win-back action can save.",
        f"past spend{unit}": "What the customer spent so far (shown, never ranked on).",
    }
    money_note = (f"Money in {html.escape(cur)}, 2 decimals, over the next {horizon_days:g} days"
                  + (", calibrated on this shop's own customers." if calibrated else
                     " — <b>not calibrated in money</b> (too few recent buyers): use it to rank, not to budget."))
    return (
        img_tag(plot_score_distribution(scores["churn_probability"].to_numpy(np.float64),
                                        scores["segment"].tolist(), merchant), "score distribution")
        + f"<p>{len(scores)} of {html.escape(merchant)}'s customers scored on its own node. At-risk customers come "
          "first, ordered by value at risk; a loyal big spender is valuable but not at risk. "
          f"{money_note} Full precision in the scores CSV.</p>"
        + table_html(rows, titles=titles)
    )


def _ltv_section(ltv: dict[str, Any], path: Path, currency: str, horizon_days: float, merchant: str) -> str:
    from fedretain.ltv import plot_deciles

    table = ltv["deciles"]
    png = plot_deciles(table, path, currency=currency or "shop currency", horizon_days=horizon_days,
                       title=f"{short(merchant)}: predicted vs actual spend per decile")
    cur = currency_name(currency)
    stats = [{"customers (held out)": ltv["n_users"], metric_label("gini"): ltv["gini"],
              metric_label("ratio"): ltv["ratio"], "mean predicted": money(ltv["mean_predicted"], currency),
              "mean actual": money(ltv["mean_actual"], currency)}]
    deciles = [{"decile": int(r["decile"]), "customers": int(r["users"]),
                "mean predicted": money(r["mean_predicted"], currency),
                "mean actual": money(r["mean_actual"], currency)}
               for r in table.to_dict("records")]
    return (
        f"<p>Predicted value is the expected spend per customer over the next {horizon_days:g} days, in "
        f"{html.escape(cur)}. The money calibration was fitted on {html.escape(merchant)}'s training customers and is "
        "checked here on its held-out customers: bars of the same height per decile mean the predicted value can "
        "be used to budget.</p>"
        + f"<p>{_ratio_verdict(float(ltv['ratio']))}</p>"
        + img_tag(png.read_bytes(), "LTV decile calibration")
        + table_html(stats, titles=metric_titles(("gini", "ratio")))
        + "<details><summary>Per-decile numbers</summary>" + table_html(deciles) + "</details>"
    )


def _ratio_verdict(ratio: float) -> str:
    if not math.isfinite(ratio):
        return "No held-out customer spent anything in the horizon: the money level cannot be checked."
    if 0.85 <= ratio <= 1.15:
        return (f"On held-out customers the mean prediction is {ratio:.2f}× the mean actual spend: within the "
                "0.85–1.15 target, usable for budgeting.")
    side = "below" if ratio < 0.85 else "above"
    return (f"<b>On held-out customers the mean prediction is {ratio:.2f}× the mean actual spend, {side} the "
            "0.85–1.15 target</b>: rank customers by it, but budget with care (more training data or rounds, or "
            "fitting the factor on all labelled customers as <code>fedretain score</code> does, usually helps).")


def _joining_section(joining: Sequence[dict[str, Any]]) -> str:
    def verdict(r: dict[str, Any]) -> str:
        if r.get("decidable") is False:  # no returning customer held out: the lower prediction wins by default
            return ("undecided: none of the held-out customers came back ("
                    + ("joining" if r["gain"] > 0 else "training alone") + " predicted fewer returns)")
        if r["gain_low"] > 0:
            return "joining helps (significant)"
        if r["gain_high"] < 0:
            return "training alone did better (significant)"
        return "joining helps (not significant)" if r["gain"] > 0 else "training alone did better (not significant)"

    rows = [{"merchant": r["merchant"], "customers (train / held out)": f"{r['n_train']} / {r['n_test']}",
             "log loss: alone": r["log_loss"]["local"], "log loss: shared": r["log_loss"]["global"],
             "log loss: shared, fine-tuned": r["log_loss"]["personalised"],
             "AUC: alone": r["auc"]["local"], "AUC: shared": r["auc"]["global"],
             "AUC: fine-tuned": r["auc"]["personalised"],
             "gain (log loss)": f"{r['gain']:+.4f}", "95 % interval": f"{r['gain_low']:+.4f} – {r['gain_high']:+.4f}",
             "verdict": verdict(r)} for r in joining]
    titles = {"log loss: alone": "A model trained on this merchant's customers only, same recipe and epochs, "
                                 "started at this merchant's own repeat rate.",
              "log loss: shared": "The federated model as every merchant received it.",
              "log loss: shared, fine-tuned": "The federated model trained one more short round on this "
                                              "merchant's own customers (personalisation).",
              "gain (log loss)": "Log loss of training alone minus that of the better shared option; above 0 "
                                 "means joining helps.",
              "95 % interval": "Range that holds the gain with 95 % confidence, from the per-customer "
                               "differences on this merchant's held-out customers."}
    return (
        "<p>Is the shared model better for <i>my</i> customers than one I train alone? Each merchant's node "
        "answers this on its own held-out customers; nothing in this table is sent anywhere. Lower log loss is "
        "better; the gain is the log loss saved by joining, with a 95 % interval. When the fine-tuned column wins, "
        "fine-tune the shared model on your own data before scoring.</p>"
        + table_html(rows, titles=titles)
    )


def write_demo_report(path: Path, record: dict[str, Any], summary: dict[str, Any], scores: Any, *,
                      currency: str = "", horizon_days: float = 30.0, calibrated: bool = False,
                      ltv: dict[str, Any] | None = None, joining: Sequence[dict[str, Any]] | None = None,
                      notes: Sequence[str] = ()) -> Path:
    """The demo's ``report.html``: summary with explained metrics, rounds, merchants, consent, scores, LTV, joining.

    ``ltv``: {deciles (``ltv.decile_table``), n_users, gini, ratio, mean_predicted, mean_actual};
    ``joining``: ``JoiningResult.as_dict()`` per merchant. The decile plot is also written beside the report.
    """
    path = Path(path)
    merchant = summary["merchants"][0]
    round_keys = ("auc", "log_loss", "ece", "ltv_spearman", "train_loss")
    rounds = [{"round": r["round"], **{metric_label(k): r.get("evaluate", {}).get(k) for k in round_keys[:-1]},
               metric_label("train_loss"): r.get("train", {}).get("train_loss")} for r in record.get("rounds", [])]
    coverage_rows = [{"merchant": m, "customers in silo": c["candidates"], "consented": c["consented"],
                      "used for training": c["used"], "used share": percent(c["used"] / max(c["candidates"], 1))}
                     for m, c in summary["consent_coverage"].items()]
    sections = [
        ("Summary", _summary_section(record, summary)),
        ("What the numbers mean", glossary_html(("auc", "log_loss", "brier", "ece", "ltv_spearman", "gini",
                                                 "ratio", "train_loss"))),
        ("Global model per round",
         img_tag(plot_rounds(record.get("rounds", [])), "metrics per round")
         + "<p class='note'>Per round: the average over merchants of each merchant's metric on its own held-out "
           "customers, weighted by their number (what the server learns without seeing any customer).</p>"
         + table_html(rounds, titles=metric_titles(round_keys))),
        ("Per-merchant AUC",
         img_tag(plot_merchant_auc(summary["per_merchant_auc"], summary["centralized"]["auc"]), "per-merchant AUC")
         + "<p class='note'>Bars: the global model's AUC on each merchant's own held-out customers (n = how many). "
           "The dashed line is the centralized yardstick's pooled AUC; it is a different measurement, drawn for "
           "scale.</p>"),
        ("Consent coverage", img_tag(plot_consent_coverage(summary["consent_coverage"]), "consent coverage")
         + table_html(coverage_rows)),
        ("Scores (win-back list)", _scores_section(scores, merchant, currency, horizon_days, calibrated)),
    ]
    if ltv is not None:
        sections.append((f"Predicted value in money ({merchant})",
                         _ltv_section(ltv, path.parent / "ltv_deciles.png", currency, horizon_days, merchant)))
    if joining:
        sections.append(("What a merchant gains by joining", _joining_section(joining)))
    if notes:
        sections.append(("Notes", "".join(f"<p class='note'>{html.escape(n)}</p>" for n in notes)))
    return write_html(path, "fedretain demo report", sections)
