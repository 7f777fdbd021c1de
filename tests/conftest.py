"""Real servers, fresh databases: PostgreSQL, MariaDB, Oracle MySQL 9.7 and SQLite files.

Backend ids (in test ids and the docs' tables): `postgresql`, `mysql` (MariaDB 10.11, the
distribution's MySQL), `mysql9` (Oracle MySQL 9.7, started by tests/servers/mysql97.sh), `sqlite`.
`DB.backend` is the dialect (MariaDB and MySQL are both `mysql`: ti-guard renders the same SQL for
them); `DB.server` is the backend id.

Each test session creates uniquely named databases and drops them at the end; each test
starts from an empty one. A server that cannot be reached fails the run: it is never a skip.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass

import pytest
import sqlalchemy as sa

from ti_guard import airflow_writes as aw
from ti_guard import cli, statement_signal
from ti_guard.airflow_shape import task_instance_table
from ti_guard.db import make_engine, run_sql
from ti_guard.render import Quoter

PG_URL = os.environ.get("TI_GUARD_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
# ssl_disabled: PyMySQL builds a TLS context for every new connection, which dominated the MySQL tests.
MYSQL_URL = os.environ.get("TI_GUARD_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test?ssl_disabled=true")
# Oracle MySQL 9.7 on 3307 (tests/servers/mysql97.sh), with its defaults: binary logging on, strict mode.
MYSQL9_URL = os.environ.get("TI_GUARD_TEST_MYSQL9_URL", "mysql+pymysql://root@127.0.0.1:3307/test?ssl_disabled=true")
SERVER_URLS = {"postgresql": PG_URL, "mysql": MYSQL_URL, "mysql9": MYSQL9_URL}
SERVERS = tuple(SERVER_URLS)
BACKENDS = (*SERVERS, "sqlite")
MYSQL_SERVERS = ("mysql", "mysql9")


def dialect_of(server: str) -> str:
    """The SQLAlchemy dialect behind a backend id: MariaDB and MySQL are both `mysql`."""
    return "mysql" if server in MYSQL_SERVERS else server


SESSION = f"ti_guard_t{os.getpid()}_{uuid.uuid4().hex[:6]}"


def one_line_error(capsys, *needles) -> str:
    """The CLI's promise for bad input: one line on stderr that names the cause (and the fix)."""
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("ti-guard: error: "), err
    for needle in needles:
        assert needle in err, err
    return err


def racy_skip_of_a_finished_row(engine, table) -> tuple[str | None, str]:
    """A finished task, then the pre-fix skip writer at it: (the error it met or None, the state that stays)."""
    with engine.begin() as conn:
        conn.execute(table.delete())
        conn.execute(table.insert().values(**_row(table, task_id="t", state="success")))
    try:
        with engine.begin() as conn:
            conn.execute(aw.racy_skip(table, "d", "r", [("t", -1)]))
        error = None
    except sa.exc.DBAPIError as exc:
        error = str(exc.orig)
    with engine.connect() as conn:
        return error, conn.execute(sa.select(table.c.state)).scalar()


def _row(table, **values) -> dict:
    """A task instance of run r of DAG d; Airflow 2 tables have no id."""
    # hex: a reflected Airflow id on MySQL is CHAR(32) (SQLAlchemy's Uuid), which takes no dashes
    row = dict(id=uuid.uuid4().hex, dag_id="d", run_id="r", try_number=1, **values)
    return {k: v for k, v in row.items() if k in table.c}


def seed_and_skip(engine, table) -> str:
    """A finished task, then the pre-fix skip writer at it; returns the state that stays."""
    error, state = racy_skip_of_a_finished_row(engine, table)
    assert error is None or "ti_guard: refused" in error, error
    return state


def ordinary_writes_go_through(engine, table) -> None:
    """Airflow's own writes to a task instance of its own (a worker starts it, heartbeats, the task
    finishes itself, skipped), each counting its row and landing; the row is removed afterwards."""
    key = aw.key_of(table, "d", "ordinary", "r")
    with engine.begin() as conn:
        conn.execute(table.insert().values(**_row(table, task_id="ordinary", state="queued")))
    try:
        # Airflow 2 heartbeats its job row, not the task instance.
        heartbeat = [(aw.heartbeat, "running")] if "last_heartbeat_at" in table.c else []
        for write, state in ((aw.worker_start, "running"), *heartbeat, (lambda t, k: aw.finish(t, k, "skipped"), "skipped")):
            with engine.begin() as conn:
                assert conn.execute(write(table, key)).rowcount == 1
                assert conn.execute(sa.select(table.c.state).where(key)).scalar() == state
    finally:
        with engine.begin() as conn:
            conn.execute(table.delete().where(key))


def sees_statement(db) -> bool:
    """Whether set_state_skip can tell its writer on Airflow 3 tables: PostgreSQL always; MySQL where
    performance_schema records the client's statement. MySQL 9.7 does by default and must here (so a
    test expecting the signal there can fail); MariaDB's default is performance_schema OFF."""
    if db.backend != "mysql":
        return db.backend == "postgresql"
    with db.engine.connect() as conn:
        gap = statement_signal.gap(conn)
    assert gap is None or db.server != "mysql9", gap
    return gap is None


def _admin(url):
    engine = make_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except sa.exc.DBAPIError as exc:
        pytest.fail(f"cannot reach {url}: {exc.orig}; start the server (see README) - a backend is never skipped", pytrace=False)
    return engine


