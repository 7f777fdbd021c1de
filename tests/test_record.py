"""The record of refusals and `ti-guard report`: bounded, exact, never a lock two writers wait on,
part of the guard's objects (installed, checked, removed), and readable as text, JSON and Prometheus."""

from __future__ import annotations

import json
import threading
import uuid

import pytest
import sqlalchemy as sa

from conftest import one_line_error, ordinary_writes_go_through
from ti_guard import airflow_writes as aw
from ti_guard.policy import COUNT_BUCKETS, COUNTS_TABLE, LANES, RECORD_ROWS, RECORD_TABLE

BIG = 100_000


def _seed(db, table, states, dag_id="d"):
    rows = [dict(id=str(uuid.uuid4()), dag_id=dag_id, task_id=f"t{i}", run_id="r", map_index=-1, state=s, try_number=1, start_date=aw.now())
            for i, s in enumerate(states)]
    with db.engine.begin() as conn:
        conn.execute(table.insert(), rows)
    return [(r["task_id"], -1) for r in rows]


def _held(db) -> tuple[int, int]:
    """(details held in the ring, refusals counted)."""
    with db.engine.connect() as conn:
        held = conn.exec_driver_sql(f"SELECT COUNT(*) FROM {RECORD_TABLE} WHERE seq IS NOT NULL").scalar()
        counted = conn.exec_driver_sql(f"SELECT COALESCE(SUM(refusals), 0) FROM {COUNTS_TABLE}").scalar()
    return held, int(counted)


def _skip_all(db, table, keys):
    with db.engine.begin() as conn:
        return conn.execute(aw.racy_skip(table, "d", "r", keys)).rowcount


def _states(db, table):
    with db.engine.connect() as conn:
        return sorted(conn.execute(sa.select(table.c.state)).scalars())


@pytest.mark.parametrize("mode", ["ignore", "audit"])
def test_one_statement_refusing_100k_rows_stays_under_the_bound(db, mode):
    table = db.table()
    _seed(db, table, ["running"] * BIG)
    db.install(mode=mode)
    now = aw.now()
    with db.engine.begin() as conn:  # the racy skip's shape, over the whole run in one statement
        conn.execute(sa.update(table).where(table.c.dag_id == "d").values(state="skipped", start_date=now, end_date=now))
    # ignore: every row kept; audit: every row went through. Either way each one is counted,
    # while the details stay at the ring's size and the table at its RECORD_ROWS rows.
    assert _states(db, table) == (["running"] * BIG if mode == "ignore" else ["skipped"] * BIG)
    # MySQL: one session writes only its lane's share of the ring (render/mysql.py _record).
    ring = RECORD_ROWS // LANES if db.backend == "mysql" else RECORD_ROWS
    assert _held(db) == (ring, BIG)
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql(f"SELECT COUNT(*) FROM {RECORD_TABLE}").scalar() == RECORD_ROWS
        assert conn.exec_driver_sql(f"SELECT COUNT(*) FROM {COUNTS_TABLE}").scalar() == COUNT_BUCKETS
        # The ring holds the latest refusals: the highest numbers, each slot once.
        seqs = [int(s) for s in conn.exec_driver_sql(f"SELECT seq FROM {RECORD_TABLE} WHERE seq IS NOT NULL").scalars()]
    assert len(set(s % ring for s in seqs)) == ring
    # UUID_SHORT() is the server's counter: another session's calls (a test run beside this one) may interleave.
    assert db.backend == "mysql" or max(seqs) - min(seqs) == ring - 1


def test_no_record_without_the_guard_and_none_for_writes_let_through(db):
    table = db.table()
    states = ["running", "success", None, "queued", "scheduled", "running"]
    keys = _seed(db, table, states)
    # Without the guard: the racy skip overwrites the protected rows, and nothing records it.
    _skip_all(db, table, keys)
    assert _states(db, table) == ["skipped"] * len(states)
    assert not _ours(db)
    with db.engine.begin() as conn:
        conn.execute(table.delete())
    keys = _seed(db, table, states)
    db.install(mode="ignore")
    assert _held(db) == (0, 0)  # installing records nothing from before it
    with db.engine.begin() as conn:  # Airflow's ordinary writes, a task skipping itself included: nothing to record
        conn.execute(aw.heartbeat(table, aw.key_of(table, "d", "t0", "r"), aw.now()))
        conn.execute(aw.finish(table, aw.key_of(table, "d", "t0", "r"), "success", aw.now()))
        conn.execute(aw.finish(table, aw.key_of(table, "d", "t5", "r"), "skipped", aw.now()))
    assert _held(db) == (0, 0)
    _skip_all(db, table, keys)
    assert _held(db) == (2, 2)  # t0 (finished by now) and t1: the protected rows the skip reached
    assert db.cli("uninstall") == 0
    assert not _ours(db)


