"""An observer of task_instance that does not rely on the guard: an AFTER UPDATE trigger and a log table.

The trigger runs in the writer's own transaction, so only committed writes stay in the log;
it records every change of state, and every row a racy writer's statement (the skip writer's
or the schedule writer's) touched even when the state did not change (a row the guard keeps is
rewritten as it was: MySQL sets NEW to OLD, PostgreSQL returns OLD). Each connection tags
itself (`tag`) so that the log tells the racy writers from the workers.
"""

from __future__ import annotations

import sqlalchemy as sa

from ti_guard.render import dialect_name

LOG = "race_observed"
TRIGGER = "race_observer"
SKIP_WRITER = "skip"
SCHEDULE_WRITER = "schedule"
WORKER = "worker"
# Writers whose every touched row is logged, changed or not.
RACY_WRITERS = (SKIP_WRITER, SCHEDULE_WRITER)
_RACY = ", ".join(f"'{w}'" for w in RACY_WRITERS)


def log_table(metadata: sa.MetaData) -> sa.Table:
    return sa.Table(
        LOG,
        metadata,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(250), nullable=False),
        sa.Column("task_id", sa.String(250), nullable=False),
        sa.Column("old_state", sa.String(20)),
        sa.Column("new_state", sa.String(20)),
        sa.Column("start_date_written", sa.Boolean, nullable=False),
        sa.Column("writer", sa.String(16)),
    )


def _sql(dialect: str, table: str, log: str, fn: str, trigger: str) -> list[str]:
    values = (
        "NEW.run_id, NEW.task_id, OLD.state, NEW.state, "
        "{written}, {writer}"
    )
    if dialect == "postgresql":
        row = values.format(written="OLD.start_date IS DISTINCT FROM NEW.start_date", writer="current_setting('race.writer', true)")
        return [
            f"CREATE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $race$\n"
            f"BEGIN\n    INSERT INTO {log} (run_id, task_id, old_state, new_state, start_date_written, writer)\n"
            f"    VALUES ({row});\n    RETURN NULL;\nEND\n$race$",
            f"CREATE TRIGGER {trigger} AFTER UPDATE ON {table} FOR EACH ROW\n"
            f"    WHEN (OLD.state IS DISTINCT FROM NEW.state OR current_setting('race.writer', true) IN ({_RACY}))\n"
            f"    EXECUTE FUNCTION {fn}()",
        ]
    if dialect == "mysql":
        row = values.format(written="NOT (OLD.start_date <=> NEW.start_date)", writer="@race_writer")
        return [
            f"CREATE TRIGGER {trigger} AFTER UPDATE ON {table} FOR EACH ROW\n"
            f"BEGIN\n    IF NOT (OLD.state <=> NEW.state) OR @race_writer IN ({_RACY}) THEN\n"
            f"        INSERT INTO {log} (run_id, task_id, old_state, new_state, start_date_written, writer)\n"
            f"        VALUES ({row});\n    END IF;\nEND"
        ]
    raise ValueError(f"the race observer needs PostgreSQL or MySQL, not {dialect}")


def install(conn: sa.Connection, table: sa.Table) -> sa.Table:
    """Create the log table and the AFTER UPDATE trigger on `table`; returns the log table."""
    log = log_table(sa.MetaData())
    log.create(conn, checkfirst=True)
    prep = conn.dialect.identifier_preparer
    for statement in _sql(dialect_name(conn.dialect.name), prep.format_table(table), prep.format_table(log), prep.quote(TRIGGER + "_fn"), prep.quote(TRIGGER)):
        conn.exec_driver_sql(statement)
    return log


def uninstall(conn: sa.Connection, table: sa.Table) -> None:
    prep = conn.dialect.identifier_preparer
    if dialect_name(conn.dialect.name) == "postgresql":
        conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {prep.quote(TRIGGER)} ON {prep.format_table(table)}")
        conn.exec_driver_sql(f"DROP FUNCTION IF EXISTS {prep.quote(TRIGGER + '_fn')}()")
    else:
        conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {prep.quote(TRIGGER)}")
    log_table(sa.MetaData()).drop(conn, checkfirst=True)


def tag(conn: sa.Connection, writer: str) -> None:
    """Name this connection's writes in the log for the rest of the session."""
    if dialect_name(conn.dialect.name) == "postgresql":
        conn.execute(sa.text("SELECT set_config('race.writer', :w, false)"), {"w": writer})
    else:
        conn.execute(sa.text("SET @race_writer = :w"), {"w": writer})
    conn.commit()


def transitions(conn: sa.Connection) -> dict[tuple, int]:
    """(writer, old_state, new_state, start_date_written) -> how many committed row writes."""
    log = log_table(sa.MetaData())
    rows = conn.execute(
        sa.select(log.c.writer, log.c.old_state, log.c.new_state, log.c.start_date_written, sa.func.count())
        .group_by(log.c.writer, log.c.old_state, log.c.new_state, log.c.start_date_written)
    ).all()
    return {(w, o, n, bool(s)): c for w, o, n, s, c in rows}


def left_running(conn: sa.Connection) -> dict[tuple[str, str], list[str]]:
    """(run_id, task_id) -> the writers of its committed transitions out of running.

    A task instance enters running once (the worker's start, from queued; nothing queues a
    run's TIs twice), so each list should hold one writer: the worker when the task finished
    itself, a racy writer when it took the row from a running task.
    """
    log = log_table(sa.MetaData())
    rows = conn.execute(
        sa.select(log.c.run_id, log.c.task_id, log.c.writer)
        .where(log.c.old_state == "running", sa.or_(log.c.new_state.is_(None), log.c.new_state != "running"))
        .order_by(log.c.id)
    ).all()
    out: dict[tuple[str, str], list[str]] = {}
    for run_id, task_id, writer in rows:
        out.setdefault((run_id, task_id), []).append(writer)
    return out
