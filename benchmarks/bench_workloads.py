"""The writes Airflow makes to task_instance, timed. Each returns seconds of wall time.

Bulk statements run in a transaction that is rolled back, so every variant meets the same rows
in the same states; the rollback is not timed. Heartbeats commit, one row per transaction, from
several connections at once, the way ~500 workers do.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import datetime, timezone

import sqlalchemy as sa

from ti_guard import airflow_writes

from bench_data import BenchDB

HEARTBEAT_THREADS = 4


def _placeholder(engine: sa.Engine) -> str:
    return "?" if engine.dialect.paramstyle == "qmark" else "%s"


def _stamp(backend: str):
    """A heartbeat time as each driver wants it for this column (SQLAlchemy's own SQLite text format)."""
    now = datetime.now(timezone.utc)
    if backend == "sqlite":
        return now.strftime("%Y-%m-%d %H:%M:%S.%f")
    return now.replace(tzinfo=None) if backend == "mysql" else now


class HeartbeatWriter:
    """One connection committing `UPDATE ... SET last_heartbeat_at WHERE id` (Airflow's ti_heartbeat)."""

    def __init__(self, db: BenchDB, ids: list):
        self.db, self.ids = db, ids
        self.raw = db.engine.raw_connection()
        p = _placeholder(db.engine)
        self.sql = f"UPDATE {db.quoted_table} SET last_heartbeat_at = {p} WHERE id = {p}"
        self.immediate = db.backend == "sqlite"
        if self.immediate:
            # SQLite's busy handler is not fair: under four writers one can wait past the default 5 s.
            self.raw.cursor().execute("PRAGMA busy_timeout = 60000")

    def beat(self, i: int) -> int:
        cur = self.raw.cursor()
        if self.immediate:
            # Take the write lock up front so SQLite's busy handler waits for it instead of failing.
            cur.execute("BEGIN IMMEDIATE")
        cur.execute(self.sql, (_stamp(self.db.backend), self.ids[i % len(self.ids)]))
        count = cur.rowcount
        if self.immediate:
            cur.execute("COMMIT")
        else:
            self.raw.commit()
        cur.close()
        return count

    def close(self) -> None:
        self.raw.close()


def heartbeats(db: BenchDB, ids: list, per_thread: int) -> float:
    chunk = max(1, len(ids) // HEARTBEAT_THREADS)
    writers = [HeartbeatWriter(db, ids[i * chunk : (i + 1) * chunk] or ids) for i in range(HEARTBEAT_THREADS)]
    assert all(w.beat(0) == 1 for w in writers), "a heartbeat matched no row"
    start = threading.Barrier(HEARTBEAT_THREADS + 1)
    errors = []

    def run(writer):
        start.wait()
        try:
            for i in range(per_thread):
                writer.beat(i)
        except Exception as exc:  # noqa: BLE001 - reported after the join
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in writers]
    for t in threads:
        t.start()
    start.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    for w in writers:
        w.close()
    if errors:
        raise errors[0]
    return elapsed


_TICK = os.sysconf("SC_CLK_TCK")


def _proc_cpu(stat: str):
    """A clock over a /proc stat file: utime + stime of that process or thread, in seconds."""

    def read():
        with open(stat) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK

    return read


def _mysql_thread_stat(conn) -> str:
    """/proc path of the server thread running this connection, if the server runs here.

    MariaDB names the OS thread in PROCESSLIST.TID, MySQL 8+ in performance_schema.threads.
    """
    pid_file = conn.exec_driver_sql("SELECT @@pid_file").scalar()
    for query in (
        "SELECT TID FROM information_schema.PROCESSLIST WHERE ID = CONNECTION_ID()",
        "SELECT THREAD_OS_ID FROM performance_schema.threads WHERE PROCESSLIST_ID = CONNECTION_ID()",
    ):
        try:
            with conn.begin_nested():
                tid = conn.exec_driver_sql(query).scalar()
        except sa.exc.DBAPIError:
            continue
        # A server in a chroot (MySQL 9.7, tests/servers/mysql97.sh) names its pid file inside it.
        for path in (pid_file, f"/proc/{tid}/root{pid_file}") if tid and pid_file else ():
            if os.path.exists(path):
                with open(path) as f:
                    return f"/proc/{f.read().strip()}/task/{tid}/stat"
    return ""


def _cpu_clock(db: BenchDB, conn):
    """CPU seconds spent so far by whatever executes this connection's statements, or None.

    Other people's load on a shared machine stretches wall time at random; the CPU time the
    statement itself burns barely moves. SQLite runs in this thread; PostgreSQL runs each
    connection in its own process, MariaDB and MySQL in a thread of theirs, both read from
    /proc when the server runs on this machine.
    """
    if db.backend == "sqlite":
        return time.thread_time
    if db.engine.url.host not in (None, "", "localhost", "127.0.0.1", "::1"):
        return None  # a process id from another machine would name some process of this one
    if db.backend == "postgresql":
        stat = f"/proc/{conn.exec_driver_sql('SELECT pg_backend_pid()').scalar()}/stat"
    else:
        stat = _mysql_thread_stat(conn)
    return _proc_cpu(stat) if stat and os.path.exists(stat) else None


def _wal_position(db: BenchDB, conn):
    """PostgreSQL's WAL insert position: WAL written is deterministic where time is not."""
    if db.backend != "postgresql":
        return None
    return conn.exec_driver_sql("SELECT pg_current_wal_insert_lsn()").scalar()


def _rolled_back(db: BenchDB, statements, expected_rows: int) -> dict:
    """Wall seconds, CPU seconds (or None) and WAL bytes per row (or None) for the statements, rolled back."""
    with db.engine.connect() as conn:
        trans = conn.begin()
        cpu = _cpu_clock(db, conn)
        lsn = _wal_position(db, conn)
        cpu_began = cpu() if cpu else None
        began = time.perf_counter()
        rows = sum(conn.execute(s).rowcount for s in statements)
        elapsed = time.perf_counter() - began
        cpu_used = cpu() - cpu_began if cpu else None
        wal = None
        if lsn is not None:
            wal = conn.execute(sa.text("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), CAST(:lsn AS pg_lsn))"), {"lsn": lsn}).scalar()
        trans.rollback()
    assert rows == expected_rows, f"updated {rows} rows, expected {expected_rows}"
    return {"wall": elapsed, "cpu": cpu_used, "wal_per_row": None if wal is None else float(wal) / rows}


def bulk_non_state(db: BenchDB):
    """Every row, a column the guard does not read (a heartbeat-style write)."""
    t = db.table
    return _rolled_back(db, [sa.update(t).values(last_heartbeat_at=airflow_writes.now())], db.rows)


def bulk_state(db: BenchDB):
    """Every row to failed (an operator failing everything); the guard reads it and lets it through."""
    t = db.table
    return _rolled_back(db, [sa.update(t).values(state="failed", end_date=airflow_writes.now())], db.rows)


def skip_route(db: BenchDB, runs: list):
    """The branch skip's statement (state, start_date, end_date) over whole runs nothing has started."""
    when = airflow_writes.now()
    statements = [airflow_writes.racy_skip(db.table, dag_id, run_id, keys, when) for dag_id, run_id, keys in runs]
    return _rolled_back(db, statements, sum(len(k) for _, _, k in runs))


WORKLOADS = ("heartbeats", "bulk non-state", "bulk state", "skip route")
BULK = ("bulk non-state", "bulk state", "skip route")


def run_bulk(db: BenchDB, runs: list) -> dict[str, dict]:
    out = {}
    for name, work in (("bulk non-state", bulk_non_state), ("bulk state", bulk_state), ("skip route", lambda d: skip_route(d, runs))):
        out[name] = work(db)
        db.maintain()
    return out
