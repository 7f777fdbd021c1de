"""set_state_skip on MySQL and MariaDB, Airflow 3 tables: the client's statement, read from
performance_schema, tells TaskInstance.set_state (kept) from a task's own finish (next_method
written: through). Each shape is also run without the guard, where it overwrites the running row.

Where the statement cannot be read or surely parsed (performance_schema off, the thread not
instrumented, a CALL, a text cut at performance_schema_max_sql_text_length, a backslash, a
comment, a subquery in the SET list, the DEFINER without SELECT on performance_schema), the write
goes through, as it did before the signal existed: the guard never blocks Airflow's own writes.
"""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
import sqlalchemy as sa

from conftest import sees_statement

from ti_guard import cli, statement_signal
from ti_guard.db import make_engine

ID = "0" * 31 + "1"  # a 3.x id as a reflected MySQL Uuid holds it: CHAR(32), no dashes
T0 = datetime(2026, 12, 4, 9, 0, 0)
END = "'2026-12-04 10:00:00'"
KEPT, THROUGH = "kept", "through"
WHERE = f"WHERE task_instance.id = '{ID}'"
SET_STATE = f"UPDATE task_instance SET state='skipped', end_date={END}, duration=3600.0, updated_at={END} {WHERE}"
SELF_FINISH = (
    f"UPDATE task_instance SET state='skipped', end_date={END}, duration=3600.0, next_method=NULL, next_kwargs=NULL, "
    f"rendered_map_index=NULL, updated_at={END} {WHERE}"
)
LONG = "x" * 1100  # past performance_schema_max_sql_text_length (1024, both servers' default)

# (case, statement, verdict where the statement can be read)
SHAPES = [
    ("TaskInstance.set_state (NotPreviouslySkippedDep, REST mark)", SET_STATE, KEPT),
    ("a task's own finish (execution API: next_method = NULL)", SELF_FINISH, THROUGH),
    ("backquoted set_state", f"UPDATE `task_instance` SET `state`='skipped', `end_date`={END} WHERE `task_instance`.`id` = '{ID}'", KEPT),
    ("backquoted finish", f"UPDATE `task_instance` SET `state`='skipped', `end_date`={END}, `next_method`=NULL WHERE `id` = '{ID}'", THROUGH),
    ("qualified finish", f"UPDATE task_instance SET task_instance.state='skipped', task_instance.end_date={END}, task_instance.next_method=NULL {WHERE}", THROUGH),
    ("alias, case, whitespace", f"update task_instance as ti\n set ti.state = 'skipped',\n\tti.end_date = {END} ,  ti . NEXT_METHOD\n=\nNULL\nwhere ti.id = '{ID}'", THROUGH),
    ("set_state whose WHERE names next_method", f"{SET_STATE} AND next_method IS NULL", KEPT),
    ("set_state writing a value that reads next_method=NULL", f"UPDATE task_instance SET state='skipped', end_date={END}, hostname=', next_method=NULL' {WHERE}", KEPT),
    ("a finish whose value reads like the end of the SET list",
     f"UPDATE task_instance SET state='skipped', end_date={END}, rendered_map_index='x WHERE id = 1', next_method=NULL {WHERE}", THROUGH),
    ("a finish whose value holds doubled quotes",
     f"UPDATE task_instance SET state='skipped', end_date={END}, rendered_map_index='it''s'' WHERE ''', next_method=NULL {WHERE}", THROUGH),
    ("a finish whose value ends in a backslash (NO_BACKSLASH_ESCAPES decides what it means)",
     f"UPDATE task_instance SET state='skipped', end_date={END}, rendered_map_index='x\\\\', next_method=NULL {WHERE}", THROUGH),
    ("set_state with a backslash in a value: no signal", f"UPDATE task_instance SET state='skipped', end_date={END}, hostname='a\\\\b' {WHERE}", THROUGH),
    ("set_state behind a comment: no signal", f"/* scheduler */ {SET_STATE}", THROUGH),
    ("a finish with a subquery's WHERE before next_method",
     f"UPDATE task_instance SET state='skipped', end_date={END}, duration=(SELECT 7 FROM DUAL WHERE 1 = 1), next_method=NULL {WHERE}", THROUGH),
    ("set_state with a subquery in its SET list: no signal",
     f"UPDATE task_instance SET state='skipped', end_date={END}, duration=(SELECT 7 FROM DUAL WHERE 1 = 1) {WHERE}", THROUGH),
    ("a finish cut inside a long value before next_method",
     f"UPDATE task_instance SET state='skipped', end_date={END}, external_executor_id='{LONG}', next_method=NULL {WHERE}", THROUGH),
    ("a finish cut in its SET list before next_method",
     f"UPDATE task_instance SET state='skipped', end_date={END}, duration=GREATEST({', '.join(['1'] * 400)}), next_method=NULL {WHERE}", THROUGH),
    ("set_state cut after its WHERE: the SET list is whole", f"{SET_STATE} AND task_instance.hostname <> '{LONG}'", KEPT),
    ("set_state whose values are past ASCII", f"UPDATE task_instance SET state='skipped', end_date={END}, hostname='wörker' {WHERE}", KEPT),
    ("set_state with an alias past ASCII: no signal", f"UPDATE task_instance AS tï SET tï.state='skipped', tï.end_date={END} WHERE tï.id = '{ID}'", THROUGH),
]


