"""`ti-guard doctor`: each check is shown passing on a healthy database and failing on a broken one."""

from __future__ import annotations

import json
import time

import pytest
import sqlalchemy as sa

from conftest import one_line_error, seed_and_skip
from ti_guard import catalog, cli
from ti_guard.policy import Policy

SERVER_WORD = {"postgresql": "PostgreSQL ", "mysql": "MariaDB 10.", "mysql9": "MySQL 9.", "sqlite": "SQLite "}


def doctor(db, capsys, *args, url=None):
    capsys.readouterr()
    rc = cli.main(["doctor", "--url", url or db.url, *args])
    return rc, capsys.readouterr().out


def airflow_db(db):
    """An Airflow-shaped metadata DB: task_instance and Airflow's own alembic_version."""
    table = db.table()
    db.sql("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)")
    db.sql("INSERT INTO alembic_version VALUES ('29ce7909c52b')")
    return table


def test_ready_database_then_nothing_to_do(db, capsys):
    airflow_db(db)
    rc, out = doctor(db, capsys)
    assert rc == 0, out
    assert out.startswith("READY: ti-guard doctor on ")
    server_line = next(line for line in out.splitlines() if "server: " in line)
    assert SERVER_WORD[db.server] in server_line and "((" not in server_line, out
    assert "alembic_version is 29ce7909c52b" in out
    assert "install would: run migration 0002" in out and "create trigger ti_guard_" in out
    # The MySQL rollout rule (a live trigger switch deadlocked the 3.3.2 scheduler on MySQL 9.7), said there only.
    assert ("stop Airflow's schedulers for install, a mode switch and uninstall" in out) == (db.backend == "mysql"), out
    with db.engine.connect() as conn:  # doctor only reads
        assert catalog.read(conn, Policy()) == {} and catalog.read_settings(conn, Policy()) is None
    db.install()
    rc, out = doctor(db, capsys)
    assert rc == 0 and "install would: do nothing: the guard is installed and current" in out, out
    rc, out = doctor(db, capsys, "--mode=ignore")
    assert rc == 0 and "drop trigger ti_guard_" in out and "create trigger ti_guard_" in out, out


def test_not_an_airflow_database(db, capsys):
    rc, out = doctor(db, capsys)
    # The true reason first: the privilege and lock lines that follow are about a table that is not there.
    assert rc == 2 and out.splitlines()[1].startswith("  [FAIL] airflow: no table 'task_instance'"), out
    assert "missing TRIGGER" not in out, out  # the tests' accounts own everything: no privilege is missing
    rc, out = doctor(db, capsys, "--format=json")
    first = json.loads(out)["findings"][0]
    assert rc == 2 and (first["check"], first["level"]) == ("airflow", "critical") and first["message"].startswith("no table 'task_instance'"), first


def test_missing_trigger_privilege(server_db, capsys):
    airflow_db(server_db)
    with server_db.account(("SELECT", "UPDATE")) as url:
        rc, out = doctor(server_db, capsys, url=url)
    assert rc == 2, out
    assert "[FAIL] privileges: missing TRIGGER on task_instance" in out, out


def test_long_transaction_is_a_lock_risk(server_db, capsys):
    table = airflow_db(server_db)
    rc, out = doctor(server_db, capsys, "--lock-timeout=0.5")
    assert rc == 0 and "lock risk: no session" in out, out
    with server_db.engine.connect() as holder:
        holder.begin()
        holder.execute(sa.update(table).values(state="running"))  # a writer that does not commit
        time.sleep(2.1)  # MySQL counts the lock timeout and trx_started in whole seconds
        rc, out = doctor(server_db, capsys, "--lock-timeout=0.5")
        holder.rollback()
    assert rc == 1, out
    assert "[warn] lock risk: 1 session(s)" in out and "gives up and changes nothing" in out, out


def test_mysql_binary_log_is_reported_as_the_server_has_it(mysql_db, capsys):
    airflow_db(mysql_db)
    with mysql_db.engine.connect() as conn:
        log_bin, trust = conn.exec_driver_sql("SELECT @@log_bin, @@log_bin_trust_function_creators").one()
    rc, out = doctor(mysql_db, capsys)
    assert f"binary log: {'on' if log_bin else 'off'}" in out and f"log_bin_trust_function_creators={trust}" in out, out