def _ours(db) -> list[str]:
    with db.engine.connect() as conn:
        return [t for t in sa.inspect(conn).get_table_names() if t.startswith("ti_guard")]


def _racy_one(table, key):
    """The racy skip's write to one row found by its key (so that the row lookup itself takes no
    other row's lock: the IN-list form scans the run's rows on MySQL)."""
    now = aw.now()
    return sa.update(table).where(aw.key_of(table, "d", key[0], "r")).values(state="skipped", start_date=now, end_date=now)


def _second_waits(db, table, keys) -> bool:
    """One transaction skips keys[0] and stays open; does a second one skipping keys[1] wait for it?
    READ COMMITTED on MySQL, as Airflow sets it there (REPEATABLE READ would lock every row scanned)."""
    engine = sa.create_engine(db.url, isolation_level="READ COMMITTED") if db.backend == "mysql" else db.engine
    first = engine.connect()
    first.begin()
    first.execute(_racy_one(table, keys[0]))
    holder = {}

    def second():
        try:
            with engine.begin() as conn:
                conn.exec_driver_sql("SET LOCAL lock_timeout = '3s'" if db.backend == "postgresql" else "SET SESSION innodb_lock_wait_timeout = 3")
                holder["rowcount"] = conn.execute(_racy_one(table, keys[1])).rowcount
        except sa.exc.DBAPIError as exc:
            holder["error"] = str(exc.orig)

    try:
        worker = threading.Thread(target=second)
        worker.start()
        worker.join(10)
    finally:
        first.commit()
        first.close()
        worker.join(10)
    return holder != {"rowcount": 1}


def test_concurrent_refusals_never_wait_for_each_other(server_db):
    """Two transactions refuse rows at once, the first still open: the second must not wait for
    it (a shared counter row would make it wait, and deadlock when each holds a row the other needs)."""
    table = server_db.table()
    keys = _seed(server_db, table, ["running", "running"])
    assert not _second_waits(server_db, table, keys)  # without the guard: no wait either
    with server_db.engine.begin() as conn:
        conn.execute(sa.update(table).values(state="running"))
    server_db.install(mode="ignore")
    assert not _second_waits(server_db, table, keys), "the second refusal waited for the first transaction"
    assert _held(server_db) == (2, 2) and _states(server_db, table) == ["running", "running"]


def test_postgresql_records_the_writer(pg_db):
    table = pg_db.table()
    keys = _seed(pg_db, table, ["running"])
    pg_db.install(mode="ignore")
    engine = sa.create_engine(pg_db.url, connect_args={"application_name": "airflow-scheduler"})
    with engine.begin() as conn:
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        conn.execute(aw.racy_skip(table, "d", "r", keys))
    engine.dispose()
    with pg_db.engine.connect() as conn:
        row = conn.exec_driver_sql(f"SELECT writer_user, writer_application, writer_address, writer_pid FROM {RECORD_TABLE} WHERE seq IS NOT NULL").one()
    assert tuple(row) == ("postgres", "airflow-scheduler", "127.0.0.1", pid)


def test_the_record_needs_no_privilege_of_airflows_account(server_db):
    """Airflow's account holds SELECT and UPDATE on task_instance only; its refused writes are
    recorded all the same (PostgreSQL: SECURITY DEFINER; MySQL: triggers run as their definer)."""
    table = server_db.table()
    keys = _seed(server_db, table, ["running"])
    server_db.install(mode="ignore")
    with server_db.account() as url:
        engine = sa.create_engine(url)
        with engine.begin() as conn:
            assert conn.execute(aw.racy_skip(table, "d", "r", keys)).rowcount == 1
        engine.dispose()
    assert _held(server_db) == (1, 1) and _states(server_db, table) == ["running"]


