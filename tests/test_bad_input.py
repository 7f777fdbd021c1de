"""Bad input: one clear line naming the cause and the fix, a non-zero exit, the database as it was."""

from __future__ import annotations

import os
import threading
import time

import pytest
import sqlalchemy as sa

from conftest import one_line_error
from ti_guard import airflow_writes as aw
from ti_guard import catalog, cli, config
from ti_guard.errors import GuardError
from ti_guard.policy import Policy


def _nothing_installed(db):
    with db.engine.connect() as conn:
        assert catalog.read(conn, Policy()) == {}
        assert not [t for t in sa.inspect(conn).get_table_names() if t.startswith("ti_guard")]


@pytest.mark.parametrize(
    "url, needle",
    [
        ("not a url", "cannot parse the database URL"),
        ("oracle://scott:tiger@127.0.0.1/x", "unsupported database 'oracle'"),
        ("postgresql+psycopg2://postgres@127.0.0.1:1/x", "cannot connect"),
        ("mysql+mysqldb://root@127.0.0.1:1/x", "cannot reach the MySQL server"),
        ("sqlite:////nonexistent/dir/airflow.db", "SQLite"),
    ],
)
def test_bad_urls(capsys, url, needle):
    assert cli.main(["install", "--url", url]) == 2
    one_line_error(capsys, needle)


def test_no_task_instance_table(db, capsys):
    assert db.cli("install") == 2
    one_line_error(capsys, "no table 'task_instance'", "Airflow metadata database")
    _nothing_installed(db)


def test_missing_column(db, capsys):
    db.sql("CREATE TABLE task_instance (dag_id VARCHAR(250), task_id VARCHAR(250), run_id VARCHAR(250), state VARCHAR(20))")
    assert db.cli("install") == 2
    one_line_error(capsys, "map_index", "start_date", "end_date")
    _nothing_installed(db)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--mode=block"], "invalid choice"),
        (["--protect=running,sucess"], "unknown task state(s) in protect list: 'sucess'"),
        (["--protect=running'); DROP TABLE task_instance; --"], "unknown task state"),
        (["--protect=skipped"], "'skipped' cannot be protected"),
        (["--lock-timeout=-1"], "invalid lock timeout"),
    ],
)
def test_bad_settings(db, capsys, args, needle):
    db.table()
    with pytest.raises(SystemExit) if needle == "invalid choice" else _no_raise():
        assert db.cli("install", *args) == 2
    captured = capsys.readouterr().err
    assert needle in captured, captured
    _nothing_installed(db)


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_lock_held_by_a_long_transaction(server_db, capsys):
    """Install gives up after its lock timeout and retries, leaving nothing half-made."""
    table = server_db.table()
    holder = server_db.engine.connect()
    holder.begin()
    # A writer mid-transaction (PostgreSQL: ROW EXCLUSIVE; MySQL: a metadata lock).
    holder.execute(sa.select(table).with_for_update() if server_db.backend == "mysql" else sa.text("LOCK TABLE task_instance IN ROW EXCLUSIVE MODE"))
    try:
        rc = server_db.cli("install", "--lock-timeout=0.3", "--lock-retries=2")
    finally:
        holder.rollback()
        holder.close()
    assert rc == 2
    one_line_error(capsys, "could not lock task_instance", "gave up after 2 attempts")
    _nothing_installed(server_db)
    assert server_db.cli("install") == 0  # once the lock is free


def test_too_few_privileges(server_db, capsys):
    """SELECT and UPDATE (what Airflow's own account needs) but no TRIGGER."""
    server_db.table()
    with server_db.account(("SELECT", "UPDATE")) as url:
        assert cli.main(["install", "--url", url]) == 2
    one_line_error(capsys, "lacks a privilege")
    _nothing_installed(server_db)


