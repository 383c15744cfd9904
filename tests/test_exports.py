"""Real export shapes in by mapping alone: raw files -> load_silo -> features, rows accounted for, truth recovered."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from fedretain.consent.vocab import SCOPES
from fedretain.datasets.cdnow import read_cdnow, to_events, zero_value_rows
from fedretain.exports import MappingError, example_mapping
from fedretain.exports.runner import ExportSilo
from fedretain.features import compute_features
from fedretain.ingest import load_silo
from fedretain.synth_exports import generate_exports

NOW = "2027-01-01"
CDNOW_DIR = Path(os.environ.get("FEDRETAIN_CDNOW_DIR") or Path(__file__).resolve().parents[2] / "shared/data/cdnow")
CDNOW_MASTER = CDNOW_DIR / "CDNOW_master.txt"


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return {shape: generate_exports(root / shape, shape, n_merchants=1, n_users=600, seed=3)[0]
            for shape in ("orderlines", "marketplace")}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("quarantine"))
    return dst


def _conserved(silo: ExportSilo) -> None:
    for s in silo.export_report.sources:
        assert s.rows_read == s.rows_accepted + s.rows_skipped + s.rows_quarantined, s.to_dict()
        assert s.conserved
        n_lines = len(pd.read_csv(silo.path / s.file, dtype=str, keep_default_na=False))
        assert s.rows_read == n_lines, s.file


def _features(silo) -> pd.DataFrame:
    ids = pd.Index(sorted(silo.users["user_id"]), name="user_id").astype("string")
    gated = SimpleNamespace(events=silo.events, users=silo.users,
                            grants=pd.DataFrame(True, index=ids, columns=list(SCOPES)))
    return compute_features(gated, pd.Timestamp(silo.merchant["data_end"]) + pd.Timedelta(days=1),
                            ["frequency", "monetary_total", "refund_rate", "member_tier_level"])


def _check_truth(silo, truth: pd.DataFrame, refunds: bool) -> None:
    truth = truth.assign(user_id=truth["user_id"].astype(str)).set_index("user_id")
    ev = silo.events
    buys = ev[ev["event"] == "purchase"].groupby("user_id", observed=True)["amount"].agg(["size", "sum"])
    buys.index = buys.index.astype(str)
    got = buys.reindex(truth.index).fillna(0)
    np.testing.assert_array_equal(got["size"].to_numpy(), truth["purchases"].to_numpy())
    np.testing.assert_allclose(got["sum"].to_numpy(), truth["spend"].to_numpy(), rtol=0, atol=1e-6)
    assert len(buys) == (truth["purchases"] > 0).sum()  # nobody extra (fees, guests) became a buyer
    f = _features(silo)
    f.index = f.index.astype(str)
    np.testing.assert_allclose(f.loc[truth.index, "frequency"], np.log1p(truth["purchases"]), atol=1e-9)
    np.testing.assert_allclose(f.loc[truth.index, "monetary_total"], np.log1p(truth["spend"]), atol=1e-6)
    n_refunds = int((ev["event"] == "refund").sum())
    if refunds:
        assert n_refunds == truth["refunds"].sum() > 0
        np.testing.assert_allclose(ev.loc[ev["event"] == "refund", "amount"].sum(), truth["refunded"].sum(), atol=1e-6)
    else:
        assert n_refunds == 0


def test_orderlines_export_through_mapping_alone(exports):
    silo = load_silo(exports["orderlines"], now=NOW)
    assert isinstance(silo, ExportSilo)
    assert silo.report.rows_rejected == 0
    _conserved(silo)
    lines = silo.export_report.sources[0]
    raw = pd.read_csv(silo.path / "order_lines.csv", dtype=str, keep_default_na=False)
    assert lines.skipped_by_rule["fee_lines"] == raw["StockCode"].isin(["POST", "M", "BANK CHARGES"]).sum()
    assert lines.skipped_by_rule["guest_checkout"] == (raw["CustomerID"] == "").sum() > 0
    assert lines.rows_quarantined == 0
    # customer ids printed as floats became the shop's ids, the ones the consent file uses
    assert raw["CustomerID"].str.endswith(".0").any()
    assert not silo.events["user_id"].str.contains(".", regex=False).any()
    _check_truth(silo, pd.read_csv(silo.path / "truth.csv"), refunds=True)
    # value maps: the shop's tier names, an unknown one becomes missing (the user row is kept)
    customers = pd.read_csv(silo.path / "customers.csv", dtype=str).set_index("CustomerID")
    users = silo.users.set_index("user_id")
    gold = customers.index[customers["Tier"] == "VIP Gold"]
    assert (users.loc[gold, "member_tier"] == "gold").all() and len(gold)
    staff = customers.index[customers["Tier"] == "Staff"]
    assert len(staff) and users.loc[staff, "member_tier"].isna().all()
    assert silo.export_report.unmapped_values["users"]["member_tier"] == {"Staff": len(staff)}
    assert silo.users_report.rows_rejected == 0 and len(silo.users) >= len(customers)


def test_marketplace_export_through_mapping_alone(exports):
    silo = load_silo(exports["marketplace"], now=NOW)
    _conserved(silo)
    by_file = {s.file: s for s in silo.export_report.sources}
    orders = pd.read_csv(silo.path / "orders.csv", dtype=str)
    cancelled = orders.loc[orders["order_status"].isin(["canceled", "unavailable"]), "order_id"]
    assert by_file["orders.csv"].skipped_by_rule == {"not_completed": len(cancelled)} and len(cancelled)
    for name in ("order_items.csv", "order_payments.csv"):  # their lines follow the order
        rows = pd.read_csv(silo.path / name, dtype=str)
        assert by_file[name].skipped_by_rule == {"not_completed": int(rows["order_id"].isin(cancelled).sum())}
        assert by_file[name].rows_quarantined == 0
    assert silo.report.rows_rejected == 0
    # one person, many per-order customer ids: events are keyed by the person id
    _check_truth(silo, pd.read_csv(silo.path / "truth.csv"), refunds=False)
    # users: one row per person from the per-order customer rows, the state mapped to a city tier
    customers = pd.read_csv(silo.path / "customers.csv", dtype=str)
    assert by_file["customers.csv"].rows_accepted == len(customers)
    assert silo.users_report.rows_rejected == 0
    assert silo.users_report.rows_read == customers["customer_unique_id"].nunique()
    first = customers.groupby("customer_unique_id", sort=False)["customer_state"].first()
    users = silo.users.set_index("user_id")["city_tier"]
    sp = first.index[first == "SP"]
    assert len(sp) and (users.loc[sp] == 1).all()
    ba = first.index[first == "BA"]
    assert len(ba) and users.loc[ba].isna().all()
    n_ba = int((customers["customer_state"] == "BA").sum())
    assert silo.export_report.unmapped_values["users"]["city_tier"] == {"BA": n_ba}


def test_join_unmatched_skip_and_keep_rules(exports, tmp_path):
    silo_dir = _copy(exports["marketplace"], tmp_path / "mp")
    orders = pd.read_csv(silo_dir / "orders.csv", dtype=str, keep_default_na=False)
    live = orders.index[orders["order_status"] == "delivered"][:2]
    orders.loc[live, "customer_id"] = "guest"
    orders.to_csv(silo_dir / "orders.csv", index=False)
    mapping = json.loads((silo_dir / "mapping.json").read_text())
    mapping["events"]["join"][0]["unmatched"] = "skip"
    (silo_dir / "mapping.json").write_text(json.dumps(mapping))
    silo = load_silo(silo_dir, now=NOW)
    _conserved(silo)
    by_file = {s.file: s for s in silo.export_report.sources}
    assert by_file["orders.csv"].skipped_by_rule["unmatched customers"] == 2
    assert by_file["orders.csv"].rows_quarantined == 0
    mapping["events"]["join"][0]["unmatched"] = "keep"  # kept: the user id is then empty -> rejected by validation
    (silo_dir / "mapping.json").write_text(json.dumps(mapping))
    silo = load_silo(silo_dir, now=NOW)
    _conserved(silo)
    reasons = {s.file: s.quarantined_by_reason for s in silo.export_report.sources}
    assert sum(v for k, v in reasons["orders.csv"].items() if k.startswith("empty user_id")) == 2


def test_cdnow_raw_file_through_mapping_alone(tmp_path):
    if not CDNOW_MASTER.is_file():
        pytest.skip(f"CDNOW master file not found at {CDNOW_MASTER} (set FEDRETAIN_CDNOW_DIR)")
    silo_dir = tmp_path / "cdnow"
    silo_dir.mkdir()
    (silo_dir / CDNOW_MASTER.name).symlink_to(CDNOW_MASTER)
    (silo_dir / "mapping.json").write_text(json.dumps(example_mapping("cdnow")))
    (silo_dir / "merchant.json").write_text(json.dumps({"merchant_id": "cdnow", "data_end": "1998-06-30"}))
    silo = load_silo(silo_dir, now=NOW)
    raw = read_cdnow(CDNOW_MASTER)
    events, _ = to_events(raw)
    (src,) = silo.export_report.sources
    assert src.rows_read == len(raw) == src.rows_accepted + src.rows_skipped
    assert src.skipped_by_rule == {"zero_value": len(zero_value_rows(raw))}
    assert len(silo.events) == len(events) and silo.report.rows_rejected == 0
    ours = silo.events.groupby("user_id")["amount"].sum().sort_index()
    theirs = events.groupby("user_id")["amount"].sum().sort_index()
    pd.testing.assert_index_equal(ours.index.astype(str), theirs.index.astype(str))
    np.testing.assert_allclose(ours.to_numpy(), theirs.to_numpy(), atol=1e-9)


def test_bad_lines_are_quarantined_by_line_and_the_rest_counted(exports, tmp_path):
    silo_dir = _copy(exports["orderlines"], tmp_path / "ol")
    path = silo_dir / "order_lines.csv"
    raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    base = raw.iloc[0].to_dict()
    bad = [dict(base, InvoiceNo="900001", Quantity="two"),  # not a number
           dict(base, InvoiceNo="900002", InvoiceDate="31/31/2026 10:00"),  # not the declared format
           dict(base, InvoiceNo="900003", InvoiceDate="01/05/2031 10:00"),  # in the future: rejected by validation
           dict(base, InvoiceNo="900003", StockCode="22423", InvoiceDate="01/05/2031 10:00")]
    pd.concat([raw, pd.DataFrame(bad)], ignore_index=True).to_csv(path, index=False)
    silo = load_silo(silo_dir, now=NOW)
    _conserved(silo)
    lines = silo.export_report.sources[0]
    n = len(raw)
    assert lines.quarantined_by_reason["not a number"] == 1
    assert sum(v for k, v in lines.quarantined_by_reason.items() if k.startswith("unparseable timestamp")) == 1
    future = [k for k in lines.quarantined_by_reason if k.startswith("future timestamp")]
    assert future and lines.quarantined_by_reason[future[0]] == 2  # both lines of the rejected invoice
    by_row = {e["row"]: e for e in lines.examples}
    assert by_row[n + 2]["field"] == "Quantity" and by_row[n + 2]["value"] == "two"  # header is row 1
    assert by_row[n + 3]["field"] == "InvoiceDate"
    q = pd.read_csv(lines.quarantine_path, dtype=str)
    assert sorted(q["_row"].astype(int)) == [n + 2, n + 3, n + 4, n + 5]
    assert silo.report.rows_rejected == 1  # the future invoice, one event made of two lines
    traced = pd.read_csv(silo.report.quarantine_path, dtype=str)
    assert traced["source_rows"].tolist() == [f"order_lines.csv rows {n + 4}, {n + 5}"]


def test_marketplace_orphans_and_missing_customers_are_quarantined(exports, tmp_path):
    silo_dir = _copy(exports["marketplace"], tmp_path / "mp")
    pay = pd.read_csv(silo_dir / "order_payments.csv", dtype=str)
    orphan = dict(pay.iloc[0].to_dict(), order_id="ffff" * 8)
    pd.concat([pay, pd.DataFrame([orphan])]).to_csv(silo_dir / "order_payments.csv", index=False)
    orders = pd.read_csv(silo_dir / "orders.csv", dtype=str, keep_default_na=False)
    live = orders.index[orders["order_status"] == "delivered"][0]
    lost_order = orders.loc[live, "order_id"]
    orders.loc[live, "customer_id"] = "not-a-customer"
    orders.to_csv(silo_dir / "orders.csv", index=False)
    customers = pd.read_csv(silo_dir / "customers.csv", dtype=str)
    other = orders.index[orders["order_status"] == "delivered"][1]
    twice = dict(customers.set_index("customer_id").loc[orders.loc[other, "customer_id"]].to_dict(),
                 customer_id=orders.loc[other, "customer_id"], customer_unique_id="someone-else")
    pd.concat([customers, pd.DataFrame([twice])]).to_csv(silo_dir / "customers.csv", index=False)
    silo = load_silo(silo_dir, now=NOW)
    _conserved(silo)
    by_file = {s.file: s for s in silo.export_report.sources}
    assert by_file["order_payments.csv"].quarantined_by_reason["no row in orders.csv with this order_id"] == 1
    assert by_file["orders.csv"].quarantined_by_reason == {"no row in customers.csv with this customer_id": 1,
                                                           "several rows of customers.csv have this customer_id": 1}
    assert by_file["customers.csv"].quarantined_by_reason == {"duplicate join key in customers.csv": 2}
    items = pd.read_csv(silo_dir / "order_items.csv", dtype=str)
    lost = items["order_id"].isin([lost_order, orders.loc[other, "order_id"]])
    assert by_file["order_items.csv"].rows_quarantined == int(lost.sum()) > 1


def test_user_attribute_reject_rule_keeps_the_user(exports, tmp_path):
    silo_dir = _copy(exports["orderlines"], tmp_path / "ol")
    mapping = json.loads((silo_dir / "mapping.json").read_text())
    mapping["users"]["values"]["member_tier"]["unknown"] = "reject"
    (silo_dir / "mapping.json").write_text(json.dumps(mapping))
    silo = load_silo(silo_dir, now=NOW)
    customers = pd.read_csv(silo_dir / "customers.csv", dtype=str)
    staff = customers[customers["Tier"] == "Staff"]
    assert len(silo.export_report.rejected_values) == len(staff) > 0
    assert {r["value"] for r in silo.export_report.rejected_values} == {"Staff"}
    assert not silo.export_report.ok
    users = silo.users.set_index("user_id")
    assert users.loc[staff["CustomerID"], "member_tier"].isna().all()  # rows kept, value missing
    assert silo.users_report.rows_rejected == 0


def test_toml_mapping_and_mapped_file_names(exports, tmp_path):
    silo_dir = _copy(exports["orderlines"], tmp_path / "ol")
    (silo_dir / "order_lines.csv").rename(silo_dir / "Online Retail.csv")
    (silo_dir / "mapping.json").unlink()
    (silo_dir / "mapping.toml").write_text(
        'version = 2\ntimestamp_format = "%m/%d/%Y %H:%M"\n'
        '[sources.lines]\nfile = "Online Retail.csv"\n'
        '[events]\nfrom = "lines"\n'
        '[events.skip]\nguests = "is_empty(CustomerID)"\nfees = "StockCode in (\'POST\', \'M\', \'BANK CHARGES\')"\n'
        '[events.derive]\nline = "`Quantity` * `UnitPrice`"\n'
        '[events.fields]\nuser_id = "CustomerID"\nts = "InvoiceDate"\namount = "line"\n'
        'event = "\'refund\' if matches(InvoiceNo, \'C[0-9]+\') else \'purchase\'"\n'
        '[events.group]\nby = ["InvoiceNo"]\nsum = ["amount"]\n')
    silo = load_silo(silo_dir, now=NOW)
    _conserved(silo)
    _check_truth(silo, pd.read_csv(silo_dir / "truth.csv"), refunds=True)


@pytest.mark.parametrize("change, message", [
    (lambda m: m["events"]["join"][0].update(on="ordr_id"),
     "events.join[0].on: unknown column 'ordr_id'"),
    (lambda m: m["events"]["join"][0].update(right_on="cust"),
     "events.join[0].right_on: unknown column 'cust' in customers.csv"),
    (lambda m: m["events"]["aggregate"][0]["sum"].update(paid="paymnt_value"),
     "events.aggregate[0].sum.paid: unknown column 'paymnt_value'"),
    (lambda m: m["events"]["fields"].update(amount="__import__('os').system('true')"),
     "events.fields.amount: in"),
    (lambda m: m["events"]["skip"].update(x="open('/etc/passwd')"), "events.skip.x: in"),
    (lambda m: m["events"]["fields"].update(colour="'red'"), "events.fields.colour: not a events field"),
    (lambda m: m["events"].update(groop={}), "events.groop: unknown key"),
    (lambda m: m["sources"]["orders"].update(file="../orders.csv"), "sources.orders.file: must be a file name"),
    (lambda m: m["sources"]["orders"].update(file="ordrs.csv"), "sources.orders.file: 'ordrs.csv' not found"),
    (lambda m: m["events"]["fields"].pop("ts"), "events.fields: missing 'ts'"),
    (lambda m: m["events"].update(values={"channel": {"map": {"App": "tv"}}}),
     "events.values.channel.map.App: maps to 'tv'"),
    (lambda m: m["events"]["aggregate"][1].update(source="orders"), "events.aggregate[1]: source 'orders' already"),
    (lambda m: m.update(version=3), "'version' must be 1 or 2"),
])
def test_mapping_errors_name_the_key(exports, tmp_path, change, message):
    silo_dir = _copy(exports["marketplace"], tmp_path / "mp")
    mapping = json.loads((silo_dir / "mapping.json").read_text())
    change(mapping)
    (silo_dir / "mapping.json").write_text(json.dumps(mapping))
    with pytest.raises(Exception) as info:
        load_silo(silo_dir, now=NOW)
    assert info.type.__name__ in ("MappingError", "IngestError")
    assert message in str(info.value), str(info.value)
    assert str(silo_dir / "mapping.json") in str(info.value)


def test_v2_mapping_refused_for_a_single_file(exports):
    from fedretain.ingest import read_events

    with pytest.raises(Exception, match="version 2 mapping describes a whole silo"):
        read_events(exports["orderlines"] / "order_lines.csv", mapping=example_mapping("orderlines"))
    with pytest.raises(ValueError, match="unknown example mapping"):
        example_mapping("nope")
    with pytest.raises(MappingError, match="version: must be 2"):
        from fedretain.exports import parse_spec

        parse_spec({"version": 1, "sources": {}, "events": {}})


def test_blank_ragged_and_duplicate_lines(exports, tmp_path):
    silo_dir = _copy(exports["orderlines"], tmp_path / "ol")
    path = silo_dir / "order_lines.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1], "", lines[1], *lines[2:]]) + "\n")
    mapping = json.loads((silo_dir / "mapping.json").read_text())
    mapping["sources"]["lines"]["skip_duplicate_rows"] = True
    (silo_dir / "mapping.json").write_text(json.dumps(mapping))
    silo = load_silo(silo_dir, now=NOW)
    src = silo.export_report.sources[0]
    assert src.rows_read == len(lines) + 1 and src.conserved
    assert src.skipped_by_rule["blank_row"] == 1 and src.skipped_by_rule["duplicate_row"] == 1
    _check_truth(silo, pd.read_csv(silo_dir / "truth.csv"), refunds=True)  # the copy was not summed in
    path.write_text("\n".join([*lines, lines[1] + ",extra"]) + "\n")
    with pytest.raises(MappingError, match=r"order_lines.csv: malformed file: .*Expected 7 fields in line"):
        load_silo(silo_dir, now=NOW)


def test_expression_failing_on_data_is_a_mapping_error(exports, tmp_path):
    silo_dir = _copy(exports["orderlines"], tmp_path / "ol")
    mapping = json.loads((silo_dir / "mapping.json").read_text())
    mapping["events"]["derive"]["line_amount"] = "Quantity * 'many'"
    (silo_dir / "mapping.json").write_text(json.dumps(mapping))
    with pytest.raises(MappingError, match=r"events: an expression cannot be evaluated: in \"Quantity \* 'many'\""):
        load_silo(silo_dir, now=NOW)


def test_empty_files_and_an_empty_lookup(exports, tmp_path):
    silo_dir = _copy(exports["marketplace"], tmp_path / "mp")
    for name in ("order_items.csv", "order_payments.csv", "customers.csv"):
        header = (silo_dir / name).read_text().splitlines()[0]
        (silo_dir / name).write_text(header + "\n")
    silo = load_silo(silo_dir, now=NOW)
    _conserved(silo)
    orders = {s.file: s for s in silo.export_report.sources}["orders.csv"]
    assert orders.rows_accepted == 0 and orders.rows_read == orders.rows_skipped + orders.rows_quarantined
    assert orders.quarantined_by_reason == {"no row in customers.csv with this customer_id": orders.rows_quarantined}
    assert len(silo.events) == 0 and len(silo.users) == 0


NASTY = ["", "abc", "-5", "1e308", "nan", "inf", "C536999", " 12.0 ", "12/31/2099 10:00", "0", "POST", "VIP Gold",
         "13/45/2026 99:99", "1,5", "😀", "None"]


@pytest.fixture(scope="module")
def tiny_orderlines(tmp_path_factory):
    return generate_exports(tmp_path_factory.mktemp("tiny") / "ol", "orderlines", n_merchants=1, n_users=40,
                            seed=11)[0]


def test_any_corruption_keeps_every_row_accounted_for(tiny_orderlines, tmp_path_factory):
    """Whatever a cell holds, no traceback: each line is accepted, skipped by a rule or quarantined."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    raw = pd.read_csv(tiny_orderlines / "order_lines.csv", dtype=str, keep_default_na=False)
    cells = st.tuples(st.integers(0, len(raw) - 1), st.sampled_from(list(raw.columns)), st.sampled_from(NASTY))

    @hypothesis.settings(max_examples=10, deadline=None, derandomize=True)
    @hypothesis.given(st.lists(cells, min_size=1, max_size=8))
    def check(edits):
        silo_dir = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
        shutil.copytree(tiny_orderlines, silo_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("quarantine"))
        df = raw.copy()
        for row, col, value in edits:
            df.loc[row, col] = value
        df.to_csv(silo_dir / "order_lines.csv", index=False)
        silo = load_silo(silo_dir, now=NOW)
        _conserved(silo)
        ev = silo.events
        assert ev["user_id"].str.len().gt(0).all() and np.isfinite(ev["amount"]).all()
        assert (ev.loc[ev["event"].isin(["purchase", "refund"]), "amount"] > 0).all()
        assert (ev["ts"] <= pd.Timestamp(NOW)).all()

    check()


