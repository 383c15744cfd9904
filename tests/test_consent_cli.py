"""``fedretain consent ...`` end to end with click's CliRunner, plus the report's numbers."""

from __future__ import annotations

import base64
import json
import re
import sqlite3
from datetime import datetime, timezone

import pytest
from click.testing import CliRunner

from fedretain.consent.cli import consent
from fedretain.consent.ledger import ConsentLedger
from fedretain.consent.report import coverage_over_time

HEADER = "subject_id,controller,purpose,scopes,action,effective_at,expires_at\n"


@pytest.fixture
def cli(tmp_path):
    runner = CliRunner()
    db = tmp_path / "node" / "consent.sqlite"

    def run(*args, ok=True):
        res = runner.invoke(consent, ["--db", str(db), *map(str, args)])
        if ok is not None:
            assert (res.exit_code == 0) == ok, res.output
        assert "Traceback" not in res.output
        return res

    run("init", "--controller", "shop1")
    run.db = db  # type: ignore[attr-defined]
    run.key = db.with_suffix(".key.pem")  # type: ignore[attr-defined]
    return run


def test_init_creates_ledger_and_private_key(cli):
    assert cli.db.exists() and cli.key.exists()
    assert oct(cli.key.stat().st_mode & 0o777) == "0o600"
    assert cli.key.with_name(cli.key.name + ".pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    res = cli("init", "--controller", "shop1")  # idempotent (issue 13): nothing changes
    assert "already exists" in res.output and "nothing to do" in res.output
    res = cli("init", "--controller", "shop2", ok=False)  # a different controller: says how to recover
    assert "still empty" in res.output and "remove the empty ledger" in res.output
    assert "--controller shop1" in res.output


def test_grant_withdraw_show(cli):
    cli("grant", "alice", "--purpose", "retention_modeling", "--scopes", "purchase_history,engagement",
        "--at", "2024-01-01T00:00:00Z", "--notice", "v2", "--jurisdiction", "CN")
    cli("withdraw", "alice", "--purpose", "retention_modeling", "--scopes", "engagement", "--at", "2024-02-01")
    res = cli("show", "alice")
    assert "consent history of alice" in res.output and "withdraw" in res.output
    assert "purchase_history" in res.output and "no run has used alice's data" in res.output
    data = json.loads(cli("show", "alice", "--json").output)
    assert [h["action"] for h in data["history"]] == ["grant", "withdraw"]
    assert data["state"]["retention_modeling"] == ["purchase_history"]
    past = json.loads(cli("show", "alice", "--json", "--at", "2024-01-15").output)
    assert sorted(past["state"]["retention_modeling"]) == ["engagement", "purchase_history"]


def test_show_lists_runs_that_used_the_subject(cli):
    cli("grant", "bob", "--purpose", "ltv_modeling", "--scopes", "purchase_history", "--at", "2024-01-01")
    with ConsentLedger.open(cli.db, key_path=cli.key) as led:
        head = led.head()
        led.record_usage("run-42", 3, "ltv_modeling", "rfm", {"purchase_history": 1}, 1, head.size, head.root_hex,
                         "2024-03-01", ["bob"])
    out = cli("show", "bob").output
    assert "run-42" in out and "runs that used bob's data" in out
    data = json.loads(cli("show", "bob", "--json").output)
    assert data["usage"][0]["run_id"] == "run-42" and data["usage"][0]["round"] == 3
    assert json.loads(cli("show", "carol", "--json").output)["usage"] == []


def test_user_errors_are_clean_messages(cli, tmp_path):
    res = cli("grant", "x", "--purpose", "retention_modeling", "--scopes", "gps", ok=False)
    assert "unknown scope 'gps'" in res.output and res.exit_code == 1
    res = cli("grant", "x", "--purpose", "marketing", "--scopes", "social", ok=False)
    assert res.exit_code == 2 and "marketing" in res.output  # click's own choice check
    res = cli("grant", "x", "--purpose", "analytics", "--scopes", "social", "--at", "soon", ok=False)
    assert "not an ISO 8601 timestamp" in res.output
    res = cli("import", tmp_path / "missing.csv", ok=False)
    assert "no such file" in res.output
    runner = CliRunner()
    res = runner.invoke(consent, ["--db", str(tmp_path / "none.sqlite"), "verify"])
    assert res.exit_code == 1 and "no consent ledger" in res.output and "Traceback" not in res.output


def test_import_is_all_or_nothing_and_names_row(cli, tmp_path):
    rows = [f"u{i},shop1,analytics,social,grant,2024-01-01T00:00:00Z," for i in range(1, 80)]
    rows[56] = "u57,shop1,analytics,social;gps,grant,2024-01-01T00:00:00Z,"
    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER + "\n".join(rows) + "\n")
    res = cli("import", bad, ok=False)
    assert "bad.csv, row 57, field 'scopes'" in res.output and "gps" in res.output
    rows[56] = "u57,shop1,analytics,social,grant,2024-01-01T00:00:00Z,"
    good = tmp_path / "good.csv"
    good.write_text(HEADER + "\n".join(rows) + "\n")
    assert "imported 79 consent record(s)" in cli("import", good).output
    assert "79 records" in cli("verify").output


