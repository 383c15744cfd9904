"""``fedretain data ...`` through click's CliRunner: output, JSON and exit codes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
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


# --------------------------------------------------------------------------- export shapes and consent ids


LATER = "2027-01-01T00:00:00"  # after the synthetic exports' data_end


@pytest.fixture(scope="module")
def orderlines_silo(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-exports") / "ol"
    result = run("synth", "--shape", "orderlines", "--merchants", "1", "--users", "400", "--seed", "5",
                 "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "orderlines exports" in result.output
    (silo,) = [p for p in out.iterdir() if p.is_dir()]
    return silo


def _copy_silo(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("quarantine"))
    return dst


def test_synth_marketplace_shape_checks_clean(tmp_path):
    out = tmp_path / "mp"
    result = run("synth", "--shape", "marketplace", "--merchants", "1", "--users", "300", "--out", str(out))
    assert result.exit_code == 0, result.output
    (silo,) = [p for p in out.iterdir() if p.is_dir()]
    for name in ("orders.csv", "order_items.csv", "order_payments.csv", "customers.csv", "mapping.json"):
        assert (silo / name).is_file()
    check = run("check", str(silo), "--now", LATER)
    assert check.exit_code == 0, check.output
    assert "not_completed" in check.output and "order_payments.csv" in check.output


def test_check_orderlines_export_shows_every_file_and_consent(orderlines_silo):
    result = run("check", str(orderlines_silo), "--now", LATER)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "order_lines.csv" in out and "customers.csv" in out
    assert "fee_lines" in out and "guest_checkout" in out and "read = accepted + skipped + quarantined" in out
    assert "'Staff'" in out  # the shop's tier that the value map does not know
    assert "Consent file:" in out and "hint:" not in out
    doc = json.loads(run("check", str(orderlines_silo), "--now", LATER, "--json").output)
    assert all(s["conserved"] for s in doc["export"]["sources"])
    lines = doc["export"]["sources"][0]
    assert lines["rows_read"] == lines["rows_accepted"] + lines["rows_skipped"] + lines["rows_quarantined"]
    assert doc["consent"]["in_both"] > 0.9 * doc["consent"]["users"] and doc["consent"]["hint"] is None


def test_check_quarantined_export_lines_exit_1(orderlines_silo, tmp_path):
    silo = _copy_silo(orderlines_silo, tmp_path / "ol")
    path = silo / "order_lines.csv"
    text = path.read_text().splitlines()
    first = text[1].split(",")
    first[2] = "lots"  # Quantity
    path.write_text("\n".join([*text, ",".join(first)]) + "\n")
    result = run("check", str(silo), "--now", LATER)
    assert result.exit_code == 1, result.output
    assert "Quarantined rows of order_lines.csv" in result.output
    assert f"row {len(text) + 1}, 'Quantity' = 'lots'" in result.output
    assert (silo / "quarantine" / "order_lines.csv.rejected.csv").is_file()


def test_check_reports_float_printed_ids_against_consent(orderlines_silo, tmp_path):
    """The issue's case: events say 12471.0, the consent file says 12471 -> every customer looks unconsented."""
    silo = _copy_silo(orderlines_silo, tmp_path / "ol")
    mapping = json.loads((silo / "mapping.json").read_text())
    mapping["ids"]["integer_floats"] = False
    (silo / "mapping.json").write_text(json.dumps(mapping))
    result = run("check", str(silo), "--now", LATER)
    out = result.output
    assert "hint:" in out
    assert "float-printed ids" in out and '"integer_floats": true' in out
    assert ".0' vs '" in out
    doc = json.loads(run("check", str(silo), "--now", LATER, "--json").output)
    consent = doc["consent"]
    assert consent["in_both"] == 0 and consent["users_without_consent"] == consent["users"] > 0
    assert all(a == b + ".0" for a, b in consent["examples"])


@pytest.mark.parametrize("subjects, what, setting", [
    (["U1", "U2"], "letter case", '"case"'),
    ([" u1", "u2 "], "whitespace", '"trim": true'),
])
def test_check_reports_differently_formatted_consent_ids(tmp_path, subjects, what, setting):
    silo = make_silo(tmp_path / "shop_a")
    pd.DataFrame({"subject_id": subjects, "purpose": "retention_model"}).to_csv(silo / "consent.csv", index=False)
    result = run("check", str(silo), "--now", NOW)
    assert result.exit_code == 0, result.output  # a consent mismatch is reported, the data is still valid
    assert "0 of 2 user(s) with events appear in it" in result.output
    assert "hint:" in result.output and what in result.output and setting in result.output


def test_check_zero_padded_ids_and_partial_overlap(tmp_path):
    silo = make_silo(tmp_path / "shop_a")
    events = (silo / "events.csv").read_text().replace("u1,", "42,").replace("u2,", "7,")
    (silo / "events.csv").write_text(events)
    pd.DataFrame({"subject_id": ["00042", "00007", "00099"]}).to_csv(silo / "consent.csv", index=False)
    doc = json.loads(run("check", str(silo), "--now", NOW, "--json").output)
    assert doc["consent"]["in_both"] == 0 and doc["consent"]["subjects_without_events"] == 3
    assert "zero padding" in doc["consent"]["hint"] and "strip_leading_zeros" in doc["consent"]["hint"]
    pd.DataFrame({"subject_id": ["42", "8"]}).to_csv(silo / "consent.csv", index=False)
    doc = json.loads(run("check", str(silo), "--now", NOW, "--json").output)
    assert doc["consent"]["in_both"] == 1 and doc["consent"]["users_without_consent"] == 1
    assert doc["consent"]["hint"] is None  # '7' vs '8' is a different person, not a format