def _seed(db):
    table = db.table()
    with db.engine.begin() as conn:
        conn.execute(table.insert().values(id=ID, dag_id="d", task_id="join", run_id="r", state="running", start_date=T0, try_number=1))
    return table


def _write(db, statement, *before) -> tuple[int, str]:
    """(rowcount, state afterwards) of one statement from a connection of its own, after `before`;
    the row is set back to running for the next one."""
    engine = make_engine(db.url)  # a fresh session: `before` may change what its thread records
    try:
        with engine.begin() as conn:
            for sql in before:
                conn.exec_driver_sql(sql)
            count = conn.exec_driver_sql(statement).rowcount
    finally:
        engine.dispose()
    with db.engine.begin() as conn:
        state = conn.exec_driver_sql(f"SELECT state FROM task_instance WHERE id = '{ID}'").scalar()
        conn.exec_driver_sql(f"UPDATE task_instance SET state='running', end_date=NULL, duration=NULL, next_method=NULL WHERE id = '{ID}'")
    return count, state


def _verdicts(db, shapes, *before):
    return {name: _write(db, sql, *before) for name, sql, _ in shapes}


def _expect(db, shapes):
    sees = sees_statement(db)
    return {name: (1, "running" if verdict == KEPT and sees else "skipped") for name, _, verdict in shapes}


@pytest.mark.parametrize("mode", ["ignore", "raise"])
def test_the_statement_tells_set_state_from_a_tasks_own_finish(mysql_db, mode):
    _seed(mysql_db)
    assert _verdicts(mysql_db, SHAPES) == {name: (1, "skipped") for name, _, _ in SHAPES}  # without the guard
    mysql_db.install(mode=mode)
    assert _verdicts(mysql_db, SHAPES) == _expect(mysql_db, SHAPES)


def test_ansi_quotes_name_next_method_in_double_quotes(mysql_db):
    _seed(mysql_db)
    ansi = "SET SESSION sql_mode = CONCAT(@@SESSION.sql_mode, ',ANSI_QUOTES')"
    shapes = [
        ("finish, ANSI_QUOTES", f'UPDATE task_instance SET state=\'skipped\', end_date={END}, "next_method"=NULL {WHERE}', THROUGH),
        ("set_state, ANSI_QUOTES", f'UPDATE "task_instance" SET "state"=\'skipped\', "end_date"={END} WHERE "id" = \'{ID}\'', KEPT),
    ]
    assert _verdicts(mysql_db, shapes, ansi) == {name: (1, "skipped") for name, _, _ in shapes}
    mysql_db.install()
    assert _verdicts(mysql_db, shapes, ansi) == _expect(mysql_db, shapes)


