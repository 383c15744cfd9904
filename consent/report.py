"""A compliance report of one ledger: coverage over time, withdrawals, usage by run, verification.

Written for a person (a self-contained HTML page with embedded PNG plots) and for a
machine (the same numbers as JSON). Coverage is computed exactly from the log: each
(subject, purpose, scope) is granted on half-open intervals ``[effective, min(next record,
expiry))``, so the curve at any time T equals what :meth:`ConsentLedger.state_at` says at T.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedretain.html_table import Abbrev, html_table

from .impact import DPBound, RunModels, phase_of, subject_impact, withdrawn_users_in_models
from .ledger import ConsentLedger
from .records import format_ts, from_us, to_us
from .vocab import PURPOSES, SCOPES, VOCAB_VERSION

__all__ = ["grant_intervals", "coverage_over_time", "withdrawals_over_time", "build_report"]


def grant_intervals(log: pd.DataFrame) -> pd.DataFrame:
    """Granted intervals per (subject, purpose, scope) from a log in replay order.

    Columns: subject_id, purpose, scope, start, end (µs; end exclusive, int64 max = open).
    """
    cols = ["subject_id", "purpose", "scope", "start", "end"]
    if not len(log):
        return pd.DataFrame({c: pd.Series([], dtype=object if c in cols[:3] else np.int64) for c in cols})
    n = len(log)
    order = np.arange(n)
    s_codes, s_uniq = pd.factorize(log["subject_id"].to_numpy(dtype=object))
    p_codes, p_uniq = pd.factorize(log["purpose"].to_numpy(dtype=object))
    sc_codes, sc_uniq = pd.factorize(log["scopes"].to_numpy(dtype=object))
    all_bits = (1 << len(SCOPES)) - 1
    bit = {s: 1 << j for j, s in enumerate(SCOPES)}
    mask = np.array([sum(bit[s] for s in u.split(";")) if u else all_bits for u in sc_uniq], dtype=np.int64)[sc_codes]
    rec, scope = [], []
    for j in range(len(SCOPES)):
        idx = np.flatnonzero(mask & (1 << j))
        rec.append(idx)
        scope.append(np.full(len(idx), j))
    rec_a = np.concatenate(rec)
    scope_a = np.concatenate(scope)
    srt = np.lexsort((order[rec_a], scope_a, p_codes[rec_a], s_codes[rec_a]))
    rec_a, scope_a = rec_a[srt], scope_a[srt]
    group = (s_codes[rec_a].astype(np.int64) * len(p_uniq) + p_codes[rec_a]) * len(SCOPES) + scope_a
    eff = log["effective_at"].to_numpy(dtype=np.int64)[rec_a]
    nxt = np.full(len(rec_a), np.iinfo(np.int64).max, dtype=np.int64)
    same = group[1:] == group[:-1]
    nxt[:-1] = np.where(same, eff[1:], nxt[:-1])
    end = np.minimum(nxt, log["expires_at"].to_numpy(dtype=np.int64)[rec_a])
    is_grant = log["action"].to_numpy(dtype=object)[rec_a] == "grant"
    keep = is_grant & (end > eff)
    return pd.DataFrame({
        "subject_id": s_uniq[s_codes[rec_a[keep]]],
        "purpose": p_uniq[p_codes[rec_a[keep]]],
        "scope": np.array(SCOPES, dtype=object)[scope_a[keep]],
        "start": eff[keep],
        "end": end[keep],
    })


def _count_active(start: np.ndarray, end: np.ndarray, times_us: np.ndarray) -> np.ndarray:
    """Number of half-open intervals [start, end) containing each time."""
    return (np.searchsorted(np.sort(start), times_us, side="right")
            - np.searchsorted(np.sort(end), times_us, side="right"))


def coverage_over_time(ledger: ConsentLedger, times: list[Any]) -> dict[str, pd.DataFrame]:
    """Per purpose: a frame indexed by time with one column per scope plus ``any_scope``
    (subjects with valid consent), each the number of subjects granting it at that time."""
    times_us = np.array([to_us(t, "time") for t in times], dtype=np.int64)
    iv = grant_intervals(ledger.log_frame())
    out: dict[str, pd.DataFrame] = {}
    index = pd.DatetimeIndex([from_us(int(t)) for t in times_us], name="time")
    for purpose in PURPOSES:
        sub = iv[iv["purpose"] == purpose]
        data = {}
        for scope in SCOPES:
            s = sub[sub["scope"] == scope]
            data[scope] = _count_active(s["start"].to_numpy(), s["end"].to_numpy(), times_us)
        data["any_scope"] = _count_active(*_union(sub), times_us)
        out[purpose] = pd.DataFrame(data, index=index)
    return out


def _union(iv: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Merge each subject's intervals (any scope) into disjoint blocks."""
    if not len(iv):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    df = iv[["subject_id", "start", "end"]].sort_values(["subject_id", "start"], kind="stable")
    subj = df["subject_id"].to_numpy(dtype=object)
    start = df["start"].to_numpy(np.int64)
    end = df["end"].to_numpy(np.int64)
    run_max = pd.Series(end).groupby(pd.factorize(subj)[0]).cummax().to_numpy()
    new = np.ones(len(df), dtype=bool)
    new[1:] = (subj[1:] != subj[:-1]) | (start[1:] > run_max[:-1])
    block = np.cumsum(new) - 1
    b_start = start[new]
    b_end = pd.Series(end).groupby(block).max().to_numpy()
    return b_start, b_end


