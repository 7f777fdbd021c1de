"""Real servers, fresh databases: PostgreSQL and MariaDB (standing in for MySQL) and SQLite files.

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

from ti_guard import cli
from ti_guard.airflow_shape import task_instance_table
from ti_guard.db import make_engine, run_sql
from ti_guard.render import Quoter

PG_URL = os.environ.get("TI_GUARD_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
# ssl_disabled: PyMySQL builds a TLS context for every new connection, which dominated the MySQL tests.
MYSQL_URL = os.environ.get("TI_GUARD_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test?ssl_disabled=true")
BACKENDS = ("postgresql", "mysql", "sqlite")
SESSION = f"ti_guard_t{os.getpid()}_{uuid.uuid4().hex[:6]}"


def one_line_error(capsys, *needles) -> str:
    """The CLI's promise for bad input: one line on stderr that names the cause (and the fix)."""
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("ti-guard: error: "), err
    for needle in needles:
        assert needle in err, err
    return err


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
    for name, url in (("postgresql", PG_URL), ("mysql", MYSQL_URL)):
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
    backend: str
    url: str
    engine: sa.Engine

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
    if backend == "sqlite":
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
    # `db`: every backend; `server_db`: PostgreSQL and MySQL only (a test about servers).
    if "pg_db" in metafunc.fixturenames:
        metafunc.parametrize("backend", ("postgresql",))
    elif "mysql_db" in metafunc.fixturenames:
        metafunc.parametrize("backend", ("mysql",))
    elif "server_db" in metafunc.fixturenames:
        metafunc.parametrize("backend", ("postgresql", "mysql"))
    elif "db" in metafunc.fixturenames:
        metafunc.parametrize("backend", BACKENDS)


@pytest.fixture
def db(backend, server_dbs, tmp_path):
    url = _reset(backend, server_dbs.get(backend), tmp_path)
    engine = make_engine(url)
    yield DB(backend, url, engine)
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