@pytest.fixture(scope="session")
def server_dbs():
    """One database per server for this session, named uniquely, dropped at the end."""
    made = {}
    for name, url in SERVER_URLS.items():
        admin = _admin(url)
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {SESSION}")
            conn.exec_driver_sql(f"CREATE DATABASE {SESSION}")
        made[name] = (admin, sa.engine.make_url(url).set(database=SESSION).render_as_string(hide_password=False))
    yield {name: url for name, (_, url) in made.items()}
    for admin, _ in made.values():
        with admin.connect() as conn:
            if admin.dialect.name == "postgresql":
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {SESSION} WITH (FORCE)")
            else:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {SESSION}")
        admin.dispose()


@dataclass
class DB:
    backend: str  # the dialect: postgresql, mysql (MariaDB or MySQL), sqlite
    url: str
    engine: sa.Engine
    server: str  # the backend id: postgresql, mysql (MariaDB), mysql9 (MySQL 9.7), sqlite

    def table(self, shape="3.x", schema=None, name="task_instance") -> sa.Table:
        table = task_instance_table(sa.MetaData(), shape, schema=schema, name=name)
        table.metadata.create_all(self.engine)
        return table

    def cli(self, *args, url=True) -> int:
        return cli.main([*args, *(["--url", self.url] if url else [])])

    def install(self, mode="raise", **kw) -> None:
        extra = [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
        assert self.cli("install", f"--mode={mode}", *extra) == 0

    def sql(self, text: str):
        with self.engine.begin() as conn:
            return run_sql(conn, text)

    def binlog(self) -> tuple[int, int]:
        """MySQL/MariaDB: (@@log_bin, @@log_bin_trust_function_creators). MySQL 8+ logs by default, MariaDB does not."""
        with self.engine.connect() as conn:
            return tuple(conn.exec_driver_sql("SELECT @@log_bin, @@log_bin_trust_function_creators").one())

    @contextlib.contextmanager
    def trusting_function_creators(self):
        """With binary logging on, an account without SUPER may create triggers only while
        log_bin_trust_function_creators=1 (doctor's advice); set for the block, then put back."""
        log_bin, trust = self.binlog()
        if not log_bin or trust:
            yield
            return
        self.sql("SET GLOBAL log_bin_trust_function_creators = 1")
        try:
            yield
        finally:
            self.sql("SET GLOBAL log_bin_trust_function_creators = 0")

    @contextlib.contextmanager
    def account(self, privileges=("SELECT", "UPDATE"), password=None, database_wide=False):
        """A login of its own holding only `privileges` on task_instance (or on every table);
        yields its URL, drops it afterwards. Names and passwords go through the dialect's quoting."""
        name = f"{SESSION}_{uuid.uuid4().hex[:4]}"
        dialect = self.engine.dialect
        secret = Quoter(dialect, None).literal(password or "")
        if self.backend == "postgresql":
            who = dialect.identifier_preparer.quote(name)
            target = "ALL TABLES IN SCHEMA public" if database_wide else "TABLE task_instance"
            setup = [f"CREATE ROLE {who} LOGIN PASSWORD {secret}", f"GRANT USAGE ON SCHEMA public TO {who}"]
            teardown = [f"REVOKE ALL ON {target} FROM {who}", f"REVOKE ALL ON SCHEMA public FROM {who}", f"DROP ROLE {who}"]
        else:
            who = f"{dialect.identifier_preparer.quote(name)}@'%'"
            database = dialect.identifier_preparer.quote(SESSION)
            target = f"{database}.*" if database_wide else f"{database}.task_instance"
            setup = [f"CREATE USER {who} IDENTIFIED BY {secret}"]
            teardown = [f"DROP USER IF EXISTS {who}"]
        for statement in [*setup, f"GRANT {', '.join(privileges)} ON {target} TO {who}"]:
            self.sql(statement)
        try:
            yield sa.engine.make_url(self.url).set(username=name, password=password).render_as_string(hide_password=False)
        finally:
            for statement in teardown:
                self.sql(statement)


def _reset(backend, url, tmp_path):
    backend = dialect_of(backend)
    if backend == "sqlite":
        # An empty database, as on the servers: ti-guard refuses a SQLite URL naming no file.
        (tmp_path / "airflow.db").touch()
        return f"sqlite:///{tmp_path / 'airflow.db'}"
    admin = make_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        if backend == "postgresql":
            for (schema,) in conn.exec_driver_sql(
                "SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%%' AND nspname <> 'information_schema'"
            ).all():
                conn.exec_driver_sql(f"DROP SCHEMA {conn.dialect.identifier_preparer.quote_schema(schema)} CASCADE")
            conn.exec_driver_sql("CREATE SCHEMA public")
        else:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {SESSION}")
            conn.exec_driver_sql(f"CREATE DATABASE {SESSION}")
    admin.dispose()
    return url


def pytest_generate_tests(metafunc):
    # `db`: every backend; `server_db`: the servers only (a test about servers); `mysql_db`: MariaDB and MySQL.
    if "pg_db" in metafunc.fixturenames:
        metafunc.parametrize("backend", ("postgresql",))
    elif "mysql_db" in metafunc.fixturenames:
        metafunc.parametrize("backend", MYSQL_SERVERS)
    elif "server_db" in metafunc.fixturenames:
        metafunc.parametrize("backend", SERVERS)
    elif "db" in metafunc.fixturenames:
        metafunc.parametrize("backend", BACKENDS)


@pytest.fixture
def db(backend, server_dbs, tmp_path):
    url = _reset(backend, server_dbs.get(backend), tmp_path)
    engine = make_engine(url)
    yield DB(dialect_of(backend), url, engine, backend)
    engine.dispose()


@pytest.fixture
def server_db(db):
    return db


@pytest.fixture
def pg_db(db):
    return db


@pytest.fixture
def mysql_db(db):
    return db