def test_missing_or_altered_record_is_reported_and_repaired(db, capsys):
    table = db.table()
    keys = _seed(db, table, ["running", "success"])
    db.install(mode="ignore")
    db.sql(f"DROP TABLE {COUNTS_TABLE}")
    capsys.readouterr()
    # SQLite compiles the trigger's statements with the UPDATE: without the table that UPDATE
    # fails, so it is critical there; PostgreSQL and MySQL go on guarding, unrecorded.
    assert db.cli("status") == (2 if db.backend == "sqlite" else 1)
    assert f"record table {COUNTS_TABLE} is missing" in capsys.readouterr().out
    if db.backend != "sqlite":
        assert _skip_all(db, table, keys[:1]) == 1 and _states(db, table) == ["running", "success"]
        ordinary_writes_go_through(db.engine, table)  # warning, not critical: Airflow's writes still land
    else:
        with pytest.raises(sa.exc.OperationalError, match=COUNTS_TABLE):  # critical: what the status says
            _skip_all(db, table, keys[:1])
    assert db.cli("install") == 0 and db.cli("status") == 0
    ordinary_writes_go_through(db.engine, table)
    db.sql(f"ALTER TABLE {RECORD_TABLE} ADD COLUMN note VARCHAR(10)")
    capsys.readouterr()
    assert db.cli("status") == 1
    assert f"record table {RECORD_TABLE} was altered" in capsys.readouterr().out
    assert db.cli("install") == 0 and db.cli("status") == 0
    _skip_all(db, table, keys)
    assert _held(db) == (2, 2)
    db.sql(f"DELETE FROM {RECORD_TABLE} WHERE slot < 10")
    assert db.cli("status") == 1
    assert db.cli("install") == 0 and db.cli("status") == 0


def test_report_formats_and_exit_codes(db, capsys):
    table = db.table()
    keys = _seed(db, table, ["running", "success", "failed", "queued"])
    capsys.readouterr()
    assert db.cli("report") == 2  # nothing installed: exits as status does
    db.install(mode="audit")
    _skip_all(db, table, keys)
    capsys.readouterr()
    assert db.cli("report", "--since=1h") == 0
    text = capsys.readouterr().out
    assert "racy_skip  audit   running    skipped    1" in text and "t3" not in text
    assert db.cli("report", "--format=json") == 0
    found = json.loads(capsys.readouterr().out)
    assert sorted((t["old_state"], t["refusals"]) for t in found["totals"]) == [("failed", 1), ("running", 1), ("success", 1)]
    assert found["top_dags"] == [{"dag_id": "d", "refusals": 3}] and len(found["latest"]) == 3
    assert db.cli("report", "--format=prometheus") == 0
    metrics = dict(line.rsplit(" ", 1) for line in capsys.readouterr().out.splitlines() if not line.startswith("#"))
    assert metrics['ti_guard_refusals_total{rule="racy_skip",action="audit",old_state="running",new_state="skipped"}'] == "1"
    assert metrics["ti_guard_status"] == "0" and metrics['ti_guard_mode{mode="audit"}'] == "1"
    assert db.cli("report", "--since=yesterday") == 2
    one_line_error(capsys, "invalid --since 'yesterday'", "24h")


def test_status_and_doctor_speak_json(db, capsys):
    db.table()
    capsys.readouterr()
    assert db.cli("status", "--format=json") == 2
    assert json.loads(capsys.readouterr().out)["status"] == "missing"
    db.install(mode="ignore")
    capsys.readouterr()
    assert db.cli("status", "--format=json") == 0
    found = json.loads(capsys.readouterr().out)
    assert (found["status"], found["code"], found["mode"]) == ("installed/current", 0, "ignore")
    rc = db.cli("doctor", "--format=json")
    found = json.loads(capsys.readouterr().out)
    # The guard installed: ready (0) or with warnings (1), never 2; the JSON says the same code.
    assert "findings" in found and rc in (0, 1) and found["code"] == rc, (rc, found)
