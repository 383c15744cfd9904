"""The consent report fits a 1400 px browser window however long the usage log's strings are (issue 13).

Measured in a real browser: headless Chromium renders the page and the test reads
``document.documentElement.scrollWidth``. Skipped, saying why, where no Chromium is installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedretain.cli.consent import consent
from fedretain.consent.ledger import ConsentLedger

PURPOSE = "retention_modeling"
BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def _run(*args: object) -> None:
    res = CliRunner().invoke(consent, [str(a) for a in args])
    assert res.exit_code == 0, res.output


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("layout")
    db = tmp / "consent.sqlite"
    _run("init", "--controller", "shop1", "--db", db)
    users = [f"user-{i:04d}" for i in range(3)]
    for u in users:
        _run("grant", u, "--purpose", PURPOSE, "--scopes", "purchase_history", "--at", "2024-01-01", "--db", db)
    long_features = ",".join(f"an_unusually_long_feature_name_{i}_over_a_90_day_window" for i in range(60))
    with ConsentLedger.open(db, key_path=db.with_suffix(".key.pem")) as led:
        h = led.head()
        for use, run in (("train", "run-2024-02-01T00-00-00-" + "f" * 40), ("analytics-query", "q1"),
                         ("score", "s1"), ("evaluate", "run-2024-02-01T00-00-00-" + "f" * 40)):
            led.record_usage(run, 1, PURPOSE, f"{use}:{long_features}", {"purchase_history": 3}, 3, h.size,
                             h.root_hex, "2024-02-01", users)
    _run("withdraw", users[0], "--purpose", PURPOSE, "--db", db)
    _run("report", "--out", tmp / "rep", "--db", db, "--subject", users[0])
    return tmp / "rep" / "report.html"


def test_usage_rows_are_labelled_and_long_strings_abbreviated(report):
    page = report.read_text(encoding="utf-8")
    for label in ("training", "analytics", "scoring", "evaluation"):
        assert f"<td>{label}</td>" in page
    assert 'title="an_unusually_long_feature_name_0_' in page  # whole text kept on hover
    assert "table-layout: fixed" in page and "overflow-wrap: anywhere" in page


@pytest.mark.skipif(BROWSER is None, reason="no chromium binary on PATH: the report's width in a real browser "
                                          "cannot be measured here (apt-get install chromium to run this check)")
def test_report_has_no_horizontal_overflow_at_1400px(report, tmp_path):
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text(encoding="utf-8") + "<script>document.body.setAttribute('data-scroll-width', "
                     "document.documentElement.scrollWidth)</script>", encoding="utf-8")
    res = subprocess.run([str(BROWSER), "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,2000",
                          "--virtual-time-budget=3000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120)
    m = re.search(r'data-scroll-width="(\d+)"', res.stdout)
    assert m, f"the browser did not render the page: {res.stderr[-500:]}"
    assert int(m.group(1)) <= 1400
