"""`ti-guard uninstall`: it says what it deletes, keeps or exports the record of refusals on
request, and status afterwards names no mode for a guard that is not there."""

from __future__ import annotations

import json

import sqlalchemy as sa

from conftest import one_line_error, seed_and_skip
from ti_guard.policy import COUNTS_TABLE, RECORD_TABLE, SETTINGS_TABLE


def _ours(db) -> set[str]:
    with db.engine.connect() as conn:
        return {t for t in sa.inspect(conn).get_table_names() if t.startswith("ti_guard")}


def test_uninstall_counts_what_it_deletes_and_status_names_no_mode(db, capsys):
    table = db.table()
    db.install("ignore")
    assert seed_and_skip(db.engine, table) == "success"  # kept, and recorded
    capsys.readouterr()
    assert db.cli("uninstall") == 0
    out = capsys.readouterr().out
    assert f"dropped table {RECORD_TABLE} (1 row(s), 1 refusal(s))" in out, out
    assert f"dropped table {COUNTS_TABLE} (1 row(s), 1 refusal(s))" in out, out
    assert _ours(db) == set()
    assert db.cli("status") == 2
    out = capsys.readouterr().out
    assert out.startswith("MISSING: ti_guard on ") and "mode=" not in out, out


def test_uninstall_keeps_or_exports_the_record(db, capsys, tmp_path):
    table = db.table()
    db.install("audit")
    seed_and_skip(db.engine, table)
    export = tmp_path / "record.json"
    capsys.readouterr()
    assert db.cli("uninstall", "--keep-record", f"--export-record={export}") == 0
    out = capsys.readouterr().out
    assert f"kept table {RECORD_TABLE} (1 row(s), 1 refusal(s)) (--keep-record)" in out, out
    assert _ours(db) == {RECORD_TABLE, COUNTS_TABLE}
    saved = json.loads(export.read_text())["tables"]
    assert [(r["rule"], r["action"], r["old_state"]) for r in saved[RECORD_TABLE]] == [("racy_skip", "audit", "success")]
    assert [r["refusals"] for r in saved[COUNTS_TABLE]] == [1]
    # An export never overwrites: the next one names a new file, and nothing is removed before it.
    db.install("audit")
    assert db.cli("uninstall", f"--export-record={export}") == 2
    one_line_error(capsys, "cannot write the record", str(export), "nothing was removed")
    assert SETTINGS_TABLE in _ours(db)
    # The kept record was taken back by the install: its refusal is still counted.
    capsys.readouterr()
    assert db.cli("uninstall") == 0
    assert f"dropped table {COUNTS_TABLE} (1 row(s), 1 refusal(s))" in capsys.readouterr().out
    assert _ours(db) == set()