def test_mysql_trigger_whose_definer_was_dropped(mysql_db, capsys):
    """Every UPDATE on the table fails once the DEFINER is gone: status and doctor catch it, install repairs it."""
    table = airflow_db(mysql_db)
    with mysql_db.engine.begin() as conn:
        conn.execute(table.insert().values(id="00000000-0000-0000-0000-000000000001", dag_id="d", task_id="t", run_id="r", state="running", try_number=1))
    with mysql_db.account(("ALL PRIVILEGES",), database_wide=True) as url, mysql_db.trusting_function_creators():
        assert cli.main(["install", "--url", url]) == 0
        heartbeat = sa.update(table).values(hostname="w1")
        with mysql_db.engine.begin() as conn:  # with its definer alive, Airflow's writes go through
            conn.execute(heartbeat)
        assert cli.main(["status", "--url", mysql_db.url]) == 0
    # the account is dropped now
    with pytest.raises(sa.exc.DBAPIError) as broken:
        with mysql_db.engine.begin() as conn:
            conn.execute(heartbeat)
    assert broken.value.orig.args[0] == 1449  # "The user specified as a definer does not exist"
    capsys.readouterr()
    assert cli.main(["status", "--url", mysql_db.url]) == 2
    assert "an account that no longer exists" in capsys.readouterr().out
    rc, out = doctor(mysql_db, capsys)
    assert rc == 2 and "[FAIL] definer: trigger ti_guard_" in out and "error 1449" in out, out
    assert "replace trigger ti_guard_" in out and "no longer exists" in out, out
    assert mysql_db.cli("install") == 0 and mysql_db.cli("status") == 0
    with mysql_db.engine.begin() as conn:
        conn.execute(heartbeat)


def test_mysql_binary_log_without_super_then_following_the_advice(mysql_db, capsys):
    """MySQL 8+ logs binary by default: an account without SUPER cannot create the triggers until
    log_bin_trust_function_creators=1. Doctor says so, install fails in one line and leaves the
    database as it was, and after following the advice the same account installs a working guard.
    (MariaDB does not log by default: there the account installs at once, as doctor says.)"""
    table = airflow_db(mysql_db)
    log_bin, trust = mysql_db.binlog()
    assert (log_bin, trust) == ((1, 0) if mysql_db.server == "mysql9" else (0, 0))
    assert seed_and_skip(mysql_db.engine, table) == "skipped"  # without the guard: overwritten
    with mysql_db.account(("ALL PRIVILEGES",), database_wide=True) as url:
        rc, out = doctor(mysql_db, capsys, url=url)
        if log_bin:
            assert rc == 2 and "[FAIL] binary log: on (ROW), log_bin_trust_function_creators=0 and no SUPER" in out, out
            assert "SET GLOBAL log_bin_trust_function_creators = 1" in out, out
            with mysql_db.engine.connect() as conn:
                before = sorted(sa.inspect(conn).get_table_names())
            assert cli.main(["install", "--url", url]) == 2
            one_line_error(capsys, "error 1419", "SET GLOBAL log_bin_trust_function_creators = 1")
            with mysql_db.engine.connect() as conn:  # left as it was: no trigger, no table of ti-guard's
                assert catalog.read(conn, Policy()) == {} and sorted(sa.inspect(conn).get_table_names()) == before
            assert seed_and_skip(mysql_db.engine, table) == "skipped"
        with mysql_db.trusting_function_creators():  # the advice, followed
            rc, out = doctor(mysql_db, capsys, url=url)
            # MySQL 9.7: logging, now trusted; MariaDB: not logging (trust left as it was, 0).
            assert f"[ok]   binary log: {'on (ROW), log_bin_trust_function_creators=1' if log_bin else 'off, log_bin_trust_function_creators=0'}" in out, out
            assert rc in (0, 1) and "[FAIL]" not in out, out
            assert cli.main(["install", "--url", url]) == 0 and cli.main(["status", "--url", url]) == 0
            assert seed_and_skip(mysql_db.engine, table) == "success"  # the guard now keeps the finished row
            assert cli.main(["uninstall", "--url", url]) == 0
