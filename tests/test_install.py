"""Install, upgrade, downgrade, idempotency, status, and the two routes (Alembic, sql/ files) compared."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from ti_guard import airflow_writes as aw

from conftest import ordinary_writes_go_through, racy_skip_of_a_finished_row, seed_and_skip
from ti_guard import catalog, cli
from ti_guard.airflow_shape import task_instance_table
from ti_guard.db import make_engine
from ti_guard.policy import Policy

ROOT = Path(__file__).resolve().parents[1]
ALEMBIC = [sys.executable, "-m", "alembic", "-c", str(ROOT / "alembic.ini")]


def alembic(db, *args, check=True):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TI_GUARD_", "AIRFLOW__"))}
    result = subprocess.run([*ALEMBIC, "-x", f"url={db.url}", *args], capture_output=True, text=True, env=env, cwd=ROOT)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def objects(db, policy=Policy()):
    with db.engine.connect() as conn:
        return catalog.read(conn, policy)


def tables(db):
    with db.engine.connect() as conn:
        return {t for t in sa.inspect(conn).get_table_names() if t.startswith("ti_guard") or t == "alembic_version"}


def _airflow_version_table(db):
    """Airflow's own alembic_version, which ti-guard must never read or write."""
    db.sql("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)")
    db.sql("INSERT INTO alembic_version VALUES ('29ce7909c52b')")


def _airflow_version(db):
    with db.engine.connect() as conn:
        return conn.exec_driver_sql("SELECT version_num FROM alembic_version").all()


@pytest.mark.parametrize("shape", ["3.x", "2.x"])
def test_alembic_upgrade_downgrade_round_trip(db, shape, capsys):
    db.table(shape)
    _airflow_version_table(db)
    assert db.cli("status") == 2  # missing
    alembic(db, "upgrade", "head")
    installed = objects(db)
    assert {o.kind for o in installed.values()} >= {"trigger"}
    assert tables(db) == {"alembic_version", "ti_guard_alembic_version", "ti_guard_settings", "ti_guard_refusals", "ti_guard_refusal_counts"}
    assert db.cli("status") == 0
    alembic(db, "upgrade", "head")  # twice: a no-op
    assert objects(db) == installed
    assert db.cli("install") == 0  # and through the CLI: still the same objects
    assert objects(db) == installed
    alembic(db, "downgrade", "base")
    assert objects(db) == {} and tables(db) == {"alembic_version"}
    alembic(db, "downgrade", "base")  # twice: a no-op
    assert db.cli("uninstall") == 0
    assert objects(db) == {} and tables(db) == {"alembic_version"}
    assert _airflow_version(db) == [("29ce7909c52b",)]
    assert db.cli("status") == 2


def test_alembic_current_history_heads_check_and_stamp(db):
    """What every Alembic user types: read-only commands read, stamp stamps, none crashes."""
    db.table()
    assert alembic(db, "current").stdout == ""
    assert "(head)" in alembic(db, "heads").stdout
    assert "(head)" in alembic(db, "history", "--indicate-current").stdout
    refused = alembic(db, "check", check=False)
    assert refused.returncode != 0 and "not up to date" in refused.stdout + refused.stderr
    assert tables(db) == set()  # the read-only commands created nothing
    alembic(db, "upgrade", "head")
    assert alembic(db, "current").stdout.startswith("0002 (head)")
    assert "(current)" in alembic(db, "history", "--indicate-current").stdout
    assert "No new upgrade operations detected" in alembic(db, "check").stdout
    installed = objects(db)
    alembic(db, "stamp", "base")  # the version row goes (and its table, as after a downgrade); the guard stays
    assert alembic(db, "current").stdout == "" and objects(db) == installed
    assert "ti_guard_alembic_version" not in tables(db)
    alembic(db, "stamp", "head")
    assert alembic(db, "current").stdout.startswith("0002 (head)")
    alembic(db, "downgrade", "base")
    assert objects(db) == {} and tables(db) == set()


