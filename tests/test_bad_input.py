"""Bad input: one clear line naming the cause and the fix, a non-zero exit, the database as it was."""

from __future__ import annotations

import os
import threading

import pytest
import sqlalchemy as sa

from conftest import one_line_error
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


def test_lock_wait_does_not_block_writers_past_the_timeout(pg_db):
    """While install waits for its lock, a writer behind it waits no longer than the lock timeout."""
    table = pg_db.table()
    holder = pg_db.engine.connect()
    holder.begin()
    holder.exec_driver_sql("LOCK TABLE task_instance IN ROW EXCLUSIVE MODE")
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", pg_db.cli("install", "--lock-timeout=0.5", "--lock-retries=1")))
    thread.start()
    thread.join(10)
    holder.rollback()
    holder.close()
    assert result["rc"] == 2
    with pg_db.engine.begin() as conn:  # the table is writable at once afterwards
        conn.exec_driver_sql("SET lock_timeout = '1s'")
        conn.execute(sa.update(table).values(state="running"))


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
