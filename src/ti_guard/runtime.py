"""The operator override, for deliberate repairs: it lasts as long as the transaction that sets it,
and counts only for an account that holds TRIGGER on the guarded table (an account that could drop
the guard anyway; SECURITY.md). For any other account the request changes nothing: the guard goes
on refusing.

PostgreSQL: SET LOCAL ti_guard.bypass = 'on' (set_config(..., true)), gone at commit or rollback.
MySQL: SET @ti_guard_bypass = 'on', reset when the repair ends (a user variable outlives the
transaction; the grant, not the variable, is what the trigger trusts).
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
from .render.mysql import BYPASS_VARIABLE
from .render.postgresql import BYPASS_SETTING


@contextmanager
def bypass(conn: sa.Connection, policy: Policy):
    """Ask the guard to let the rest of the caller's open transaction on `conn` through."""
    dialect = dialect_name(conn.dialect.name)
    if dialect == "postgresql":
        conn.execute(sa.select(sa.func.set_config(BYPASS_SETTING, "on", True)))
        yield
    elif dialect == "mysql":
        conn.exec_driver_sql(f"SET {BYPASS_VARIABLE} = 'on'")
        try:
            yield
        finally:
            conn.exec_driver_sql(f"SET {BYPASS_VARIABLE} = NULL")
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
            try:
                conn.execute(sa.update(table).where(key).values(state=state))
                kept = conn.execute(sa.select(table.c.state).where(key)).scalar() != state
            except sa.exc.DBAPIError as exc:
                if "ti_guard: refused" not in str(exc.orig):
                    raise
                kept = True
        if kept:
            # This account's request for the bypass does not count: the guard refused or kept the row.
            raise GuardError(
                f"the guard kept {dag_id}.{task_id} as {old.state}: the bypass counts only for an account with TRIGGER on "
                f"{policy.table} (SECURITY.md); GRANT TRIGGER ON {policy.table} to the repairing account, or repair as its owner; nothing was changed"
            )
    return f"{dag_id}.{task_id} run_id={run_id} map_index={map_index}: {old.state} -> {state}"