def test_mode_switch_replaces_in_place_and_status_tells(db, capsys):
    table = db.table()
    db.install("raise")
    raise_objects = set(objects(db))
    error, state = racy_skip_of_a_finished_row(db.engine, table)
    assert error is not None and "ti_guard: refused" in error and state == "success"  # raise: refused with an error
    db.install("ignore")
    # What the modes render differently (racy_skip's action) is replaced; what they share stays.
    ignore_only = set(objects(db)) - raise_objects
    assert ignore_only and all(name in objects(db) for name in raise_objects & set(objects(db)))
    assert racy_skip_of_a_finished_row(db.engine, table) == (None, "success")  # ignore: kept, no error
    capsys.readouterr()
    assert db.cli("status") == 0
    assert "mode=ignore" in capsys.readouterr().out
    assert db.cli("install") == 0  # without --mode: keeps what is installed
    assert db.cli("status") == 0 and "mode=ignore" in capsys.readouterr().out
    assert racy_skip_of_a_finished_row(db.engine, table) == (None, "success")
    db.install("raise")  # and back
    error, state = racy_skip_of_a_finished_row(db.engine, table)
    assert error is not None and "ti_guard: refused" in error and state == "success"


def test_status_catches_a_dropped_or_disabled_trigger(db, capsys):
    table = db.table()
    db.install()
    trigger = next(o for o in objects(db).values() if o.kind == "trigger")
    drop = {
        "postgresql": f"DROP TRIGGER {trigger.name} ON task_instance",
        "mysql": f"DROP TRIGGER {trigger.name}",
        "sqlite": f"DROP TRIGGER {trigger.name}",
    }[db.backend]
    db.sql(drop)
    capsys.readouterr()
    assert db.cli("status") == 2
    assert "missing" in capsys.readouterr().out
    assert seed_and_skip(db.engine, table) == "skipped"  # the status was right: no guard for that write
    assert db.cli("install") == 0 and db.cli("status") == 0
    assert seed_and_skip(db.engine, table) == "success"
    if db.backend == "postgresql":
        db.sql(f"ALTER TABLE {table.name} DISABLE TRIGGER {trigger.name}")
        assert db.cli("status") == 2
        assert seed_and_skip(db.engine, table) == "skipped"
        assert db.cli("install") == 0 and db.cli("status") == 0
        assert seed_and_skip(db.engine, table) == "success"


def test_status_reports_outdated_definition(db, capsys):
    db.table()
    db.install()
    stale = {"postgresql": "CREATE TRIGGER ti_guard_skip_00000000 BEFORE UPDATE OF state ON task_instance FOR EACH ROW WHEN (false) EXECUTE FUNCTION {fn}()",
             "mysql": "CREATE TRIGGER ti_guard_skip_00000000 BEFORE UPDATE ON task_instance FOR EACH ROW SET @x = 1",
             "sqlite": "CREATE TRIGGER ti_guard_skip_00000000 BEFORE UPDATE OF state ON task_instance BEGIN SELECT 1; END"}[db.backend]
    fn = next((n for n, o in objects(db).items() if o.kind == "function" and n.startswith("ti_guard_guard_")), "")
    db.sql(stale.format(fn=fn))
    capsys.readouterr()
    assert db.cli("status") == 1
    assert "ti_guard_skip_00000000" in capsys.readouterr().out
    assert db.cli("install") == 0 and "ti_guard_skip_00000000" not in objects(db)


def test_guard_from_another_release_is_outdated_not_missing(db, capsys, monkeypatch):
    """A release that changes the guard's SQL renames its objects; the old guard still guards."""
    table = db.table()
    with monkeypatch.context() as m:
        for module in ("postgresql", "mysql", "sqlite"):
            # Stands in for another release's SQL: same rule, other object names.
            m.setattr(f"ti_guard.render.{module}.short_hash", lambda *parts: "0e1de5e0")
        db.install()
    before = set(objects(db))
    assert before and all("0e1de5e0" in name for name in before)
    with db.engine.begin() as conn:  # through the table: Airflow's Uuid id is CHAR(32) on MySQL, hex without dashes
        conn.execute(table.insert().values(id="00000000-0000-0000-0000-000000000001", dag_id="d", task_id="t", run_id="r", state="success", try_number=1))
    with pytest.raises(sa.exc.DBAPIError, match="ti_guard: refused"):
        with db.engine.begin() as conn:
            conn.execute(aw.racy_skip(table, "d", "r", [("t", -1)]))
    capsys.readouterr()
    assert db.cli("status") == 1  # outdated: the other release's guard is whole and still refuses
    assert "written by another ti-guard release" in capsys.readouterr().out
    assert db.cli("install") == 0 and db.cli("status") == 0
    assert set(objects(db)).isdisjoint(before)
    db.sql("DROP TRIGGER " + next(n for n, o in objects(db).items() if o.kind == "trigger") + (" ON task_instance" if db.backend == "postgresql" else ""))
    assert db.cli("status") == 2  # a guard that lost a piece is still reported missing


