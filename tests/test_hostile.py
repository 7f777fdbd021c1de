"""Hostile and odd input: names that need quoting, odd passwords, injection attempts, weak accounts.

Each case either works exactly as with plain input or ends in one line naming the cause, with
the database as it was. The "Hostile and wrong input" table of docs/operations.md lists these cases.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from conftest import one_line_error, seed_and_skip
from ti_guard import catalog, cli
from ti_guard.airflow_shape import task_instance_table
from ti_guard.policy import Policy

ODD = 'Air "flow".Meta Data'
ODD_TABLE = "Task 'Instance\".x"
INJECTION = "running'); DROP TABLE task_instance; --"


@pytest.fixture
def odd_place(db):
    """task_instance under a name and (PostgreSQL, MySQL) a schema that need every kind of quoting."""
    prep = db.engine.dialect.identifier_preparer
    schema = None if db.backend == "sqlite" else ODD
    if db.backend == "postgresql":
        db.sql(f"CREATE SCHEMA {prep.quote_schema(ODD)}")
    elif db.backend == "mysql":
        db.sql(f"DROP DATABASE IF EXISTS {prep.quote_schema(ODD)}")
        db.sql(f"CREATE DATABASE {prep.quote_schema(ODD)}")
    table = task_instance_table(sa.MetaData(), "3.x", schema=schema, name=ODD_TABLE)
    table.metadata.create_all(db.engine)
    yield schema, table
    if db.backend == "mysql":
        db.sql(f"DROP DATABASE {prep.quote_schema(ODD)}")


def test_names_with_quotes_spaces_dots_and_upper_case(db, odd_place, capsys):
    schema, table = odd_place
    where = ([f"--schema={schema}"] if schema else []) + [f"--table={ODD_TABLE}"]
    assert seed_and_skip(db.engine, table) == "skipped"  # without the guard: overwritten
    assert db.cli("install", *where) == 0
    assert seed_and_skip(db.engine, table) == "success"
    assert db.cli("status", *where) == 0
    capsys.readouterr()
    assert db.cli("report", *where, "--format=json") == 0  # the record sits beside the odd table
    assert [(c["old_state"], c["refusals"]) for c in json.loads(capsys.readouterr().out)["totals"]] == [("success", 1)]
    assert db.cli("uninstall", *where) == 0
    with db.engine.connect() as conn:
        assert catalog.read(conn, Policy.build(schema=schema, table=ODD_TABLE)) == {}
    assert seed_and_skip(db.engine, table) == "skipped"


PASSWORD = "p@ss:w/rd%40 \"q' ;--\\x"


def test_password_that_needs_url_quoting(server_db, capsys):
    """MariaDB checks the password; PostgreSQL here trusts 127.0.0.1, so there only the URL's parsing is tested."""
    table = server_db.table()
    trusting = server_db.trusting_function_creators() if server_db.backend == "mysql" else contextlib.nullcontext()
    with server_db.account(("ALL PRIVILEGES",), password=PASSWORD, database_wide=server_db.backend == "mysql") as url, trusting:
        if server_db.backend == "postgresql":
            server_db.sql(f"ALTER TABLE task_instance OWNER TO {sa.engine.make_url(url).username}")
            server_db.sql(f"GRANT CREATE ON SCHEMA public TO {sa.engine.make_url(url).username}")
        wrong = sa.engine.make_url(url).set(password="wrong").render_as_string(hide_password=False)
        if server_db.backend == "mysql":
            assert cli.main(["status", "--url", wrong]) == 3  # the password is really checked
        assert cli.main(["install", "--url", url]) == 0
        assert cli.main(["status", "--url", url]) == 0
        assert seed_and_skip(server_db.engine, table) == "success"
        assert cli.main(["uninstall", "--url", url]) == 0
        if server_db.backend == "postgresql":
            server_db.sql("ALTER TABLE task_instance OWNER TO postgres")
            server_db.sql(f"REVOKE CREATE ON SCHEMA public FROM {sa.engine.make_url(url).username}")
    out = capsys.readouterr()
    assert "p@ss" not in out.out + out.err and "***" in out.out


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("route", ["--protect", "TI_GUARD_PROTECT", "alembic -x protect"])
def test_injection_in_the_protected_states(db, capsys, route):
    db.table()
    if route == "--protect":
        assert db.cli("install", f"--protect={INJECTION}") == 2
        err = one_line_error(capsys)
    elif route == "TI_GUARD_PROTECT":
        os.environ["TI_GUARD_PROTECT"] = INJECTION
        try:
            assert db.cli("install") == 2
        finally:
            del os.environ["TI_GUARD_PROTECT"]
        err = one_line_error(capsys)
    else:
        result = subprocess.run(
            [sys.executable, "-m", "alembic", "-c", str(ROOT / "alembic.ini"), "-x", f"url={db.url}", "-x", f"protect={INJECTION}", "upgrade", "head"],
            capture_output=True, text=True, cwd=ROOT,
        )
        assert result.returncode != 0
        err = (result.stdout + result.stderr).strip().splitlines()[-1]
    assert "unknown task state(s) in protect list" in err, err
    with db.engine.connect() as conn:
        assert sa.inspect(conn).has_table("task_instance")
        assert catalog.read(conn, Policy()) == {}
        assert not [t for t in sa.inspect(conn).get_table_names() if t.startswith("ti_guard")]


def test_injection_in_the_schema_name(pg_db, capsys):
    pg_db.table()
    assert pg_db.cli("install", '--schema=public"; DROP TABLE task_instance; --') == 2
    one_line_error(capsys, "no table 'task_instance' in schema")
    with pg_db.engine.connect() as conn:
        assert sa.inspect(conn).has_table("task_instance") and catalog.read(conn, Policy()) == {}


def test_read_only_account(server_db, capsys):
    """SELECT only: install fails in one line and makes nothing; status still answers."""
    server_db.table()
    with server_db.account(("SELECT",)) as url:
        assert cli.main(["install", "--url", url]) == 2
        one_line_error(capsys, "lacks a privilege")
    with server_db.engine.connect() as conn:
        assert catalog.read(conn, Policy()) == {}
        assert not [t for t in sa.inspect(conn).get_table_names() if t.startswith("ti_guard")]
    server_db.install()
    with server_db.account(("SELECT",), database_wide=True) as url:  # a monitoring account
        code = cli.main(["status", "--url", url])
        out = capsys.readouterr().out
    if server_db.backend == "postgresql":
        assert code == 0, out
    else:
        # MySQL shows a table's triggers only to holders of TRIGGER: "missing" would be a lie.
        assert code == 3 and "hidden from this account" in out, out


def test_read_only_connection(pg_db, capsys):
    pg_db.table()
    url = sa.engine.make_url(pg_db.url).update_query_dict({"options": "-c default_transaction_read_only=on"})
    assert cli.main(["install", "--url", url.render_as_string(hide_password=False)]) == 2
    one_line_error(capsys, "read-only", "connect to the primary")
    with pg_db.engine.connect() as conn:
        assert catalog.read(conn, Policy()) == {}
        assert not [t for t in sa.inspect(conn).get_table_names() if t.startswith("ti_guard")]
