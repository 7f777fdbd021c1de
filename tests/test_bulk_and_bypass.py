"""Bulk statements that mix guarded and unguarded rows, and the operator override."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

import pytest
import sqlalchemy as sa

from ti_guard import airflow_writes as aw
from ti_guard.policy import Policy
from ti_guard.runtime import bypass

T0 = datetime(2026, 11, 23, 10, 0, 0, 123456, tzinfo=timezone.utc)
STATES = {"a": "running", "b": "success", "c": "failed", "d": None, "e": "queued", "f": "scheduled"}
GUARDED = {"a", "b", "c"}


def _seed(db, table):
    with db.engine.begin() as conn:
        conn.execute(table.delete())
        for task, state in STATES.items():
            conn.execute(
                table.insert().values(
                    id=str(uuid.uuid4()), dag_id="d", run_id="r", task_id=task, map_index=-1, state=state,
                    start_date=T0 if state else None, try_number=1,
                )
            )


def _states(db, table):
    with db.engine.connect() as conn:
        return dict(conn.execute(sa.select(table.c.task_id, table.c.state)).all())


def _racy(table, task):
    """The pre-fix skip route over one task instance: what the guard refuses."""
    return aw.racy_skip(table, "d", "r", [(task, -1)])


def _skip_all(db, table):
    with db.engine.begin() as conn:
        conn.execute(aw.racy_skip(table, "d", "r", [(t, -1) for t in STATES]))


@pytest.mark.parametrize("mode", ["raise", "ignore"])
def test_bulk_statement_mixing_guarded_and_unguarded_rows(db, mode):
    table = db.table()
    _seed(db, table)
    _skip_all(db, table)
    assert set(_states(db, table).values()) == {"skipped"}  # without the guard: all six overwritten
    db.install(mode=mode)
    _seed(db, table)
    if mode == "raise":
        with pytest.raises(sa.exc.DBAPIError, match="ti_guard: refused"):
            _skip_all(db, table)
        assert _states(db, table) == STATES  # the whole statement failed
    else:
        _skip_all(db, table)
        after = _states(db, table)
        assert {t: after[t] for t in GUARDED} == {t: STATES[t] for t in GUARDED}
        assert {after[t] for t in STATES if t not in GUARDED} == {"skipped"}


def test_bypass_lasts_one_transaction(db):
    table = db.table()
    db.install()
    _seed(db, table)
    policy = Policy.build()
    with db.engine.connect() as conn:
        with conn.begin():
            with bypass(conn, policy):
                conn.execute(_racy(table, "b"))
        assert _states(db, table)["b"] == "skipped"  # the deliberate repair went through
        # Same connection, next transaction: guarded again.
        with pytest.raises(sa.exc.DBAPIError, match="ti_guard: refused"):
            with conn.begin():
                conn.execute(_racy(table, "c"))
    assert _states(db, table)["c"] == "failed"


def test_postgresql_set_local_is_the_documented_override(pg_db):
    server_db = pg_db
    table = server_db.table()
    server_db.install()
    _seed(server_db, table)
    with server_db.engine.connect() as conn:
        with conn.begin():
            conn.exec_driver_sql("SET LOCAL ti_guard.bypass = 'on'")
            conn.execute(_racy(table, "a"))
        with pytest.raises(sa.exc.DBAPIError, match="ti_guard: refused"):
            with conn.begin():
                conn.execute(_racy(table, "b"))
    assert _states(server_db, table)["a"] == "skipped"


def test_set_state_command_repairs_one_row(db, capsys):
    table = db.table()
    db.install()
    _seed(db, table)
    with pytest.raises(sa.exc.DBAPIError):
        with db.engine.begin() as conn:
            conn.execute(_racy(table, "b"))
    rc = db.cli("set-state", "--dag-id", "d", "--task-id", "b", "--run-id", "r", "--state", "skipped")
    assert rc == 0 and "success -> skipped" in capsys.readouterr().out
    assert _states(db, table) == {**STATES, "b": "skipped"}
    assert db.cli("set-state", "--dag-id", "d", "--task-id", "nope", "--run-id", "r", "--state", "skipped") == 2