ONLINE_RETAIL_ROWS = """InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country
536365,85123A,WHITE HANGING HEART T-LIGHT HOLDER,6,12/1/2010 8:26,2.55,17850.0,United Kingdom
536365,71053,WHITE METAL LANTERN,6,12/1/2010 8:26,3.39,17850.0,United Kingdom
536370,22728,"ALARM CLOCK BAKELIKE PINK, SMALL",24,12/1/2010 8:45,3.75,12583.0,France
536370,POST,POSTAGE,3,12/1/2010 8:45,18,12583.0,France
C536379,D,Discount,-1,12/1/2010 9:41,27.5,14527.0,United Kingdom
C536391,22556,PLASTERS IN TIN CIRCUS PARADE ,-12,12/1/2010 10:24,1.65,17548.0,United Kingdom
C536391,21984,PACK OF 12 PINK PAISLEY TISSUES ,-24,12/1/2010 10:24,0.29,17548.0,United Kingdom
536414,22139,,56,12/1/2010 11:52,0,,United Kingdom
536544,21773,DECORATIVE ROSE BATHROOM BOTTLE,1,12/1/2010 14:32,2.51,,United Kingdom
536365,85123A,WHITE HANGING HEART T-LIGHT HOLDER,6,12/1/2010 8:26,2.55,17850.0,United Kingdom
"""