def test_mysql_guard_survives_an_airflow_migration_that_adds_columns(mysql_db, capsys):
    """A kept row gets back only its rules' columns, so a new Airflow column leaves the trigger
    current, and the guard keeps guarding while Airflow's writes (which may set the new column) go
    through. (A column the guard names going away: tests/test_dropped_column.py.)"""
    table = mysql_db.table()
    mysql_db.install("ignore")
    mysql_db.sql("ALTER TABLE task_instance ADD COLUMN new_in_next_airflow INT")
    capsys.readouterr()
    assert mysql_db.cli("status") == 0
    table = sa.Table("task_instance", sa.MetaData(), autoload_with=mysql_db.engine)
    assert seed_and_skip(mysql_db.engine, table) == "success"  # the racy skip of a finished row: kept
    ordinary_writes_go_through(mysql_db.engine, table)
    with mysql_db.engine.begin() as conn:  # a write of the new column
        assert conn.execute(sa.update(table).values(new_in_next_airflow=1)).rowcount == 1
    with mysql_db.engine.connect() as conn:
        assert conn.execute(sa.select(table.c.state, table.c.new_in_next_airflow)).one() == ("success", 1)


def test_postgresql_non_default_schema(pg_db):
    schema = 'Air "flow" Meta'
    prep = pg_db.engine.dialect.identifier_preparer
    pg_db.sql(f"CREATE SCHEMA {prep.quote_schema(schema)}")
    table = pg_db.table(schema=schema)
    assert pg_db.cli("install", f"--schema={schema}", "--mode=raise") == 0
    assert pg_db.cli("status", f"--schema={schema}") == 0
    with pytest.raises(sa.exc.DBAPIError, match="ti_guard: refused"):
        with pg_db.engine.begin() as conn:
            conn.execute(table.insert().values(id="00000000-0000-0000-0000-000000000001", dag_id="d", task_id="t", run_id="r", state="success", try_number=1))
            conn.execute(aw.racy_skip(table, "d", "r", [("t", -1)]))
    with pg_db.engine.connect() as conn:
        where = {r[0] for r in conn.exec_driver_sql("SELECT n.nspname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE p.proname LIKE 'ti\\_guard%%'")}
        config = conn.exec_driver_sql("SELECT proconfig FROM pg_proc WHERE proname LIKE 'ti\\_guard%%'").scalar()
    assert where == {schema} and config == ["search_path=pg_catalog, pg_temp"]
    assert pg_db.cli("uninstall", f"--schema={schema}") == 0
    assert objects(pg_db, Policy(schema=schema)) == {}


CLIENTS = {
    "postgresql": lambda url, path: ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", _libpq(url), "-f", str(path)],
    "mysql": lambda url, path: ["mariadb" if shutil.which("mariadb") else "mysql", *_mysql_args(url)],
    "sqlite": lambda url, path: ["sqlite3", "-bail", sa.engine.make_url(url).database, f".read {path}"],
}


def _libpq(url):
    u = sa.engine.make_url(url)
    return f"postgresql://{u.username}@{u.host}:{u.port or 5432}/{u.database}"


def _mysql_args(url):
    u = sa.engine.make_url(url)
    return [f"-u{u.username}", f"-h{u.host}", f"-P{u.port or 3306}", u.database]


