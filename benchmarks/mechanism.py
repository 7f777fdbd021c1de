"""What each variant makes the database do, counted rather than timed: not disturbed by load.

    .venv/bin/python benchmarks/mechanism.py [--rows 20000]

PostgreSQL: WAL bytes per updated row (after a CHECKPOINT, so full-page images fall the same way
for every variant) and trigger function calls (track_functions). SQLite: the opcodes of each
statement's program and how many trigger programs it runs per row (EXPLAIN).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sqlalchemy as sa  # noqa: E402

import bench_data  # noqa: E402
import bench_variants  # noqa: E402
from ti_guard import airflow_writes  # noqa: E402


def statements(db: bench_data.BenchDB, runs) -> dict:
    t, when = db.table, airflow_writes.now()
    dag_id, run_id, keys = runs[0]
    return {
        "bulk non-state": sa.update(t).values(last_heartbeat_at=when),
        "bulk state": sa.update(t).values(state="failed", end_date=when),
        "skip route": airflow_writes.racy_skip(t, dag_id, run_id, keys, when),
    }


def postgresql_counts(db, variant, stmts) -> dict:
    out = {}
    for name, stmt in stmts.items():
        with db.engine.connect() as conn:
            conn.exec_driver_sql("CHECKPOINT")
            conn.exec_driver_sql("SET track_functions = 'pl'")
            conn.commit()
            lsn = conn.exec_driver_sql("SELECT pg_current_wal_insert_lsn()").scalar()
            rows = conn.execute(stmt).rowcount
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    args = parser.parse_args(argv)
    for backend, count in (("postgresql", postgresql_counts), ("sqlite", sqlite_counts)):
        db = bench_data.open_db(backend)
        try:
            bench_data.grow(db, args.rows)
            stmts = statements(db, bench_data.fresh_runs(db, 1))
            print(f"\n{backend} ({args.rows:,} rows): " + " | ".join(stmts))
            for v in bench_variants.variants(backend):
                v.install(db.engine)
                try:
                    print(f"  {v.key:18s} " + " | ".join(count(db, v, stmts).values()))
                finally:
                    v.remove(db.engine)
        finally:
            db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
