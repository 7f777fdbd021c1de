"""The operator override, for deliberate repairs: it lasts as long as the transaction that sets it.

PostgreSQL: SET LOCAL ti_guard.bypass = 'on' (set_config(..., true)), gone at commit or rollback.
MySQL: @ti_guard_bypass must hold the current InnoDB transaction's id (see render/mysql.py).
SQLite: no setting is needed: SQLite has one writer at a time and transactional DDL, so the
guard's triggers are dropped and put back inside the repair's own transaction; no other
connection ever sees the table without them.
"""

from __future__ import annotations

from contextlib import contextmanager

import sqlalchemy as sa

from . import catalog
from .errors import GuardError
from .policy import AIRFLOW_STATES, Policy
from .render import dialect_name
from .render.mysql import CURRENT_TRX_ID, INNODB_TRX_CACHE_SECONDS


@contextmanager
def bypass(conn: sa.Connection, policy: Policy):
    """Lift the guard for the rest of the caller's open transaction on `conn`."""
    dialect = dialect_name(conn.dialect.name)
    if dialect == "postgresql":
        conn.execute(sa.text("SELECT set_config('ti_guard.bypass', 'on', true)"))
        yield
    elif dialect == "mysql":
        # A locking read makes the transaction read-write, which is when InnoDB gives it the id
        # it keeps to the end; the wait lets INNODB_TRX's 100 ms cache catch up with it.
        settings = catalog.settings_table(policy)
        conn.execute(sa.select(settings.c.id).with_for_update())
        conn.execute(sa.text(f"DO SLEEP({INNODB_TRX_CACHE_SECONDS})"))
        conn.exec_driver_sql(f"SET @ti_guard_bypass = ({CURRENT_TRX_ID})")
        try:
            yield
        finally:
            conn.exec_driver_sql("SET @ti_guard_bypass = NULL, @ti_guard_bypass_at = NULL")
    else:
        triggers = catalog.read(conn, policy)
        for name in triggers:
            conn.exec_driver_sql(f"DROP TRIGGER {conn.dialect.identifier_preparer.quote(name)}")
        yield
        for obj in triggers.values():
            conn.exec_driver_sql(obj.definition)


def set_state(engine: sa.Engine, policy: Policy, dag_id, task_id, run_id, map_index, state) -> str:
    """Write one task instance's state past the guard, in one transaction; returns what changed."""
    if state not in AIRFLOW_STATES:
        raise GuardError(f"unknown state {state!r}: use one of {', '.join(AIRFLOW_STATES)}")
    table = sa.Table(
        policy.table,
        sa.MetaData(),
        *(sa.Column(c, sa.String) for c in ("dag_id", "task_id", "run_id", "state")),
        sa.Column("map_index", sa.Integer),
        schema=policy.db_schema,
    )
    key = (table.c.dag_id == dag_id) & (table.c.task_id == task_id) & (table.c.run_id == run_id) & (table.c.map_index == map_index)
    with engine.begin() as conn:
        old = conn.execute(sa.select(table.c.state).where(key).with_for_update()).first()
        if old is None:
            raise GuardError(
                f"no task instance dag_id={dag_id} task_id={task_id} run_id={run_id} map_index={map_index}: check the ids (map_index is -1 for an unmapped task)"
            )
        with bypass(conn, policy):
            conn.execute(sa.update(table).where(key).values(state=state))
    return f"{dag_id}.{task_id} run_id={run_id} map_index={map_index}: {old.state} -> {state}"