def test_url_resolution_order(tmp_path, monkeypatch):
    home = tmp_path / "airflow"
    home.mkdir()
    (home / "airflow.cfg").write_text("[database]\nsql_alchemy_conn = postgresql+psycopg2://cfg@h/db\nsql_alchemy_schema = meta\n")
    env = {"AIRFLOW_HOME": str(home)}
    assert config.resolve_url(None, env).startswith("postgresql+psycopg://cfg@")
    env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_CMD"] = "echo mysql+mysqldb://cmd@h/db"
    assert config.resolve_url(None, env) == "mysql+pymysql://cmd@h/db"
    env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = "mysql://env@h/db"
    assert config.resolve_url(None, env) == "mysql+pymysql://env@h/db"
    env["TI_GUARD_URL"] = "sqlite:///x.db"
    assert config.resolve_url(None, env) == "sqlite:///x.db"
    assert config.resolve_url("postgres://explicit@h/db", env) == "postgresql+psycopg://explicit@h/db"
    assert config.resolve(env={"AIRFLOW_HOME": str(home)}).policy.schema == "meta"
    assert config.resolve(env={"AIRFLOW_HOME": str(home), "TI_GUARD_SCHEMA": "mine"}).policy.schema == "mine"
    with pytest.raises(GuardError, match="no database URL"):
        config.resolve_url(None, {"AIRFLOW_HOME": str(tmp_path / "none")})


def test_demo_runs_without_a_server(capsys):
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    assert out.count("<-- overwritten") == 6  # without the guard, and with it in audit mode
    assert "REFUSED: ti_guard: refused" in out
    assert out.count("sensor skips itself (AirflowSkipException):   went through") == 4
    # The report it ends with: the 3 overwrites audited, the 3 kept in ignore mode (raise rolled back).
    # Each mode's install lines (created/dropped) sit in that mode's own section.
    sections = dict(part.split("\n", 1) for part in out.split("\n== ")[1:])
    without, audit, raise_, ignore = (next(body for title, body in sections.items() if title.startswith(t)) for t in ("without", "with ti-guard, mode=audit", "with ti-guard, mode=raise", "with ti-guard, mode=ignore"))
    assert "trigger" not in without
    for mode, body in (("audit", audit), ("raise", raise_), ("ignore", ignore)):
        assert "created trigger ti_guard_" in body and "installed on sqlite:///" in body and f"mode={mode}" in body, body
    assert "dropped trigger" not in audit and "dropped trigger" in raise_ and "dropped trigger" in ignore
    by_day = out.split("== ti-guard report")[1].split("Top DAGs")[0]
    assert by_day.count("racy_skip  audit") == 3 and by_day.count("racy_skip  keep") == 3


def _waiting_for_a_lock(db, conn_id) -> bool:
    """Is the server session `conn_id` blocked on a table lock (PostgreSQL) or metadata lock (MySQL)?"""
    sql = ("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = :id" if db.backend == "postgresql" else
           "SELECT state LIKE 'Waiting for table metadata lock%' FROM information_schema.processlist WHERE id = :id")
    with db.engine.connect() as conn:
        return bool(conn.execute(sa.text(sql), {"id": conn_id}).scalar())