def withdrawals_over_time(ledger: ConsentLedger, freq: str = "MS") -> pd.DataFrame:
    """Withdraw/expire records per period (rows) and purpose (columns)."""
    log = ledger.log_frame()
    log = log[log["action"] != "grant"]
    if not len(log):
        return pd.DataFrame(columns=list(PURPOSES))
    t = pd.to_datetime(log["effective_at"].to_numpy(), unit="us")
    tab = pd.crosstab(pd.Series(t).dt.to_period(freq[0]).dt.start_time, log["purpose"].to_numpy())
    tab.index.name = "period"
    return tab.reindex(columns=list(PURPOSES), fill_value=0)


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _time_grid(ledger: ConsentLedger, at: datetime, points: int) -> list[datetime]:
    row = ledger.connection.execute("SELECT MIN(effective_at), MAX(effective_at) FROM records").fetchone()
    end = at
    start = from_us(row[0]) if row[0] is not None else end
    if start >= end:
        start = end - pd.Timedelta(days=1)
    return list(pd.date_range(start, end, periods=points).to_pydatetime())


USE_LABELS = {"train": "training", "evaluate": "evaluation", "analytics": "analytics", "score": "scoring"}


def use_label(feature_set: str) -> str:
    """What kind of use a usage entry records, in words (from its ``feature_set`` prefix)."""
    phase = phase_of(feature_set)
    return USE_LABELS.get(phase, phase)


def withdrawals_list(ledger: ConsentLedger, at_us: int, limit: int = 200) -> list[dict[str, Any]]:
    """The latest withdraw/expire records effective by ``at`` (inclusive: one recorded this second is listed)."""
    rows = ledger.connection.execute(
        "SELECT seq FROM records WHERE action != 'grant' AND effective_at <= ? ORDER BY effective_at DESC, seq DESC "
        "LIMIT ?", (at_us, limit)).fetchall()
    wanted = {int(r[0]) for r in rows}
    out = []
    for seq, rec in _records_by_seq(ledger, wanted):
        d = rec.to_dict()
        out.append({"seq": seq, "subject_id": d["subject_id"], "purpose": d["purpose"], "action": d["action"],
                    "scopes": d["scopes"], "effective_at": d["effective_at"], "recorded_by": d["recorded_by"]})
    return sorted(out, key=lambda r: (r["effective_at"], r["seq"]), reverse=True)


def _records_by_seq(ledger: ConsentLedger, seqs: set[int]) -> list[tuple[int, Any]]:
    from .records import ConsentRecord

    if not seqs:
        return []
    marks = ",".join("?" * len(seqs))
    cur = ledger.connection.execute(f"SELECT seq, canonical FROM records WHERE seq IN ({marks})", sorted(seqs))
    return [(int(seq), ConsentRecord.from_json(c)) for seq, c in cur]


