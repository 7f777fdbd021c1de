"""The operator's choice: each rule switched on or off at install (--rules, -x rules=, TI_GUARD_RULES),
recorded by revision 0002 in ti_guard_settings, shown by status, report and doctor.

Every test shows the write without the guard, with the rule on and with it off. set_state_skip is
the rule that matters (docs/policy.md, "Switching rules"): off, `TaskInstance.set_state`'s
running -> skipped goes through as with no guard; on, the row is kept (it never raises: its writer
is the scheduler's ORM). It is enforced on every backend on Airflow 2 tables, on Airflow 3 tables
where the backend can tell set_state from a task's own finish (render.enforced_rules says where).
"""

from __future__ import annotations

import json
import uuid

import pytest
import sqlalchemy as sa

from conftest import one_line_error, ordinary_writes_go_through, racy_skip_of_a_finished_row
from test_install import alembic, objects, tables
from test_security import BASELINE, _run_file
from ti_guard import airflow_writes as aw
from ti_guard import catalog
from ti_guard.policy import RULE_NAMES, Policy, airflow_generation
from ti_guard.render import enforced_rules

EVERY = ",".join(RULE_NAMES)
WITHOUT_SET_STATE = ",".join(n for n in RULE_NAMES if n != "set_state_skip")


def _set_state_skip_of_a_running_row(db, table) -> tuple[int, str]:
    """A running task, then `TaskInstance.set_state(SKIPPED)` at it (the scheduler's
    NotPreviouslySkippedDep, a REST mark): (the rows the statement counted, the state that stays)."""
    key = aw.key_of(table, "d", "busy", "r")
    with db.engine.begin() as conn:
        conn.execute(table.delete().where(key))
        row = dict(id=uuid.uuid4().hex, dag_id="d", task_id="busy", run_id="r", map_index=-1, state="running", try_number=1, start_date=aw.now())
        conn.execute(table.insert().values(**{k: v for k, v in row.items() if k in table.c}))
    with db.engine.begin() as conn:
        counted = conn.execute(aw.set_state(table, key, "skipped")).rowcount
    with db.engine.connect() as conn:
        return counted, conn.execute(sa.select(table.c.state).where(key)).scalar()


def _enforced(db, table, rules=EVERY, name="set_state_skip") -> bool:
    """Whether this backend installs rule `name` on this table and can act on it: MariaDB's
    performance_schema is off (its default), so set_state_skip on 3.x tables goes through there."""
    columns = [c.name for c in table.c]
    if db.server == "mysql" and name == "set_state_skip" and airflow_generation(columns) == 3:
        return False
    return any(rule.name == name for rule, _, _ in enforced_rules(db.backend, Policy.build(rules=rules), columns))


# Each rule's writer, at a running task: what it overwrites the row with.
WRITERS = {
    "racy_skip": (lambda table, key: aw.racy_skip(table, "d", "r", [("busy", -1)]), "skipped"),
    "stale_set_state_skip": (lambda table, key: aw.set_state_from_stale_copy(table, key, "skipped"), "skipped"),
    "set_state_skip": (lambda table, key: aw.set_state(table, key, "skipped"), "skipped"),
    "stale_schedule": (lambda table, key: aw.schedule_tis(table, key), "scheduled"),
}


def _write_at_a_running_row(db, table, rule: str) -> str:
    key = aw.key_of(table, "d", "busy", "r")
    _set_state_skip_of_a_running_row(db, table)  # seeds the running row (and skips it: reset below)
    with db.engine.begin() as conn:
        # A running row as a worker's start leaves it (a duration left over would make the racy skip
        # ambiguous with set_state on a stale copy: tests/test_policy.py, duration zero).
        conn.execute(sa.update(table).where(key).values(state="running", end_date=None, duration=None))
        conn.execute(WRITERS[rule][0](table, key))
    with db.engine.connect() as conn:
        return conn.execute(sa.select(table.c.state).where(key)).scalar()