def _run_client(db, name):
    path = ROOT / "sql" / db.backend / name
    cmd = CLIENTS[db.backend](db.url, path)
    stdin = path.read_text() if db.backend == "mysql" else None
    result = subprocess.run(cmd, input=stdin, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("dialect", ["postgresql", "mysql", "sqlite"])
def test_sql_files_are_what_alembic_prints(dialect):
    backend = dialect
    for name, args in (("install.sql", ["upgrade", "head", "--sql"]), ("uninstall.sql", ["downgrade", "head:base", "--sql"])):
        printed = subprocess.run([*ALEMBIC, "-x", f"dialect={backend}", *args], capture_output=True, text=True, cwd=ROOT)
        assert printed.returncode == 0, printed.stderr
        assert printed.stdout == (ROOT / "sql" / backend / name).read_text(), f"sql/{backend}/{name} is stale: regenerate it: ti-guard sql --dialect {backend} [--uninstall] (docs/index.md)"


def test_sql_files_through_real_clients_match_the_alembic_route(db):
    db.table()
    alembic(db, "upgrade", "head")
    by_alembic = objects(db)
    alembic(db, "downgrade", "base")
    _run_client(db, "install.sql")
    assert objects(db) == by_alembic
    assert db.cli("status") == 0
    _run_client(db, "uninstall.sql")
    assert objects(db) == {} and tables(db) == set()


def _sqlite_with_a_running_row(tmp_path):
    url = f"sqlite:///{tmp_path / 'airflow.db'}"
    engine = make_engine(url)
    table = task_instance_table(sa.MetaData())
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(table.insert().values(id="00000000-0000-0000-0000-000000000001", dag_id="d", task_id="t", run_id="r", state="running", try_number=1))
    return url, engine, table


@contextlib.contextmanager
def _errors_met_by(thread: threading.Thread):
    """The database errors that statements sent from `thread` met (whatever caught them)."""
    met = []

    def seen(context):
        if threading.current_thread() is thread:
            met.append(str(context.original_exception))

    sa.event.listen(sa.engine.Engine, "handle_error", seen)
    try:
        yield met
    finally:
        sa.event.remove(sa.engine.Engine, "handle_error", seen)


def test_sqlite_install_while_another_connection_keeps_committing(tmp_path):
    """A heartbeat writer keeps committing: every install (and the mode switches) succeeds, the
    writer keeps committing during them, and the guard they leave keeps a running row."""
    url, engine, table = _sqlite_with_a_running_row(tmp_path)
    stop, commits = threading.Event(), []

    def heartbeats():
        while not stop.is_set():
            try:
                with engine.begin() as conn:
                    conn.execute(sa.update(table).values(hostname=f"w{len(commits)}"))
                commits.append(1)
            except sa.exc.OperationalError:
                pass  # the install holds the lock for a moment: Airflow would retry too

    writer = threading.Thread(target=heartbeats)
    writer.start()
    try:
        deadline = time.monotonic() + 30
        while len(commits) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)  # the writer is committing before the first install starts
        before = len(commits)
        results = [cli.main(["install", "--url", url, "--mode", mode]) for mode in ("raise", "ignore", "raise")]
        during = len(commits) - before
    finally:
        stop.set()
        writer.join()
    assert before >= 5 and during > 0, (before, during)
    assert results == [0, 0, 0]
    assert cli.main(["status", "--url", url]) == 0
    with pytest.raises(sa.exc.IntegrityError, match="ti_guard"):
        with engine.begin() as conn:
            conn.execute(aw.racy_skip(table, "d", "r", [("t", -1)]))
    with engine.connect() as conn:
        assert conn.execute(sa.select(table.c.state)).scalar() == "running"
    engine.dispose()


def test_sqlite_install_retries_while_another_connection_holds_the_write_lock(tmp_path):
    """SQLite answers SQLITE_BUSY ("database is locked") once its busy wait runs out
    runs out while another connection holds the write lock: install must meet that, retry it like a
    lock timeout, and finish once the lock is free, not fail."""
    url, engine, table = _sqlite_with_a_running_row(tmp_path)
    holder = engine.connect()
    holder.begin()
    holder.execute(sa.update(table).values(hostname="holder"))  # the write lock, held ...
    result = {}
    install = threading.Thread(target=lambda: result.setdefault("rc", cli.main(["install", "--url", url, "--lock-timeout=0.2", "--lock-retries=20"])))
    try:
        with _errors_met_by(install) as met:
            install.start()
            deadline = time.monotonic() + 60
            while not any("database is locked" in e for e in met) and time.monotonic() < deadline:
                time.sleep(0.05)
            holder.rollback()  # ... until install met SQLITE_BUSY
            install.join(60)
    finally:
        holder.close()
    rc = result.get("rc")
    assert any("database is locked" in e for e in met), f"install never met SQLITE_BUSY: this test proved nothing ({met})"
    assert rc == 0
    assert cli.main(["status", "--url", url]) == 0
    engine.dispose()
