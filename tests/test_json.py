"""`--format json`: one documented shape per command, the same common keys everywhere (docs/operations.md,
"JSON and exit codes"), ISO 8601 timestamps with their UTC offset, and a quiet end when the
reader closes the pipe."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys

from conftest import seed_and_skip
from ti_guard import cli
from ti_guard.policy import RULE_NAMES

COMMON = ["command", "code", "status", "summary", "url", "url_source", "generated_at", "mode", "protect", "rules", "schema", "table"]


def run_json(db, capsys, *args) -> tuple[int, dict]:
    capsys.readouterr()
    rc = db.cli(*args, "--format=json")
    return rc, json.loads(capsys.readouterr().out)


def with_offset(text: str) -> dt.datetime:
    when = dt.datetime.fromisoformat(text)
    assert when.utcoffset() is not None, text
    return when


def test_every_command_speaks_the_same_envelope(db, capsys):
    table = db.table()
    rc, status = run_json(db, capsys, "status")
    assert (rc, status["code"], status["status"], status["mode"], status["protect"]) == (2, 2, "missing", None, None)
    rc, installed = run_json(db, capsys, "install", "--mode=audit")
    assert rc == 0 and installed["changed"] is True and installed["status"] == "changed" and installed["actions"]
    seed_and_skip(db.engine, table)  # one refusal, audited
    rc, doctor = run_json(db, capsys, "doctor")
    rc_report, report = run_json(db, capsys, "report", "--since=1h")
    rc, status = run_json(db, capsys, "status")
    rc, removed = run_json(db, capsys, "uninstall")
    for command, doc in (("install", installed), ("doctor", doctor), ("report", report), ("status", status), ("uninstall", removed)):
        assert list(doc)[: len(COMMON)] == COMMON, (command, list(doc))
        assert doc["command"] == command and doc["url"] == db.url and doc["url_source"] == "--url"
        with_offset(doc["generated_at"])
    assert (status["code"], status["status"], status["mode"]) == (0, "installed/current", "audit")
    assert (rc_report, report["code"], report["status"], report["mode"]) == (0, 0, "installed/current", "audit")
    assert status["findings"] and all(set(f) == {"check", "level", "message"} for f in status["findings"] + doctor["findings"])
    assert {"check": "install would", "level": "ok", "message": f"do nothing: the guard is installed and current [mode=audit protect=running,success,failed rules={','.join(RULE_NAMES)}]"} in doctor["findings"]
    since, until = with_offset(report["since"]), with_offset(report["until"])
    assert since < with_offset(report["latest"][0]["refused_at"]) <= until and with_offset(report["details_from"]) <= until
    assert [(t["old_state"], t["refusals"]) for t in report["totals"]] == [("success", 1)]
    assert removed["changed"] is True and removed["mode"] is None


def test_install_and_uninstall_say_whether_they_changed_anything(db, capsys):
    db.table()
    assert db.cli("install", "--mode=raise", "--detailed-exitcode") == cli.EXIT_CHANGED
    rc, again = run_json(db, capsys, "install", "--mode=raise", "--detailed-exitcode")
    assert (rc, again["code"], again["changed"], again["status"], again["actions"]) == (0, 0, False, "unchanged", [])
    assert "nothing changed" in again["summary"]
    rc, switched = run_json(db, capsys, "install", "--mode=ignore")
    assert (rc, switched["changed"]) == (0, True) and any(a.startswith("dropped trigger") for a in switched["actions"])
    capsys.readouterr()
    assert db.cli("uninstall", "--detailed-exitcode") == cli.EXIT_CHANGED
    assert db.cli("uninstall", "--detailed-exitcode") == 0
    rc, removed = run_json(db, capsys, "uninstall")
    assert (rc, removed["changed"], removed["status"], removed["actions"]) == (0, False, "unchanged", [])


def test_a_reader_that_closes_the_pipe_early_gets_no_traceback(db):
    db.table()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TI_GUARD_", "AIRFLOW__"))}
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; from ti_guard.cli import main; sys.exit(main())", "doctor", "--url", db.url, "--format=json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    child.stdout.close()  # as `| head -4` does once it has its lines, before ti-guard writes
    err = child.stderr.read().decode()
    assert child.wait() == cli.EXIT_PIPE and err == "", err