def test_verify_exit_codes(cli):
    cli("grant", "alice", "--purpose", "analytics", "--scopes", "social", "--at", "2024-01-01")
    cli("grant", "bob", "--purpose", "analytics", "--scopes", "social", "--at", "2024-01-02")
    res = cli("verify")
    assert res.output.startswith("ledger OK: 2 records")
    assert json.loads(cli("verify", "--json").output)["ok"] is True
    conn = sqlite3.connect(cli.db)
    conn.execute("DROP TRIGGER records_no_update")
    conn.execute("UPDATE records SET scopes = 'device' WHERE seq = 2")
    conn.commit()
    conn.close()
    res = cli("verify", ok=False)
    assert res.exit_code == 1
    rid = re.search(r"record_id ([0-9a-f-]{36})", res.output).group(1)
    with ConsentLedger.open(cli.db) as led:
        assert led.records()[1].record_id == rid
    assert "seq 2" in res.output and "TAMPERED" in res.output


def test_verify_with_a_public_key(cli, tmp_path):
    pub = cli.key.with_name(cli.key.name + ".pub")
    cli("grant", "alice", "--purpose", "analytics", "--scopes", "social")
    assert "given public key" in cli("verify", "--public-key", pub).output
    from fedretain.consent import signing
    other = tmp_path / "other.pub"
    other.write_text(signing.public_key_pem(signing.generate_key()))
    res = cli("verify", "--public-key", other, ok=False)
    assert "created with key" in res.output


def test_export_round_trips_into_a_new_ledger(cli, tmp_path):
    cli("grant", "alice", "--purpose", "analytics", "--scopes", "social,profile", "--at", "2024-01-01",
        "--expires", "2025-01-01")
    cli("withdraw", "alice", "--purpose", "analytics", "--at", "2024-06-01")
    out_csv = tmp_path / "export.csv"
    out_json = tmp_path / "export.json"
    assert "exported 2 record(s)" in cli("export", "--format", "csv", "--out", out_csv).output
    cli("export", "--format", "json", "--out", out_json)
    data = json.loads(out_json.read_text())
    assert len(data["records"]) == 2 and data["head"]["size"] == 2
    runner = CliRunner()
    db2 = tmp_path / "copy.sqlite"
    assert runner.invoke(consent, ["--db", str(db2), "init", "--controller", "shop1"]).exit_code == 0
    res = runner.invoke(consent, ["--db", str(db2), "import", str(out_csv)])
    assert res.exit_code == 0, res.output
    with ConsentLedger.open(cli.db) as a, ConsentLedger.open(db2) as b:
        assert [r.canonical_json() for r in a.records()] == [r.canonical_json() for r in b.records()]


def test_report(cli, tmp_path):
    rows = [f"u{i},shop1,retention_modeling,purchase_history;engagement,grant,2024-01-{1 + i % 20:02d}T00:00:00Z,"
            for i in range(1, 41)]
    rows += [f"u{i},shop1,retention_modeling,engagement,withdraw,2024-03-0{1 + i % 5}T00:00:00Z," for i in range(1, 11)]
    rows += ["u99,shop1,analytics,social,grant,2024-01-05T00:00:00Z,2024-02-05T00:00:00Z"]
    f = tmp_path / "c.csv"
    f.write_text(HEADER + "\n".join(rows) + "\n")
    cli("import", f)
    with ConsentLedger.open(cli.db, key_path=cli.key) as led:
        head = led.head()
        led.record_usage("run-1", 0, "retention_modeling", "rfm", {"purchase_history": 3}, 3, head.size,
                         head.root_hex, "2024-04-01", ["u1", "u2", "u3"])
    out = tmp_path / "report"
    assert "wrote" in cli("report", "--out", out, "--at", "2024-04-01").output
    html = (out / "report.html").read_text()
    data = json.loads((out / "report.json").read_text())
    imgs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(imgs) == 3 and all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in imgs)
    assert "Verified" in html and "run-1" in html
    assert data["verify"]["ok"] and data["ledger"]["records"] == 51
    assert data["coverage_at"]["retention_modeling"]["purchase_history"] == 40
    assert data["coverage_at"]["retention_modeling"]["engagement"] == 30
    assert data["coverage_at"]["analytics"]["any_scope"] == 0  # expired in February
    assert sum(data["withdrawals_per_month"]["retention_modeling"].values()) == 10
    assert data["usage"][0]["n_users"] == 3


def test_coverage_curve_equals_state_at_at_every_point(cli, tmp_path):
    rows = []
    for i in range(30):
        rows.append(f"s{i % 7},shop1,retention_modeling,{['social', 'engagement;social', 'profile'][i % 3]},"
                    f"{['grant', 'grant', 'withdraw', 'expire'][i % 4]},2024-01-{1 + (i * 7) % 28:02d}T00:00:00Z,"
                    + ("2024-01-20T00:00:00Z" if i % 5 == 0 and i % 4 < 2 else ""))
    f = tmp_path / "c.csv"
    f.write_text(HEADER + "\n".join(rows) + "\n")
    cli("import", f)
    times = [datetime(2024, 1, d, h, tzinfo=timezone.utc) for d in range(1, 29, 3) for h in (0, 12)]
    with ConsentLedger.open(cli.db) as led:
        cov = coverage_over_time(led, times)["retention_modeling"]
        for t, row in zip(times, cov.itertuples(index=False)):
            state = led.state_at("retention_modeling", t)
            got = row._asdict()
            assert got["any_scope"] == int(state.any(axis=1).sum()), t
            for scope in state.columns:
                assert got[scope] == int(state[scope].sum()), (t, scope)
