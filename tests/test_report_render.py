"""The demo's report.html as a merchant sees it: explained metrics, money in the shop's currency, and a page
that fits a 1,400 px browser window (checked in headless Chromium when it is installed).

The report is built from a small fixture run (a run record, a summary, scores, an LTV check and the
value-of-joining rows in the shapes ``run_demo`` produces), not from a demo, so the test takes seconds.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedretain.joining import JoiningResult
from fedretain.ltv import holdout_check
from fedretain.report import money, write_demo_report
from fedretain.scoring import SCORE_COLUMNS

WIDTH = 1400
LONG = "merchant_" + "x" * 180  # one unbreakable name: the kind of string that pushed tables off-screen


def _fixture_run(tmp_path: Path, currency: str) -> tuple[Path, dict]:
    rng = np.random.default_rng(0)
    merchants = [LONG, "merchant_01", "merchant_02"]
    rounds = [{"round": r, "evaluate": {"auc": 0.80 + 0.02 * r, "log_loss": 0.6 - 0.05 * r, "ece": 0.1 / r,
                                        "ltv_spearman": 0.5 + 0.03 * r},
               "train": {"train_loss": 1.4 - 0.2 * r}} for r in (1, 2, 3)]
    record = {"run_id": "run-" + "0123456789abcdef" * 8, "status": "completed", "rounds": rounds}
    summary = {
        "merchants": merchants,
        "federated": {"auc": 0.8212, "log_loss": 0.4944, "brier": 0.1612, "ece": 0.0509, "ltv_spearman": 0.5642,
                      "auc_low": 0.79, "auc_high": 0.85},
        "centralized": {"auc": 0.8155, "log_loss": 0.4962, "brier": 0.1635, "ece": 0.0595, "ltv_spearman": 0.5414,
                        "auc_low": 0.78, "auc_high": 0.84},
        "consent_coverage": {m: {"candidates": 1899, "consented": 1323, "used": 1083} for m in merchants},
        "per_merchant_auc": {m: {"auc": 0.83, "num_examples": 340} for m in merchants},
    }
    n = 400
    churn = rng.random(n)
    value = rng.gamma(2.0, 60.0, n)
    segments = np.array(["high-value at risk", "low-value at risk", "loyal", "active", "new"])[rng.integers(0, 5, n)]
    scores = pd.DataFrame({"rank": np.arange(1, n + 1), "user_id": [f"u{i:06d}" for i in range(n)],
                           "churn_probability": churn, "return_probability": 1 - churn,
                           "predicted_ltv": value * (1 - churn), "value_if_retained": value,
                           "expected_value_at_risk": churn * value, "past_spend": rng.gamma(2.0, 40.0, n),
                           "segment": segments})[list(SCORE_COLUMNS)]
    scores.loc[0, ["user_id", "value_if_retained"]] = ["customer-" + "9" * 150, 1234.5]
    raw = rng.gamma(1.0, 1.0, 600)
    actual = raw * 30.0 * rng.lognormal(0, 0.3, 600) * (rng.random(600) < 0.4)
    ltv = holdout_check(raw[:400], actual[:400], raw[400:], actual[400:], 30.0, currency)
    assert ltv is not None
    joining = [JoiningResult(m, 800, 200, {"local": 0.55, "global": 0.50, "personalised": 0.49},
                             {"local": 0.74, "global": 0.81, "personalised": 0.82}, "personalised", 0.06, 0.03, 0.09
                             ).as_dict() for m in merchants]
    joining[2] = JoiningResult("merchant_02", 90, 20, {"local": 0.40, "global": 0.45, "personalised": 0.44},
                               dict.fromkeys(("local", "global", "personalised"), float("nan")),
                               "personalised", -0.04, -0.10, 0.02).as_dict()
    joining.append(JoiningResult("seller_tiny", 12, 5, {"local": 0.01, "global": 0.02, "personalised": 0.02},
                                 dict.fromkeys(("local", "global", "personalised"), float("nan")),
                                 "global", -0.01, -0.02, -0.005, test_positives=0).as_dict())
    path = write_demo_report(tmp_path / "report.html", record, summary, scores, currency=currency, horizon_days=30.0,
                             calibrated=True, ltv=ltv, joining=joining)
    return path, ltv


@pytest.fixture(scope="module")
def report_eur(tmp_path_factory) -> tuple[Path, float]:
    path, ltv = _fixture_run(tmp_path_factory.mktemp("report-eur"), "EUR")
    return path, float(ltv["ratio"])


def test_report_explains_metrics_and_shows_money_in_the_shops_currency(report_eur):
    path, ltv_ratio = report_eur
    page = path.read_text(encoding="utf-8")
    for term in ("AUC", "log loss", "Brier", "ECE", "LTV ρ", "normalized Gini", "mean-calibration ratio"):
        assert f"<dt>{term}</dt>" in page, term  # the glossary explains every metric shown
    assert 'title="How well the model ranks customers' in page  # and each table heading has it as a tooltip
    assert "Why the federated model has two AUCs" in page and "0.8212" in page and "0.8600" in page
    assert "Federated vs centralized" in page
    assert "0.790 – 0.850" in page  # the pooled AUC's 95 % interval
    assert "value if retained (EUR)" in page and "1,234.50" in page
    assert re.search(r"\d,?\d*\.\d\d EUR", page)  # LTV check: money with 2 decimals and the currency
    assert "next 30 days" in page
    assert f"{ltv_ratio:.2f}× the mean actual spend" in page  # the LTV level judged against the ±15 % target
    assert "What a merchant gains by joining" in page and "+0.0300 – +0.0900" in page
    assert "joining helps (significant)" in page and "training alone did better (not significant)" in page
    assert "undecided: none of the held-out customers came back (training alone predicted fewer returns)" in page
    assert (path.parent / "ltv_deciles.png").stat().st_size > 1000


def test_report_says_when_merchant_json_sets_no_currency(tmp_path):
    path, ltv = _fixture_run(tmp_path, "")
    page = path.read_text(encoding="utf-8")
    assert "no &quot;currency&quot; in merchant.json" in page
    assert money(ltv["mean_actual"]) in page and money(1234.5) == "1,234.50"
    assert money(float("nan"), "EUR") == "–" and money(None) == "–" and money(2.005, "EUR").endswith(" EUR")


# -- the page in a real browser -----------------------------------------------------------------------
def _chromium() -> str:
    for name in (os.environ.get("FEDRETAIN_CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return str(shutil.which(name))
    pytest.skip("headless Chromium not installed (apt-get install chromium, or set FEDRETAIN_CHROMIUM): "
                "the report's 1400 px layout check cannot run here")


MEASURE = ("<script>window.addEventListener('load',function(){var d=document.createElement('div');"
           "d.id='measured-scroll-width';d.textContent=String(document.documentElement.scrollWidth);"
           "document.body.appendChild(d);});</script>")


def _scroll_width(html_path: Path, tmp_path: Path) -> int:
    """document.documentElement.scrollWidth of the page in headless Chromium with a 1400 px wide window."""
    page = tmp_path / ("measured-" + html_path.name)
    page.write_text(html_path.read_text(encoding="utf-8").replace("</body>", MEASURE + "</body>"), encoding="utf-8")
    out = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--window-size={WIDTH},3000",
         "--hide-scrollbars", "--virtual-time-budget=5000", f"--user-data-dir={tmp_path / 'chromium-profile'}",
         "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120)
    m = re.search(r'id="measured-scroll-width">(\d+)<', out.stdout)
    assert m, f"Chromium did not run the page's measuring script (rc {out.returncode}): {out.stderr[-800:]}"
    return int(m.group(1))


def test_a_too_wide_page_is_caught_by_the_measurement(tmp_path):
    """The check below can fail: one unbreakable 3,000 px row makes the page scroll sideways."""
    wide = tmp_path / "wide.html"
    wide.write_text("<!doctype html><html><body><table><tr><td><div style='width:3000px'>x</div></td></tr></table>"
                    "</body></html>", encoding="utf-8")
    assert _scroll_width(wide, tmp_path) > WIDTH


def test_demo_report_has_no_horizontal_overflow_at_1400px(report_eur, tmp_path):
    assert _scroll_width(report_eur[0], tmp_path) <= WIDTH
