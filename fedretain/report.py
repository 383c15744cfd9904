"""Readable reports: plots (PNG) and a self-contained HTML page, plus the JSON beside it.

Plots are embedded as base64 so ``report.html`` can be handed on as one file.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedretain.html_table import html_table  # noqa: E402


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
    ax.set_ylabel("AUC (held-out users)", color="tab:blue")
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
    bars = ax.bar(names, auc, color="tab:blue")
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
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax.hist(churn, bins=30, color="tab:orange", edgecolor="white")
    ax.set_xlabel("churn probability (next 30 days)")
    ax.set_ylabel("users")
    ax.set_title(f"Scores of {merchant}'s users")
    labels, counts = np.unique(np.asarray(segments), return_counts=True)
    ax2.barh(labels, counts, color="tab:green")
    ax2.set_xlabel("users")
    ax2.set_title("Segments")
    return figure_png(fig)


def plot_consent_coverage(coverage: dict[str, dict[str, int]]) -> bytes:
    """Per merchant: users in the silo, users with consent for the purpose, users used for training."""
    names = list(coverage)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for i, (key, label) in enumerate([("candidates", "users in silo"), ("consented", "consented"),
                                      ("used", "used (buyers with label scope)")]):
        ax.bar(x + (i - 1) * 0.27, [coverage[n].get(key, 0) for n in names], width=0.27, label=label)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("users")
    ax.set_title("Consent coverage per merchant (purpose: retention_modeling)")
    ax.legend(fontsize=8)
    return figure_png(fig)


def table_html(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """An HTML table of dict rows (columns: the first row's keys unless given)."""
    if not rows:
        return "<p>(none)</p>"
    columns = list(columns or rows[0].keys())
    return html_table(columns, ([r.get(c) for c in columns] for r in rows))


CSS = """body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f0f0f0}h2{border-bottom:1px solid #ddd;padding-bottom:4px}.ok{color:#1a7f37}.bad{color:#cf222e}
img{max-width:100%}"""


def write_html(path: Path, title: str, sections: Sequence[tuple[str, str]]) -> Path:
    """Write a self-contained HTML page of (heading, html-body) sections, atomically."""
    body = "".join(f"<h2>{html.escape(h)}</h2>\n{b}\n" for h, b in sections)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