def test_online_retail_shaped_rows_with_the_shipped_mapping(tmp_path):
    """Rows as the public Online Retail export prints them (quoted commas, unpadded dates, float ids)."""
    silo_dir = tmp_path / "retail"
    silo_dir.mkdir()
    (silo_dir / "order_lines.csv").write_text(ONLINE_RETAIL_ROWS)
    mapping = example_mapping("orderlines")
    del mapping["users"], mapping["sources"]["customers"]
    mapping["sources"]["lines"]["skip_duplicate_rows"] = True
    (silo_dir / "mapping.json").write_text(json.dumps(mapping))
    (silo_dir / "merchant.json").write_text(json.dumps({"merchant_id": "retail", "data_end": "2011-12-09"}))
    silo = load_silo(silo_dir, now=NOW)
    (src,) = silo.export_report.sources
    assert (src.rows_read, src.rows_accepted, src.rows_quarantined) == (10, 5, 0)
    assert src.skipped_by_rule == {"guest_checkout": 2, "fee_lines": 2, "duplicate_row": 1}
    ev = silo.events.sort_values(["ts", "user_id"]).reset_index(drop=True)
    assert ev["user_id"].tolist() == ["17850", "12583", "17548"]
    assert ev["event"].astype(str).tolist() == ["purchase", "purchase", "refund"]
    np.testing.assert_allclose(ev["amount"], [6 * 2.55 + 6 * 3.39, 24 * 3.75, 12 * 1.65 + 24 * 0.29])
    assert ev["ts"].tolist() == [pd.Timestamp("2010-12-01 08:26"), pd.Timestamp("2010-12-01 08:45"),
                                 pd.Timestamp("2010-12-01 10:24")]


