"""Engines and per-connection settings shared by the migrations, the CLI and the tests."""

from __future__ import annotations

import math
import os
import random
import time
import uuid
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from .render import dialect_name


def make_engine(url: str, writes: bool = False, **kw) -> sa.Engine:
    """An engine that opens a fresh connection per use; on SQLite, DDL joins the transaction.

    writes: on SQLite, take the write lock when the transaction begins (BEGIN IMMEDIATE), which
    waits in the busy timeout; a transaction that reads first and then writes gets SQLITE_BUSY at
    once whenever another connection is writing, and a busy Airflow is always writing.
    """
    dialect = dialect_name(sa.engine.make_url(url).drivername)
    connect_args = {"connect_timeout": 5} if dialect in ("postgresql", "mysql") else {}
    engine = sa.create_engine(url, poolclass=kw.pop("poolclass", NullPool), connect_args=connect_args, **kw)
    if dialect == "sqlite":
        # pysqlite commits DDL on its own; let SQLAlchemy's BEGIN cover it so that an
        # install that fails half-way leaves nothing behind (SQLAlchemy's documented recipe).
        @sa.event.listens_for(engine, "connect")
        def _autocommit_driver(dbapi_conn, _record):
            dbapi_conn.isolation_level = None

        @sa.event.listens_for(engine, "begin")
        def _begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE" if writes else "BEGIN")

    return engine


@contextmanager
def scratch_database(server_url: str, prefix: str):
    """A uniquely named, empty database on the server `server_url` names; yields its URL and drops
    it afterwards. For the harnesses, benchmarks and test suites, never for Airflow's database."""
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = make_engine(server_url, isolation_level="AUTOCOMMIT")
    quoted = admin.dialect.identifier_preparer.quote(name)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {quoted}")
        yield sa.engine.make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        # FORCE: a harness that failed may leave a connection open (PostgreSQL 13+).
        force = " WITH (FORCE)" if admin.dialect.name == "postgresql" else ""
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {quoted}{force}")
        admin.dispose()


def effective_lock_timeout(dialect: str, seconds: float) -> float:
    # MySQL's lock_wait_timeout (metadata locks) is whole seconds, at least 1.
    return max(1, math.ceil(seconds)) if dialect == "mysql" else seconds


def lock_timeout_statement(dialect: str, seconds: float) -> str | None:
    """Caps how long DDL waits for task_instance's lock, so writers never queue long behind it."""
    if dialect == "postgresql":
        return f"SET lock_timeout = '{int(seconds * 1000)}ms'"
    if dialect == "mysql":
        return f"SET SESSION lock_wait_timeout = {effective_lock_timeout(dialect, seconds):g}"
    if dialect == "sqlite":
        return f"PRAGMA busy_timeout = {int(seconds * 1000)}"
    return None


def with_lock_retries(engine: sa.Engine, settings, work):
    """Run work(conn) on a connection with a short lock timeout; retry when the lock is busy.

    Each attempt either commits whole or, on PostgreSQL and SQLite, leaves nothing; on MySQL a
    retried attempt picks up where the last one stopped, because installing is a reconcile.
    """
    from .errors import LockTimeout, explain

    dialect = dialect_name(engine.dialect.name)
    attempt = 0
    while True:
        attempt += 1
        try:
            with engine.connect() as conn:
                statement = lock_timeout_statement(dialect, settings.lock_timeout)
                if statement:
                    conn.exec_driver_sql(statement)
                    conn.commit()
                return work(conn)
        except Exception as exc:  # noqa: BLE001 - every failure becomes one line
            error = explain(exc, settings.policy.table)
            if isinstance(error, LockTimeout) and attempt < settings.lock_retries:
                # Back off with jitter so a retry does not meet the same burst of writers.
                time.sleep(min(10.0, 0.5 * 2 ** (attempt - 1)) * (0.5 + random.random()))
                continue
            if isinstance(error, LockTimeout):
                error = LockTimeout(f"{error} (gave up after {attempt} attempts of {effective_lock_timeout(dialect, settings.lock_timeout):g}s)")
            raise error from None


def run_sql(conn: sa.Connection, sql: str):
    """Execute SQL text as it is written: no bind parameters, '%' left alone.

    psycopg and PyMySQL read '%' as a placeholder even with no parameters, and a function
    body uses format('%s', ...); doubling it is how the text reaches the server unchanged.
    """
    if conn.dialect.paramstyle in ("format", "pyformat"):
        sql = sql.replace("%", "%%")
    return conn.exec_driver_sql(sql)
