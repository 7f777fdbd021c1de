"""What each variant makes the database do, counted rather than timed: not disturbed by load.

    .venv/bin/python benchmarks/mechanism.py [--rows 20000] [--mariadb-callgrind]

PostgreSQL: WAL bytes per updated row (after a CHECKPOINT, so full-page images fall the same way
for every variant) and trigger function calls (track_functions). SQLite: the opcodes of each
statement's program and how many trigger programs it runs per row (EXPLAIN). MariaDB, with
--mariadb-callgrind (valgrind on this machine; ~10 min at the default 5,000 rows there): the
instructions per updated row of the server thread running the statement, counted by callgrind
in a throwaway server (callgrind_mariadb.py).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sqlalchemy as sa  # noqa: E402

import bench_data  # noqa: E402
import bench_variants  # noqa: E402
import callgrind_mariadb  # noqa: E402
from ti_guard import airflow_writes  # noqa: E402


HEARTBEATS = 20


def statements(db: bench_data.BenchDB, runs) -> dict:
    t, when = db.table, airflow_writes.now()
    skips = [airflow_writes.racy_skip(t, dag_id, run_id, keys, when) for dag_id, run_id, keys in runs]
    out = {
        "bulk non-state": sa.update(t).values(last_heartbeat_at=when),
        "bulk state": sa.update(t).values(state="failed", end_date=when),
        "skip route": skips[0],
        # The racy skip's shape over every running row: each one is refused (raise: the first
        # fails the statement), kept and recorded (ignore) or let through and recorded (audit).
        "refused skip": sa.update(t).where(t.c.state == "running").values(state="skipped", start_date=when, end_date=when),
    }
    if db.backend == "mysql":
        # Every fresh run given: one run's 100 rows are too few against the server's own
        # background work, which callgrind counts when it lands on the statement's thread.
        out["skip route"] = skips
        # Per statement rather than per row: what a trigger costs a one-row write.
        ids = bench_data.running_ids(db, HEARTBEATS)
        out["heartbeat"] = [sa.update(t).where(t.c.id == i).values(last_heartbeat_at=when) for i in ids]
    return out


def postgresql_counts(db, variant, stmts) -> dict:
    out = {}
    for name, stmt in stmts.items():
        with db.engine.connect() as conn:
            conn.exec_driver_sql("CHECKPOINT")
            conn.exec_driver_sql("SET track_functions = 'pl'")
            conn.commit()
            lsn = conn.exec_driver_sql("SELECT pg_current_wal_insert_lsn()").scalar()
            try:
                rows = conn.execute(stmt).rowcount
            except sa.exc.DBAPIError:
                out[name] = "fails (raise)"
                conn.rollback()
                continue
            wal = conn.execute(sa.text("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), CAST(:l AS pg_lsn))"), {"l": lsn}).scalar()
            calls = conn.exec_driver_sql("SELECT coalesce(sum(calls), 0) FROM pg_stat_xact_user_functions").scalar()
            conn.rollback()
        db.maintain()
        out[name] = f"{float(wal) / rows:.0f} B/row, {calls / rows:.0f} calls/row"
    return out


def sqlite_counts(db, variant, stmts) -> dict:
    out = {}
    with db.engine.connect() as conn:
        for name, stmt in stmts.items():
            sql = str(stmt.compile(conn, compile_kwargs={"literal_binds": True}))
            ops = [row[1] for row in conn.exec_driver_sql("EXPLAIN " + sql)]
            out[name] = f"{len(ops)} opcodes, {ops.count('Program')} trigger programs/row"
    return out


def mysql_counts(server: callgrind_mariadb.Server):
    def count(db, variant, stmts) -> dict:
        out = {}
        for name, stmt in stmts.items():
            batch = stmt if isinstance(stmt, list) else [stmt]
            with db.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")  # the connection's first round trip, outside the count
                conn.rollback()
                with conn.begin() as trans:
                    rows = []
                    try:
                        instructions = server.instructions(lambda: rows.extend(conn.execute(s).rowcount for s in batch))
                    except sa.exc.DBAPIError:
                        out[name] = "fails (raise)"
                        continue
                    finally:
                        trans.rollback()
            out[name] = f"{instructions / sum(rows):,.0f} Ir/row"
        return out

    return count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--mariadb-callgrind", action="store_true", help="only MariaDB, counted under callgrind")
    parser.add_argument("--mariadb-rows", type=int, default=5_000)
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.mariadb_callgrind:
            missing = callgrind_mariadb.available()
            if missing:
                parser.error(f"--mariadb-callgrind needs {missing} on this machine")
            server = stack.enter_context(callgrind_mariadb.server())
            plan = [("mysql", mysql_counts(server), server.url, args.mariadb_rows)]
        else:
            plan = [("postgresql", postgresql_counts, None, args.rows), ("sqlite", sqlite_counts, None, args.rows)]
        for backend, count, url, rows in plan:
            show(backend, count, url, rows)
    return 0


def show(backend, count, url, rows) -> None:
    db = bench_data.open_db(backend, url)
    try:
        bench_data.grow(db, rows)
        stmts = statements(db, bench_data.fresh_runs(db, 10))
        print(f"\n{backend} ({rows:,} rows): " + " | ".join(stmts), flush=True)
        for v in bench_variants.variants(backend):
            v.install(db.engine)
            try:
                print(f"  {v.key:18s} " + " | ".join(count(db, v, stmts).values()), flush=True)
            finally:
                v.remove(db.engine)
    finally:
        db.close()


if __name__ == "__main__":
    sys.exit(main())