def _until(condition, seconds=30.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_lock_wait_does_not_block_writers_past_the_timeout(server_db):
    """While install waits for its lock, a writer that queues behind install's lock request gets
    through once install gives up, while the transaction install waited for is still open (without
    install's lock timeout, the writer would wait for that transaction to end)."""
    table = server_db.table()
    mysql = server_db.backend == "mysql"
    with server_db.engine.begin() as conn:
        conn.execute(table.insert().values(id="00000000-0000-0000-0000-000000000001", dag_id="d", task_id="t", run_id="r", state="running", try_number=1))
    holder = server_db.engine.connect()
    holder.begin()
    # A transaction that read or wrote the table and is still open (PostgreSQL: ROW EXCLUSIVE; MySQL:
    # a shared metadata lock, held to its end, no row lock): it blocks the trigger's DDL, not writers.
    holder.execute(sa.select(table) if mysql else sa.text("LOCK TABLE task_instance IN ROW EXCLUSIVE MODE"))
    result, writer_done = {}, threading.Event()
    install = threading.Thread(target=lambda: result.setdefault("rc", server_db.cli("install", "--lock-timeout=3", "--lock-retries=1")))
    writer_conn = server_db.engine.connect()
    writer_id = writer_conn.exec_driver_sql("SELECT CONNECTION_ID()" if mysql else "SELECT pg_backend_pid()").scalar()
    writer_conn.commit()

    def writer():
        with writer_conn.begin():
            writer_conn.execute(aw.heartbeat(table, aw.key_of(table, "d", "t", "r")))
        writer_done.set()

    writes = threading.Thread(target=writer)
    try:
        install.start()
        # install's DDL is queued behind the holder ...
        assert _until(lambda: _queued_ddl(server_db)), "install never waited for the table's lock"
        writes.start()
        # ... and the writer queued behind install's request (else this test proves nothing) ...
        assert _until(lambda: _waiting_for_a_lock(server_db, writer_id) or writer_done.is_set())
        assert not writer_done.is_set(), "the writer never queued behind install: this test proved nothing"
        # ... gets through once install gives up, while the holder's transaction is still open.
        assert writer_done.wait(30), "the writer stayed queued behind install's lock request"
        install.join(30)
        assert result.get("rc") == 2
    finally:
        holder.rollback()
        holder.close()
        install.join(60)
        if writes.ident is not None:
            writes.join(60)
        writer_conn.close()
    with server_db.engine.connect() as conn:
        assert conn.execute(sa.select(table.c.last_heartbeat_at)).scalar() is not None


def _queued_ddl(db) -> bool:
    """A session on this test's database (the servers are shared) waits for a lock in a DDL statement."""
    if db.backend == "postgresql":
        sql = "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' AND query ILIKE 'CREATE%'"
    else:
        sql = "SELECT COUNT(*) FROM information_schema.processlist WHERE db = DATABASE() AND state LIKE 'Waiting for table metadata lock%' AND info LIKE 'CREATE%'"
    with db.engine.connect() as conn:
        return conn.execute(sa.text(sql)).scalar() > 0


def test_read_only_commands_never_create_a_sqlite_file(tmp_path, monkeypatch, capsys):
    """airflow.cfg names a SQLite file that is not there (Airflow's default): refused, not created."""
    for name in [k for k in os.environ if k.startswith(("TI_GUARD_", "AIRFLOW__"))]:
        monkeypatch.delenv(name)
    home = tmp_path / "airflow"
    home.mkdir()
    missing = tmp_path / "elsewhere" / "airflow.db"
    (home / "airflow.cfg").write_text(f"[database]\nsql_alchemy_conn = sqlite:///{missing}\n")
    monkeypatch.setenv("AIRFLOW_HOME", str(home))
    for command in ("status", "report", "doctor"):
        assert cli.main([command]) == 2
        one_line_error(capsys, f"no SQLite database at {missing}", f"(from {home / 'airflow.cfg'} [database] sql_alchemy_conn)", "pass --url")
    monkeypatch.setenv("TI_GUARD_URL", f"sqlite:///{tmp_path / 'typo.db'}")
    assert cli.main(["status", "--format=json"]) == 2
    one_line_error(capsys, "typo.db (from TI_GUARD_URL)")
    assert cli.main(["doctor", "--url", f"sqlite:///{missing}"]) == 2
    one_line_error(capsys, "(from --url)")
    assert not missing.parent.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["airflow"]


def test_checks_name_the_url_they_used_and_where_it_came_from(server_db, capsys, monkeypatch):
    server_db.table()
    with_password = sa.engine.make_url(server_db.url).set(password="s3cret")
    if server_db.backend == "mysql":  # root logs in without one here: give it its own login
        with_password = None
    for name in [k for k in os.environ if k.startswith(("TI_GUARD_", "AIRFLOW__"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", server_db.url)
    for command in ("status", "report", "doctor"):
        capsys.readouterr()
        cli.main([command])
        first = capsys.readouterr().out.splitlines()[0]
        assert f"{sa.engine.make_url(server_db.url).render_as_string()} (from AIRFLOW__DATABASE__SQL_ALCHEMY_CONN)" in first, first
    if with_password is not None:  # PostgreSQL trusts this client: any password logs in
        url = with_password.render_as_string(hide_password=False)
        for command in ("status", "report", "doctor"):
            capsys.readouterr()
            cli.main([command, "--url", url])
            out = capsys.readouterr().out
            assert "s3cret" not in out and ":***@" in out.splitlines()[0] and "(from --url)" in out, out


def test_unknown_user_or_database_say_so(server_db, capsys):
    url = sa.engine.make_url(server_db.url)
    for wrong, needle in ((url.set(username="nobody_here"), "check the user"), (url.set(database="no_such_db"), "check the database name")):
        assert cli.main(["install", "--url", wrong.render_as_string(hide_password=False)]) == 2
        err = one_line_error(capsys, needle)
        assert "host and port" not in err