def test_european_export_decimal_commas_and_windows_encoding(tmp_path):
    silo_dir = tmp_path / "shop"
    silo_dir.mkdir()
    rows = ("Beleg;Artikel;Menge;Preis;Kunde;Datum\n"
            "1001;Tasse grün;2;1.234,50;K-7;01.12.2010 08:26\n"
            "1001;Löffel;3;0,99;K-7;01.12.2010 08:26\n"
            "1002;Teller;1;12,5;k-8;02.12.2010 09:00\n"
            "1003;Topf;1;1.2.3;K-9;02.12.2010 10:00\n"
            "1004;Deckel;;4,00;K-9;02.12.2010 11:00\n")
    (silo_dir / "Umsätze.csv").write_bytes(rows.encode("cp1252"))
    mapping = {
        "version": 2, "ids": {"case": "upper"}, "numbers": {"decimal": ",", "thousands": "."},
        "timestamp_format": "%d.%m.%Y %H:%M",
        "sources": {"lines": {"file": "Umsätze.csv", "delimiter": ";", "encoding": "cp1252"}},
        "events": {"from": "lines", "derive": {"line": "Menge * Preis"},
                   "fields": {"user_id": "Kunde", "ts": "Datum", "event": "'purchase'", "amount": "line",
                              "item_id": "Artikel"},
                   "group": {"by": ["Beleg"], "sum": ["amount"]}}}
    (silo_dir / "mapping.json").write_text(json.dumps(mapping))
    (silo_dir / "merchant.json").write_text(json.dumps({"merchant_id": "de", "data_end": "2010-12-31"}))
    silo = load_silo(silo_dir, now=NOW)
    (src,) = silo.export_report.sources
    assert src.conserved and src.rows_accepted == 3
    assert src.quarantined_by_reason == {"not a number": 1, "missing value for amount": 1}
    by_row = {e["row"]: e for e in src.examples}
    assert by_row[5]["field"] == "Preis" and by_row[5]["value"] == "1.2.3"
    ev = silo.events.set_index("user_id")["amount"]
    np.testing.assert_allclose(ev.loc["K-7"], 2 * 1234.5 + 3 * 0.99)
    np.testing.assert_allclose(ev.loc["K-8"], 12.5)
    assert silo.events["item_id"].tolist()[0] == "Tasse grün"
    mapping["sources"]["lines"]["encoding"] = "utf-8"
    (silo_dir / "mapping.json").write_text(json.dumps(mapping))
    with pytest.raises(MappingError, match=r"not utf-8 text .*set sources.lines.encoding"):
        load_silo(silo_dir, now=NOW)