def test_server_side_prepared_statements_keep_their_column_list(mysql_db):
    """On Oracle MySQL, EXECUTE's level-0 text is the prepared text, with `?` placeholders: the
    columns are all there. MariaDB (performance_schema ON, measured on 10.11) shows `EXECUTE st USING
    ...`: no column list, so the write goes through."""
    _seed(mysql_db)
    setup = ("SET @s = 'skipped', @e = '2026-12-04 10:00:00', @i = '" + ID + "'",)
    prepared = [
        ("prepared set_state", "PREPARE st FROM 'UPDATE task_instance SET state = ?, end_date = ?, duration = 1.0 WHERE id = ?'", KEPT),
        ("prepared finish", "PREPARE st FROM 'UPDATE task_instance SET state = ?, end_date = ?, next_method = NULL WHERE id = ?'", THROUGH),
    ]
    execute = "EXECUTE st USING @s, @e, @i"
    got = {name: _write(mysql_db, execute, *setup, sql) for name, sql, _ in prepared}
    assert got == {name: (1, "skipped") for name, _, _ in prepared}
    mysql_db.install()
    got = {name: _write(mysql_db, execute, *setup, sql) for name, sql, _ in prepared}
    with mysql_db.engine.connect() as conn:
        mariadb = "mariadb" in conn.exec_driver_sql("SELECT VERSION()").scalar().lower()
    assert got == _expect(mysql_db, [(n, sql, THROUGH if mariadb else v) for n, sql, v in prepared])


def test_a_statement_from_a_stored_routine_goes_through(mysql_db):
    """The client's statement is the CALL: no column list to read, so set_state's shape goes through."""
    _seed(mysql_db)
    mysql_db.sql(f"CREATE PROCEDURE scheduler_skips() {SET_STATE}")
    assert _write(mysql_db, "CALL scheduler_skips()") == (1, "skipped")
    mysql_db.install()
    assert _write(mysql_db, "CALL scheduler_skips()") == (1, "skipped")
    assert _write(mysql_db, SET_STATE) == _expect(mysql_db, SHAPES[:1])[SHAPES[0][0]]


def test_a_thread_performance_schema_does_not_instrument_goes_through(mysql_db):
    """The consumer disabled for one thread (performance_schema.threads INSTRUMENTED='NO', this
    session only): no statement event, no signal."""
    _seed(mysql_db)
    mysql_db.install()
    unrecorded = "UPDATE performance_schema.threads SET INSTRUMENTED = 'NO' WHERE PROCESSLIST_ID = CONNECTION_ID()"
    assert _write(mysql_db, SET_STATE, unrecorded) == (1, "skipped")
    assert _write(mysql_db, SET_STATE) == _expect(mysql_db, SHAPES[:1])[SHAPES[0][0]]


def test_status_and_doctor_say_whether_set_state_skip_sees_the_statement(mysql_db, capsys):
    _seed(mysql_db)
    mysql_db.install()
    capsys.readouterr()
    assert mysql_db.cli("status") == 0
    status = capsys.readouterr().out
    assert mysql_db.cli("doctor") in (0, 1)
    doctor = capsys.readouterr().out
    with mysql_db.engine.connect() as conn:
        gap = statement_signal.gap(conn)
    if sees_statement(mysql_db):
        assert gap is None and "performance_schema" not in status, status
        assert "[ok]   statement: performance_schema records the client's statement" in doctor, doctor
    else:  # MariaDB's default: performance_schema OFF (with it ON: the consumer events_statements_current off)
        line = [x.strip() for x in status.splitlines() if "performance_schema" in x]
        assert line == [gap] and "set_state_skip lets" in gap and "; fix: " in gap, status
        assert f"statement: {gap}" in doctor, doctor


def test_an_installing_account_that_cannot_read_performance_schema_is_told_the_grant(mysql_db, capsys):
    """The trigger reads performance_schema as its DEFINER: an installing account without SELECT on
    the two tables gets a guard whose set_state_skip goes through, and status names the GRANT."""
    _seed(mysql_db)
    with mysql_db.account(("ALL PRIVILEGES",), database_wide=True) as url, mysql_db.trusting_function_creators():
        assert cli.main(["install", "--url", url]) == 0
        assert _write(mysql_db, SET_STATE) == (1, "skipped")
        capsys.readouterr()
        assert cli.main(["status", "--url", url]) == 0
        out = capsys.readouterr().out
        if mysql_db.server == "mysql9":
            assert "cannot read performance_schema.events_statements_current and performance_schema.threads" in out, out
            assert "GRANT SELECT ON performance_schema.events_statements_current TO" in out, out
            name = sa.engine.make_url(url).username
            for t in ("events_statements_current", "threads"):
                mysql_db.sql(f"GRANT SELECT ON performance_schema.{t} TO `{name}`@'%'")
            assert _write(mysql_db, SET_STATE) == (1, "running")  # the grant, followed: no reinstall needed
            assert cli.main(["status", "--url", url]) == 0
            assert "performance_schema" not in capsys.readouterr().out
