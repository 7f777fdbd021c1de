"""What the guard looks like in a database, and what it should look like, for the rollout tests."""

from __future__ import annotations

import contextlib
import functools
import re
import threading
import time

import sqlalchemy as sa

from ti_guard import catalog, installation
from ti_guard.revisions import head_revision
from ti_guard.policy import COUNTS_TABLE, RECORD_TABLE, SETTINGS_TABLE, VERSION_TABLE, Policy


_DDL = re.compile(r"\s*(CREATE|DROP|ALTER)\b", re.I)


def installed(db, policy: Policy = Policy()) -> dict[str, tuple[str, bool]]:
    """name -> (definition, enabled) of every ti_guard object on the table."""
    with db.engine.connect() as conn:
        return {n: (o.definition, o.enabled) for n, o in catalog.read(conn, policy).items()}


def expected(db, policy: Policy) -> dict[str, tuple[str, bool]]:
    return dict(_expected(db.engine, policy))


@functools.lru_cache(maxsize=None)
def _expected(engine, policy):
    # The table's columns do not change during a test, and reading them back is slow on MySQL.
    with engine.connect() as conn:
        columns = catalog.table_columns(conn, policy)
        return tuple((o.name, (o.definition, True)) for o in installation.expected(conn, policy, columns))


def ours(db) -> set[str]:
    """ti-guard's tables in the database."""
    with db.engine.connect() as conn:
        return {t for t in sa.inspect(conn).get_table_names() if t.startswith("ti_guard")}


def complete(db, policies) -> list[Policy]:
    """The policies whose whole guard is in place (every object there, unchanged and enabled)."""
    have = installed(db)
    return [p for p in policies if expected(db, p).items() <= have.items()]


def assert_converged(db, policy: Policy) -> None:
    """Exactly the policy's guard: status current, the objects, the settings record, our four tables."""
    assert db.cli("status") == 0
    assert installed(db) == expected(db, policy)
    with db.engine.connect() as conn:
        settings = catalog.read_settings(conn, policy)
        version = conn.exec_driver_sql(f"SELECT version_num FROM {VERSION_TABLE}").scalars().all()
    assert (settings["mode"], settings["protect"]) == (policy.mode, policy.protect_csv)
    assert settings["definition"] == ",".join(expected(db, policy))
    assert version == [head_revision()]
    assert ours(db) == {SETTINGS_TABLE, VERSION_TABLE, RECORD_TABLE, COUNTS_TABLE}


def assert_nothing(db) -> None:
    assert installed(db) == {} and ours(db) == set()


@contextlib.contextmanager
def statements_sent():
    """[statement, started, ended] of each statement this thread sends while the block runs;
    `ended` stays None for a statement that failed."""
    me, sent = threading.current_thread(), []

    def before(conn, cursor, statement, *args):
        if threading.current_thread() is me:
            sent.append([statement, time.perf_counter(), None])

    def after(conn, cursor, statement, *args):
        if threading.current_thread() is me:
            sent[-1][2] = time.perf_counter()

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", before)
    sa.event.listen(sa.engine.Engine, "after_cursor_execute", after)
    try:
        yield sent
    finally:
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", before)
        sa.event.remove(sa.engine.Engine, "after_cursor_execute", after)


def ddl_given_up(sent) -> list[str]:
    """The DDL statements that failed: with a lock held on the table, one per attempt an install
    gave up on its lock timeout (the CLI's message says which error it was)."""
    return [statement.strip().split("\n")[0][:80] for statement, _, ended in sent if ended is None and _DDL.match(statement)]


@contextlib.contextmanager
def holding_the_table(db, table: sa.Table):
    """A writer in the middle of a long transaction: what an install has to wait for."""
    holder = db.engine.connect()
    holder.begin()
    if db.backend == "postgresql":
        holder.exec_driver_sql(f"LOCK TABLE {holder.dialect.identifier_preparer.format_table(table)} IN ROW EXCLUSIVE MODE")
    else:
        holder.execute(sa.select(table).with_for_update())  # and with it a metadata lock on the table
    try:
        yield holder
    finally:
        holder.rollback()
        holder.close()