@pytest.mark.parametrize("rule", RULE_NAMES)
@pytest.mark.parametrize("shape", ["3.x", "2.x"])
def test_each_rule_off_lets_its_writer_through_as_without_the_guard(db, shape, rule):
    table = db.table(shape)
    overwritten = WRITERS[rule][1]
    assert _write_at_a_running_row(db, table, rule) == overwritten  # no guard
    db.install("ignore")
    assert _write_at_a_running_row(db, table, rule) == ("running" if _enforced(db, table, name=rule) else overwritten)
    assert db.cli("install", f"--rules=all,-{rule}") == 0
    assert _write_at_a_running_row(db, table, rule) == overwritten
    others = [r for r in RULE_NAMES if r != rule and _enforced(db, table, name=r)]
    for other in others:  # the rules left on still keep their writers' rows
        assert _write_at_a_running_row(db, table, other) == "running", other


def _status(db, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = db.cli("status")
    return code, capsys.readouterr().out


@pytest.mark.parametrize("shape", ["3.x", "2.x"])
def test_set_state_skip_switched_off_and_on_in_place(db, shape, capsys):
    table = db.table(shape)
    enforced = _enforced(db, table)
    # Without the guard: the scheduler's set_state skips the running task (the race's second writer).
    assert _set_state_skip_of_a_running_row(db, table) == (1, "skipped")

    db.install("ignore")
    on = set(objects(db))
    assert _set_state_skip_of_a_running_row(db, table) == (1, "running" if enforced else "skipped")

    # Off, in place, the mode kept (not named): the write goes through as with no guard ...
    assert db.cli("install", "--rules=all,-set_state_skip") == 0
    off = set(objects(db))
    if enforced:
        assert off != on  # the rule's logic is gone from what is installed
    assert not [name for name in off if name.startswith("ti_guard_set_state_skip")]
    assert _set_state_skip_of_a_running_row(db, table) == (1, "skipped")
    # ... every other rule stays, Airflow's own writes go through, and status sees no drift.
    assert racy_skip_of_a_finished_row(db.engine, table) == (None, "success")
    ordinary_writes_go_through(db.engine, table)
    code, out = _status(db, capsys)
    assert code == 0 and f"mode=ignore protect=running,success,failed rules={WITHOUT_SET_STATE}" in out, out

    # A mode switch that does not name the rules keeps them off.
    db.install("raise")
    code, out = _status(db, capsys)
    assert code == 0 and f"mode=raise protect=running,success,failed rules={WITHOUT_SET_STATE}" in out, out
    assert _set_state_skip_of_a_running_row(db, table) == (1, "skipped")
    error, state = racy_skip_of_a_finished_row(db.engine, table)
    assert "ti_guard: refused" in error and state == "success"

    # Back on, the raise mode kept: kept (counted, never an error: property (a)), in raise as in ignore.
    assert db.cli("install", "--rules=all") == 0
    code, out = _status(db, capsys)
    assert code == 0 and f"mode=raise protect=running,success,failed rules={EVERY}" in out, out
    assert _set_state_skip_of_a_running_row(db, table) == (1, "running" if enforced else "skipped")

    # audit: on or off, the write goes through (on, it is recorded).
    db.install("audit")
    assert _set_state_skip_of_a_running_row(db, table) == (1, "skipped")
    with db.engine.connect() as conn:
        audited = conn.exec_driver_sql("SELECT COUNT(*) FROM ti_guard_refusal_counts WHERE rule = 'set_state_skip' AND action = 'audit'").scalar()
    assert audited == (1 if enforced else 0)


def test_the_three_routes_and_the_recorded_choice(db, capsys, monkeypatch):
    """-x rules= (plain alembic), TI_GUARD_RULES and --rules name the same choice; ti_guard_settings records it."""
    table = db.table()
    # Without the guard: a stale schedule_tis puts a running task back to scheduled.
    _set_state_skip_of_a_running_row(db, table)
    with db.engine.begin() as conn:
        conn.execute(sa.update(table).values(state="running"))
        conn.execute(aw.schedule_tis(table, table.c.task_id == "busy"))
    with db.engine.connect() as conn:
        assert conn.execute(sa.select(table.c.state)).scalar() == "scheduled"
    alembic(db, "-x", f"rules=all,-{RULE_NAMES[-1]}", "upgrade", "head")
    with db.engine.connect() as conn:
        assert catalog.read_settings(conn, Policy())["rules"] == ",".join(RULE_NAMES[:-1])
    code, out = _status(db, capsys)
    assert code == 0 and f"rules={','.join(RULE_NAMES[:-1])}" in out
    # stale_schedule off: the same, as with no guard.
    with db.engine.begin() as conn:
        conn.execute(sa.update(table).values(state="running"))
        conn.execute(aw.schedule_tis(table, table.c.task_id == "busy"))
    with db.engine.connect() as conn:
        assert conn.execute(sa.select(table.c.state)).scalar() == "scheduled"

    monkeypatch.setenv("TI_GUARD_RULES", "racy_skip")
    assert db.cli("install") == 0  # the environment names the rules: over the guard in place too
    monkeypatch.delenv("TI_GUARD_RULES")
    code, out = _status(db, capsys)
    assert code == 0 and "rules=racy_skip" in out and "stale_schedule" not in out
    assert db.cli("install", "--rules", EVERY) == 0
    with db.engine.begin() as conn:
        conn.execute(sa.update(table).values(state="running"))
        conn.execute(aw.schedule_tis(table, table.c.task_id == "busy"))
    with db.engine.connect() as conn:
        assert conn.execute(sa.select(table.c.state)).scalar() == "running"  # stale_schedule on: kept


@pytest.mark.parametrize("route", ["--rules", "TI_GUARD_RULES", "alembic -x rules"])
@pytest.mark.parametrize("over_a_guard", [False, True])
def test_unknown_rule_is_one_line_and_changes_nothing(db, capsys, monkeypatch, route, over_a_guard):
    db.table()
    if over_a_guard:
        db.install("raise", rules=WITHOUT_SET_STATE)
    with db.engine.connect() as conn:
        before = (objects(db), tables(db), catalog.read_settings(conn, Policy()))
    bad = "racy_skip,set_state_skp"
    if route == "alembic -x rules":
        result = alembic(db, "-x", f"rules={bad}", "upgrade", "head", check=False)
        assert result.returncode != 0
        printed = result.stdout + result.stderr  # Alembic's FAILED: line
        line = [x for x in printed.splitlines() if "set_state_skp" in x]
        assert len(line) == 1 and all(name in line[0] for name in RULE_NAMES), printed
    else:
        if route == "TI_GUARD_RULES":
            monkeypatch.setenv("TI_GUARD_RULES", bad)
            assert db.cli("install") == 2
        else:
            assert db.cli("install", f"--rules={bad}") == 2
        one_line_error(capsys, "unknown rule(s) 'set_state_skp'", *RULE_NAMES)
    with db.engine.connect() as conn:
        assert (objects(db), tables(db), catalog.read_settings(conn, Policy())) == before


def test_no_rule_left_is_refused(db, capsys):
    db.table()
    assert db.cli("install", "--rules=all," + ",".join(f"-{n}" for n in RULE_NAMES)) == 2
    one_line_error(capsys, "no rule left", "ti-guard uninstall")
    assert objects(db) == {} and tables(db) == set()


def test_status_report_doctor_show_the_rules(db, capsys):
    db.table()
    db.install("ignore", rules=WITHOUT_SET_STATE)
    described = f"rules={WITHOUT_SET_STATE}"
    for command in ("status", "report", "doctor"):
        capsys.readouterr()
        assert db.cli(command) in (0, 1), command  # doctor: a warning here and there (no Airflow alembic_version)
        assert described in capsys.readouterr().out, command
        assert db.cli(command, "--format=json") in (0, 1)
        doc = json.loads(capsys.readouterr().out)
        assert doc["rules"] == WITHOUT_SET_STATE.split(","), (command, doc)
    assert db.cli("report", "--format=prometheus") == 0
    metrics = capsys.readouterr().out
    assert 'ti_guard_rule{rule="set_state_skip"} 0' in metrics and 'ti_guard_rule{rule="racy_skip"} 1' in metrics
    # doctor names what install would do with other rules, without doing it
    assert db.cli("doctor", "--rules=all") in (0, 1)
    assert f"rules={EVERY}" in capsys.readouterr().out
    code, out = _status(db, capsys)
    assert code == 0 and described in out


def test_revision_0002_round_trip_keeps_the_guard_and_its_record(db, capsys):
    """Down to 0001 (which knows no rules): every rule rendered again, mode and protect list and the
    record of refusals kept; back up: every rule recorded, as 0001 had them."""
    table = db.table()
    db.install("audit", protect="running,success", rules=WITHOUT_SET_STATE)
    assert racy_skip_of_a_finished_row(db.engine, table) == (None, "skipped")  # audit: through, recorded
    alembic(db, "downgrade", "0001")
    with db.engine.connect() as conn:
        assert "rules" not in catalog.settings_columns(conn, Policy())
        assert catalog.recorded_policy(conn, Policy()) == Policy.build(mode="audit", protect="running,success")
        counted = conn.exec_driver_sql("SELECT SUM(refusals) FROM ti_guard_refusal_counts").scalar()
    assert counted == 1
    assert alembic(db, "current").stdout.startswith("0001")
    code, out = _status(db, capsys)
    assert code == 1 and "migration revision is 0001, head is 0002" in out, out
    alembic(db, "upgrade", "head")
    with db.engine.connect() as conn:
        assert catalog.read_settings(conn, Policy())["rules"] == EVERY
        assert conn.exec_driver_sql("SELECT SUM(refusals) FROM ti_guard_refusal_counts").scalar() == 1
    code, out = _status(db, capsys)
    assert code == 0 and f"mode=audit protect=running,success rules={EVERY}" in out, out
    alembic(db, "downgrade", "base")
    assert objects(db) == {} and tables(db) == set()


def test_offline_sql_from_0001_switches_the_objects(pg_db, capsys):
    """`alembic upgrade 0001:head --sql -x rules=...`: a DBA's script that adds the column and swaps the
    objects, as an online upgrade does."""
    db = pg_db
    db.table()
    alembic(db, "upgrade", "0001")
    with db.engine.begin() as conn:  # 0.5.0's settings table: no rules column
        conn.exec_driver_sql("ALTER TABLE ti_guard_settings DROP COLUMN rules")
    script = alembic(db, "-x", "dialect=postgresql", "-x", f"rules={WITHOUT_SET_STATE}", "upgrade", "0001:head", "--sql").stdout
    db.sql(script)
    code, out = _status(db, capsys)
    assert code == 0 and f"rules={WITHOUT_SET_STATE}" in out, out
    assert not [name for name in objects(db) if name.startswith("ti_guard_set_state_skip")]


@pytest.mark.parametrize("route", ["cli", "alembic"])
def test_upgrade_from_an_earlier_release_records_every_rule_or_the_ones_named(server_db, capsys, route):
    """0.4.0's guard as a DBA installed it (revision 0001, ti_guard_settings without `rules`): revision
    0002 adds the column over it, records every rule unless told otherwise, keeps the recorded mode."""
    db = server_db
    table = db.table()
    _run_file(db, BASELINE / f"{db.backend}-0.4.0-install.sql")
    with db.engine.connect() as conn:
        assert "rules" not in catalog.settings_columns(conn, Policy())
        assert catalog.recorded_policy(conn, Policy()) == Policy.build(mode="ignore")  # 0.4.0 knew no rules: every rule
    if route == "cli":
        assert db.cli("install", "--rules=all,-set_state_skip") == 0
        wanted = WITHOUT_SET_STATE
    else:
        alembic(db, "upgrade", "head")
        wanted = EVERY
    with db.engine.connect() as conn:
        assert catalog.read_settings(conn, Policy())["rules"] == wanted
    code, out = _status(db, capsys)
    assert code == 0 and f"mode=ignore protect=running,success,failed rules={wanted}" in out, out
    assert racy_skip_of_a_finished_row(db.engine, table) == (None, "success")
    assert _set_state_skip_of_a_running_row(db, table) == (1, "running" if _enforced(db, table, wanted) else "skipped")
