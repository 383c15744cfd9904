"""``fedretain data ...`` through click's CliRunner: output, JSON and exit codes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedretain.cli import main
from fedretain.schema import EVENT_COLUMN_NAMES

NOW = "2026-01-01T00:00:00"
CDNOW_SAMPLE = Path("/work/shared/data/cdnow/CDNOW_sample.txt")


def make_silo(root: Path, extra_rows: list[str] = ()) -> Path:
    root.mkdir(parents=True)
    rows = ["u1,2025-03-01T10:00:00,view,v1,shoes,0,12.5,short_video",
            "u2,2025-03-02T11:30:00,purchase,p7,shoes,59.9,0,live",
            "u2,2025-03-05T09:00:00,like,v1,shoes,0,0,short_video", *extra_rows]
    (root / "events.csv").write_text("\n".join([",".join(EVENT_COLUMN_NAMES), *rows]) + "\n")
    (root / "users.csv").write_text("user_id,referral,member_tier,city_tier\nu1,organic,gold,2\n")
    (root / "merchant.json").write_text(json.dumps(
        {"merchant_id": "shop_a", "name": "Shop A", "category": "shoes", "data_end": "2025-04-01", "source": "test"}))
    return root


def run(*args: str):
    return CliRunner().invoke(main, ["data", *args], catch_exceptions=False)


def test_check_clean_silo_exits_0(tmp_path):
    silo = make_silo(tmp_path / "shop_a")
    result = run("check", str(silo), "--now", NOW)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "shop_a" in out and "OK" in out and "all 4 rows accepted" in out
    assert "2025-03-01 .. 2025-03-05" in out
    assert "purchase" in out and "Event mix" in out
    assert "1 user(s) in events have no users-file row" in out
    assert not (silo / "quarantine").exists()


def test_check_rejected_rows_exit_1_with_examples_and_quarantine(tmp_path):
    silo = make_silo(tmp_path / "shop_a", ["u3,2025-03-06,purchase,p1,shoes,abc,0,live", "u4,next week,view,,,,,"])
    result = run("check", str(silo), "--now", NOW)
    assert result.exit_code == 1, result.output
    out = result.output
    assert "non-numeric amount" in out and "row 5, 'amount' = 'abc'" in out
    assert "unparseable timestamp" in out and "row 6, 'ts' = 'next week'" in out
    assert "2 row(s) rejected" in out
    assert (silo / "quarantine" / "events.rejected.csv").is_file()


def test_check_json_is_machine_readable(tmp_path):
    silo = make_silo(tmp_path / "shop_a", ["u3,2025-03-06,teleport,,,,,"])
    result = run("check", str(silo), "--now", NOW, "--json", "--quarantine-dir", str(tmp_path / "q"))
    assert result.exit_code == 1
    doc = json.loads(result.output)
    assert doc["ok"] is False and doc["exit_code"] == 1 and doc["merchant"]["merchant_id"] == "shop_a"
    events, users = doc["reports"]
    assert (events["rows_read"], events["rows_accepted"], events["rows_rejected"]) == (4, 3, 1)
    assert events["rejected_by_reason"] == {"unknown event label": 1}
    assert events["problems"][0]["row"] == 5 and events["problems"][0]["field"] == "event"
    assert events["quarantine_path"] == str(tmp_path / "q" / "events.rejected.csv")
    assert events["date_min"] == "2025-03-01T10:00:00"
    assert users["kind"] == "users" and users["rows_accepted"] == 1


def test_check_single_file_with_mapping(tmp_path):
    events = tmp_path / "export.csv"
    events.write_text("cust,time,kind\nc1,1735689600,BUY_NOW\nc2,1735689601,PEEK\n")
    mapping = tmp_path / "m.json"
    mapping.write_text(json.dumps({"columns": {"cust": "user_id", "time": "ts", "kind": "event"},
                                   "events": {"PEEK": "view", "BUY_NOW": "purchase"}}))
    result = run("check", str(events), "--mapping", str(mapping), "--now", NOW, "--json",
                 "--quarantine-dir", str(tmp_path / "q"))
    doc = json.loads(result.output)
    # the purchase has no amount column at all, so it cannot be a valid purchase
    assert result.exit_code == 1
    assert doc["reports"][0]["rejected_by_reason"] == {"purchase/refund amount must be > 0": 1}
    assert doc["reports"][0]["event_counts"] == {"view": 1}
    assert (tmp_path / "q" / "export.rejected.csv").is_file()


@pytest.mark.parametrize("make,needle", [
    (lambda p: p / "nope", "no such file or folder"),
    (lambda p: (p / "e.csv").write_text("user_id,event\nu,view\n") and p / "e.csv", "missing required column(s) ts"),
    (lambda p: (p / "silo").mkdir() or p / "silo", "merchant.json not found"),
])
def test_check_file_level_errors_exit_2(tmp_path, make, needle):
    target = make(tmp_path)
    result = CliRunner().invoke(main, ["data", "check", str(target)])
    assert result.exit_code == 2
    assert needle in result.output and str(target) in result.output
    doc = json.loads(CliRunner().invoke(main, ["data", "check", str(target), "--json"]).output)
    assert doc["ok"] is False and doc["exit_code"] == 2 and needle in doc["error"]


def test_synth_creates_valid_silos(tmp_path):
    out = tmp_path / "silos"
    result = run("synth", "--merchants", "2", "--users", "300", "--seed", "7", "--out", str(out))
    assert result.exit_code == 0, result.output
    silos = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(silos) == 2
    for silo in silos:
        assert silo.name in result.output
        assert (silo / "events.csv").is_file() and (silo / "merchant.json").is_file()


@pytest.mark.skipif(importlib.util.find_spec("fedretain.datasets.cdnow") is None or not CDNOW_SAMPLE.is_file(),
                    reason="fedretain.datasets.cdnow or the CDNOW sample is not available")
def test_import_cdnow_creates_valid_silos(tmp_path):
    out = tmp_path / "cdnow"
    result = run("import-cdnow", str(CDNOW_SAMPLE), "--out", str(out), "--merchants", "2", "--split", "hash")
    assert result.exit_code == 0, result.output
    silos = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(silos) == 2 and all(s.name in result.output for s in silos)


def test_import_cdnow_rejects_unknown_split(tmp_path):
    result = CliRunner().invoke(main, ["data", "import-cdnow", str(tmp_path), "--out", str(tmp_path / "o"),
                                       "--split", "random"])
    assert result.exit_code == 2 and "random" in result.output