def test_empty_value_in_a_summed_column_quarantines_the_order(exports, tmp_path):
    silo_dir = _copy(exports["marketplace"], tmp_path / "mp")
    pay = pd.read_csv(silo_dir / "order_payments.csv", dtype=str, keep_default_na=False)
    orders = pd.read_csv(silo_dir / "orders.csv", dtype=str, keep_default_na=False)
    order = orders.loc[orders["order_status"] == "delivered", "order_id"].iloc[0]
    pay.loc[pay["order_id"] == order, "payment_value"] = ""
    pay.to_csv(silo_dir / "order_payments.csv", index=False)
    silo = load_silo(silo_dir, now=NOW)
    _conserved(silo)
    by_file = {s.file: s for s in silo.export_report.sources}
    assert by_file["order_payments.csv"].quarantined_by_reason == {
        "missing value for paid": int((pay["order_id"] == order).sum())}
    assert by_file["orders.csv"].quarantined_by_reason == {"a row of order_payments.csv for this key was rejected": 1}


def test_node_trains_on_an_export_silo_through_the_consent_gate(exports, tmp_path):
    """The merchant node reads the export through its mapping; consent ids match the mapped user ids."""
    from fedretain.clients.node import MerchantNode, NodeConfig
    from fedretain.clients.provision import provision_node

    silo_dir = _copy(exports["orderlines"], tmp_path / "ol")
    provision_node(silo_dir)  # imports consent.csv (ids like 12471) into the node's ledger
    prep = MerchantNode(NodeConfig.for_silo(silo_dir)).prepare(
        "retention_modeling", ["recency_days", "frequency", "monetary_total"], 30)
    truth = pd.read_csv(silo_dir / "truth.csv", dtype={"user_id": str})
    assert prep.n_train + prep.n_test > 0.5 * (truth["purchases"] > 0).sum()
    assert np.isfinite(prep.x_train).all() and prep.x_train[:, 1].max() > 0  # frequency seen