def build_report(ledger: ConsentLedger, out_dir: str | os.PathLike[str], *, at: Any = None,
                 points: int = 60, runs: Iterable[RunModels] = (), subjects: Iterable[str] = (),
                 privacy: Mapping[str, DPBound] | None = None, dp_source: str = "") -> dict[str, Path]:
    """Write ``report.html`` and ``report.json`` into ``out_dir``; returns their paths.

    ``runs`` (platform run records) name each round's model; ``subjects`` each get an
    erasure-impact section; ``privacy`` maps run id → the node's DP bound for it.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc)
    # a record effective this very microsecond is in the state at ``at``: replay counts effective <= at
    at_dt = now if at is None else from_us(to_us(at, "at"))
    runs = list(runs)
    verify = ledger.verify()
    head = ledger.head()
    grid = _time_grid(ledger, at_dt, points)
    coverage = coverage_over_time(ledger, grid)
    withdrawals = withdrawals_over_time(ledger)
    usage = [u.to_dict() for u in ledger.usages()]
    n_subjects = ledger.connection.execute("SELECT COUNT(DISTINCT subject_id) FROM records").fetchone()[0]
    current = {p: {k: int(v) for k, v in cov.iloc[-1].items()} for p, cov in coverage.items()}

    # -- figures ---------------------------------------------------------------------------
    fig = Figure(figsize=(11, 7.5))
    axes = fig.subplots(2, 2, sharex=True).ravel()
    for ax, (purpose, cov) in zip(axes, coverage.items()):
        for scope in SCOPES:
            ax.plot(cov.index, cov[scope], label=scope, linewidth=1.2)
        ax.plot(cov.index, cov["any_scope"], label="valid consent (any scope)", color="black", linewidth=2.2)
        ax.set_title(purpose)
        ax.set_ylabel("subjects")
        top = int(cov.to_numpy().max()) if cov.size else 0
        ax.set_ylim(0, max(1, top) * 1.08)
        if top == 0:
            ax.text(0.5, 0.5, "no consent granted for this purpose", ha="center", va="center",
                    transform=ax.transAxes, color="grey")
        ax.grid(alpha=0.3)
        ax.tick_params(axis="x", labelrotation=30)
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle("Consent coverage by scope and purpose over time")
    cov_png = _png(fig)

    fig = Figure(figsize=(11, 3.5))
    ax = fig.subplots()
    if len(withdrawals):
        bottom = np.zeros(len(withdrawals))
        for purpose in withdrawals.columns:
            ax.bar(withdrawals.index, withdrawals[purpose].to_numpy(), bottom=bottom.copy(), width=20, label=purpose)
            bottom = bottom + withdrawals[purpose].to_numpy()
        ax.set_ylim(0, max(1.0, float(bottom.max())) * 1.25)
        ax.legend(fontsize=7, ncol=len(withdrawals.columns), loc="upper left")
    else:
        ax.text(0.5, 0.5, "no withdrawals recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("Withdrawals and expiries per month")
    ax.set_ylabel("records")
    ax.grid(alpha=0.3, axis="y")
    wd_png = _png(fig)

    usage_png = ""
    if usage:
        udf = pd.DataFrame(usage)
        per_run = udf.groupby("run_id", sort=False).agg(rounds=("round", "nunique"), users=("n_users", "max"))
        fig = Figure(figsize=(11, 3.2))
        ax = fig.subplots()
        ax.bar(per_run.index.astype(str), per_run["users"], color="tab:purple")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title("Users whose data each run used (largest round)")
        ax.set_ylabel("users")
        ax.tick_params(axis="x", labelrotation=30)
        usage_png = _png(fig)

    data = {
        "generated_at": format_ts(now),
        "at": format_ts(at_dt),
        "ledger": {
            "path": str(ledger.path),
            "controller": ledger.controller,
            "key_fingerprint": ledger.key_fingerprint,
            "created_at": ledger.created_at,
            "records": verify.n_records,
            "subjects": int(n_subjects),
            "head": head.to_dict(),
            "vocab_version": VOCAB_VERSION,
        },
        "verify": {**verify.to_dict(), "warning": (
            "checked against the key this ledger declares about itself, not a trusted key: a ledger rebuilt and "
            "re-signed under another key would pass; verify with the node's pinned key (--silo SILO)"
            if verify.key_source.startswith("ledger") else "")},
        "coverage_at": current,
        "coverage_over_time": {
            p: {"time": [format_ts(t) for t in cov.index.to_pydatetime()],
                **{c: cov[c].astype(int).tolist() for c in cov.columns}}
            for p, cov in coverage.items()
        },
        "withdrawals_per_month": {
            p: {format_ts(t.to_pydatetime().replace(tzinfo=timezone.utc)): int(v) for t, v in withdrawals[p].items()}
            for p in withdrawals.columns
        },
        "usage": [{**u, "use": use_label(u["feature_set"])} for u in usage],
        "withdrawals": withdrawals_list(ledger, to_us(at_dt, "at")),
        "models_trained_on_withdrawn_users": withdrawn_users_in_models(ledger, runs=runs, now=at_dt),
        "subjects": [subject_impact(ledger, s, runs=runs, privacy=privacy, now=at_dt).to_dict() for s in subjects],
        "dp_source": dp_source,
    }
    json_path = out / "report.json"
    html_path = out / "report.html"
    _atomic_write(json_path, json.dumps(data, indent=2, sort_keys=True))
    _atomic_write(html_path, _html(data, cov_png, wd_png, usage_png))
    return {"html": html_path, "json": json_path}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _table(headers: list[str], rows: list[list[Any]], cls: str = "") -> str:
    return html_table(headers, rows, fmt=lambda c: "–" if c is None else str(c), cls=cls)


def _models(models: list[dict[str, Any]]) -> Abbrev:
    text = ", ".join(f"{m['run_id']} r{m['round']}" + (f" ({m['sha256'][:12]}…)" if m.get("sha256") else "")
                     for m in models)
    return Abbrev(text or "(pass --runs RUN.json to name the models)", 80)


def _dp(dp: dict[str, Any] | None) -> str:
    if not dp:
        return "unknown"
    if dp.get("epsilon") is None:
        return f"none ({dp['mode']})"
    delta = "?" if dp.get("delta") is None else f"{dp['delta']:.1e}"
    return f"ε={dp['epsilon']:.3g}, δ={delta} ({dp['mode']})"


def _subject_html(s: dict[str, Any]) -> str:
    e = html.escape
    now = "; ".join(f"{p}: {', '.join(v) or 'NO CONSENT'}" for p, v in s["scopes_now"].items()) or "no records"
    rows = [[u["run_id"], u["round"], USE_LABELS.get(u["phase"], u["phase"]), u["purpose"],
             Abbrev((u["produced"] or {}).get("sha256") or "–", 16), ", ".join(u["scopes_then"]) or "none",
             "yes" if u["consented_now"] else "NO", _dp(u["dp"]),
             ", ".join(f"r{m['round']}" for m in u["replaced_by_retrain"]) or "nothing"] for u in s["uses"]]
    replace = _models(s["models_to_replace"]).html() if s["models_to_replace"] else "none"
    table = (_table(["run", "round", "use", "purpose", "model", "consent then", "consents now", "DP bound",
                     "retrain replaces"], rows, "wide") if rows else "<p>No run has used this subject's data.</p>")
    return (f"<h3>{e(s['subject'])}</h3><p>Consent at {e(s['at'])}: {e(now)}. A retrain without this subject "
            f"would replace: {replace}.</p>{table}")


def _html(d: dict[str, Any], cov_png: str, wd_png: str, usage_png: str) -> str:
    e = html.escape
    v = d["verify"]
    led = d["ledger"]
    status = ("<p class='ok'>✔ Verified: every record matches its hash chain and every signed head "
              f"({v['n_heads']}) verifies under key <code>{e(v['key_fingerprint'])}</code> ({e(v['key_source'])}).</p>"
              if v["ok"] else
              f"<p class='bad'>✘ TAMPERED: {e(v['reason'])}"
              + (f" — first bad record: seq {v['first_bad_seq']}" if v["first_bad_seq"] is not None else "")
              + (f" (record_id <code>{e(str(v['first_bad_record_id']))}</code>)" if v["first_bad_record_id"] else "")
              + "</p>")
    if v.get("warning"):
        status += f"<p class='bad'>⚠ WARNING: {e(v['warning'])}.</p>"
    cov_rows = [[p] + [c[s] for s in SCOPES] + [c["any_scope"]] for p, c in d["coverage_at"].items()]
    usage_rows = [[u["run_id"], u["round"], u["use"], u["purpose"],
                   Abbrev(u["feature_set"].partition(":")[2] if ":" in u["feature_set"] else u["feature_set"], 48),
                   u["n_users"], ", ".join(f"{k}={n}" for k, n in sorted(u["scope_counts"].items()) if n),
                   u["ledger_size"], Abbrev(u["ledger_root"], 17), u["at"]] for u in d["usage"]]
    wd_rows = [[w["effective_at"], w["subject_id"], w["purpose"], w["action"], ", ".join(w["scopes"]) or "all",
                w["recorded_by"]] for w in d["withdrawals"]]
    gone_rows = [[m["run_id"], m["purpose"], m["withdrawn_users"], m["users_trained_on"], m["from_round"],
                  _models(m["models"])] for m in d["models_trained_on_withdrawn_users"]]
    subjects = "".join(_subject_html(s) for s in d["subjects"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Consent report — {e(led['controller'])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; max-width: 100%; }}
table.wide {{ width: 100%; table-layout: fixed; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; overflow-wrap: anywhere; vertical-align: top; }}
span[title] {{ text-decoration: underline dotted; cursor: help; }}
th {{ background: #f3f3f3; }}
.ok {{ color: #17632a; font-weight: 600; }} .bad {{ color: #b00020; font-weight: 700; }}
img {{ max-width: 100%; }} code {{ font-size: 0.85em; }}
</style></head><body>
<h1>Consent ledger report</h1>
<p>Controller <b>{e(led['controller'])}</b> · generated {e(d['generated_at'])} · state as of {e(d['at'])}</p>
<h2>Integrity</h2>
{status}
{_table(["records", "subjects", "signed head size", "root", "head signed at", "vocabulary"],
        [[led['records'], led['subjects'], led['head']['size'], led['head']['root_hex'], led['head']['timestamp'],
          led['vocab_version']]], "wide")}
<h2>Consent coverage now</h2>
<p>Subjects granting each scope, per purpose, at {e(d['at'])}. "valid consent" counts subjects granting at
least one scope — only they can enter any computation for that purpose.</p>
{_table(["purpose", *SCOPES, "valid consent"], cov_rows)}
<h2>Coverage over time</h2>
<img alt="consent coverage over time" src="data:image/png;base64,{cov_png}">
<h2>Withdrawals</h2>
<img alt="withdrawals per month" src="data:image/png;base64,{wd_png}">
<p>Latest withdrawals and expiries in effect at {e(d['at'])} (newest first):</p>
{_table(["effective (UTC)", "subject", "purpose", "action", "scopes", "recorded by"], wd_rows, "wide")
 if wd_rows else "<p>No withdrawal or expiry is in effect.</p>"}
<h2>Models trained on since-withdrawn users</h2>
<p>Training runs whose rounds used data of subjects who no longer consent to that purpose. Their models
keep what they learnt from those subjects until retrained without them; see docs/COMPLIANCE.md for what the
DP bound does and does not promise. ({e(d.get('dp_source') or '')}.)</p>
{_table(["run", "purpose", "withdrawn users", "users trained on", "from round", "models a retrain replaces"],
        gone_rows, "wide") if gone_rows else "<p>No model was trained on a user who has since withdrawn.</p>"}
{("<h2>Erasure impact per subject</h2>" + subjects) if subjects else ""}
<h2>Usage by run</h2>
<p>Each row is one round of one run that used consented data (training, evaluation, analytics or scoring),
with the ledger head the decision was taken against (re-checkable with an inclusion or consistency proof).
Hover an abbreviated cell for its full text.</p>
{(f'<img alt="usage by run" src="data:image/png;base64,{usage_png}">' if usage_png else "")}
{_table(["run", "round", "use", "purpose", "features", "users", "scopes used (users)", "ledger size",
         "ledger root", "consent at"], usage_rows, "wide")
 if usage_rows else "<p>No run has used data from this node yet.</p>"}
</body></html>
"""
