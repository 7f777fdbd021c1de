"""What reading the client's statement costs on MySQL (set_state_skip on Airflow 3 tables). Not a test.

    .venv/bin/python benchmarks/bench_signal.py                          # MySQL 9.7 and MariaDB, 50k rows, 7 rounds
    .venv/bin/python benchmarks/bench_signal.py --backends mysql9 --rows 2000 --rounds 1 --statements 20   # smoke
    .venv/bin/python benchmarks/bench_signal.py --mariadb-callgrind   # MariaDB instructions per row (mechanism.py's counts), ~10 min

Three triggers on one table, in one run, the order rotating per round: `before` is today's renderer
with the statement signal taken out (the guard as it was: set_state_skip not installed on Airflow 3
tables), `before again` the same SQL once more (the spread of the baseline against itself), `after`
the guard as shipped. Workloads, each in a transaction rolled back so every trigger meets the same rows:

- heartbeats: one bulk UPDATE of last_heartbeat_at over every row (no state in SET: the first IF)
- run timeout: running -> skipped without end_date, bulk (enters set_state_skip's old-state test, not its value test)
- self-finish: running -> skipped with next_method = NULL, one statement per row (reads the statement, goes through)
- set_state: running -> skipped, state/end_date/duration/updated_at, one statement per row (reads the
  statement; `after` keeps and records the row, `before` lets it through)
- set_state, statement not readable: the same with the thread set INSTRUMENTED='NO' (the fallback's cost)

Prints the server thread's CPU milliseconds (per statement for the single-row workloads, per bulk
statement otherwise; read from /proc, resolution 10 ms per measurement: the server must run on this
machine), median and min-max over rounds, and each variant over `before` in the same round.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_data  # noqa: E402
from bench_workloads import _cpu_clock  # noqa: E402
from bench_variants import Variant  # noqa: E402
from sqlalchemy.dialects import mysql as mysql_dialect  # noqa: E402

from ti_guard import record  # noqa: E402
from ti_guard.airflow_shape import AIRFLOW_3_COLUMNS  # noqa: E402
from ti_guard.policy import ENDS_WITHOUT_NEXT_METHOD, Policy  # noqa: E402
from ti_guard.render import mysql as render_mysql  # noqa: E402

STAMP = "'2026-12-04 10:00:00.123456'"


def _guard(sees) -> list:
    saved = render_mysql.SEES
    render_mysql.SEES = sees
    try:
        return render_mysql.render(Policy.build(mode="ignore"), AIRFLOW_3_COLUMNS)
    finally:
        render_mysql.SEES = saved


def variants() -> list[Variant]:
    dialect, policy = mysql_dialect.dialect(), Policy.build()
    made, dropped = record.create_statements(dialect, policy), record.drop_statements(dialect, policy)
    before = _guard(render_mysql.SEES - {ENDS_WITHOUT_NEXT_METHOD})
    after = _guard(render_mysql.SEES)
    assert before[0].create != after[0].create
    return [
        Variant(key, made + [o.create for o in objects], [o.drop for o in objects] + dropped)
        for key, objects in (("before", before), ("before again", before), ("after", after))
    ]


def _clocked(db, conn):
    """Milliseconds of the server thread's CPU (what the statements burn, steady on a shared
    machine where wall time is not), or of wall time where the server runs elsewhere."""
    cpu = _cpu_clock(db, conn) or time.perf_counter
    return lambda: 1000 * cpu()


def _single(db, ids, statement: str, setup: tuple = ()) -> float:
    """Milliseconds per statement, one per running row, in one transaction rolled back."""
    with db.engine.connect() as conn:
        for sql in setup:
            conn.exec_driver_sql(sql)
        clock = _clocked(db, conn)
        started = clock()
        for i in ids:
            conn.exec_driver_sql(statement.format(id=i))
        spent = clock() - started
        conn.rollback()
        if setup:  # the pooled session goes back instrumented
            conn.exec_driver_sql("UPDATE performance_schema.threads SET INSTRUMENTED = 'YES' WHERE PROCESSLIST_ID = CONNECTION_ID()")
            conn.commit()
    return spent / len(ids)


def _bulk(db, statement: str) -> float:
    with db.engine.connect() as conn:
        clock = _clocked(db, conn)
        started = clock()
        conn.exec_driver_sql(statement)
        spent = clock() - started
        conn.rollback()
    return spent


SET_STATE = f"UPDATE task_instance SET state='skipped', end_date={STAMP}, duration=61.0, updated_at={STAMP} WHERE task_instance.id = '{{id}}'"
SELF_FINISH = (
    f"UPDATE task_instance SET state='skipped', end_date={STAMP}, duration=61.0, next_method=NULL, next_kwargs=NULL, "
    f"rendered_map_index=NULL, updated_at={STAMP} WHERE task_instance.id = '{{id}}'"
)
UNRECORDED = ("UPDATE performance_schema.threads SET INSTRUMENTED = 'NO' WHERE PROCESSLIST_ID = CONNECTION_ID()",)
WORKLOADS = {
    "heartbeats, bulk (ms)": lambda db, ids: _bulk(db, f"UPDATE task_instance SET last_heartbeat_at = {STAMP}"),
    "run timeout, bulk (ms)": lambda db, ids: _bulk(db, f"UPDATE task_instance SET state='skipped', updated_at={STAMP} WHERE state = 'running'"),
    "self-finish (ms/stmt)": lambda db, ids: _single(db, ids, SELF_FINISH),
    "set_state (ms/stmt)": lambda db, ids: _single(db, ids, SET_STATE),
    "set_state, thread not instrumented (ms/stmt)": lambda db, ids: _single(db, ids, SET_STATE, UNRECORDED),
}


def bench(backend: str, args) -> str:
    db = bench_data.open_db(backend)
    try:
        bench_data.grow(db, args.rows)
        ids = bench_data.running_ids(db, args.statements)
        with db.engine.connect() as conn:
            ps = conn.exec_driver_sql("SELECT @@performance_schema").scalar()
        found = {}
        vs = variants()
        for r in range(args.rounds):
            for v in vs[r % len(vs):] + vs[: r % len(vs)]:
                v.install(db.engine)
                try:
                    for w, work in WORKLOADS.items():
                        found.setdefault((v.key, w), []).append(work(db, ids))
                finally:
                    v.remove(db.engine)
        lines = [f"{db.server_version()}, performance_schema={'ON' if ps else 'OFF'}, {db.rows:,} rows "
                 f"({len(ids)} running), {args.rounds} rounds",
                 "", "| workload | " + " | ".join(v.key for v in vs) + " | after / before (min-max) | before again / before (min-max) |",
                 "|---|" + "---|" * (len(vs) + 2)]
        for w in WORKLOADS:
            cells = []
            for v in vs:
                t = found[(v.key, w)]
                cells.append(f"{statistics.median(t):.3f} ({min(t):.3f}-{max(t):.3f})")
            ratios = []
            for key in ("after", "before again"):
                per_round = [a / b for a, b in zip(found[(key, w)], found[("before", w)])]
                ratios.append(f"{statistics.median(per_round):.2f}x ({min(per_round):.2f}-{max(per_round):.2f})")
            lines.append(f"| {w} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
        return "\n".join(lines)
    finally:
        db.close()


def counted(rows: int) -> str:
    """mechanism.py's MariaDB counts (callgrind, a throwaway server) for the three triggers, plus
    the two one-row skips that read the statement."""
    import callgrind_mariadb
    import mechanism
    import sqlalchemy as sa

    with callgrind_mariadb.server() as server:
        db = bench_data.open_db("mysql", server.url)
        try:
            bench_data.grow(db, rows)
            stmts = mechanism.statements(db, bench_data.fresh_runs(db, 10))
            ids = bench_data.running_ids(db, mechanism.HEARTBEATS)
            stmts["self-finish"] = [sa.text(SELF_FINISH.format(id=i)) for i in ids]
            stmts["set_state"] = [sa.text(SET_STATE.format(id=i)) for i in ids]
            lines = [f"{db.server_version()} under callgrind, {rows:,} rows, Ir per row (one-row statements: per statement)",
                     "", "| trigger | " + " | ".join(stmts) + " |", "|---|" + "---|" * len(stmts)]
            count = mechanism.mysql_counts(server)
            for v in variants():
                v.install(db.engine)
                try:
                    lines.append(f"| {v.key} | " + " | ".join(count(db, v, stmts).values()) + " |")
                finally:
                    v.remove(db.engine)
            return "\n".join(lines)
        finally:
            db.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mariadb-callgrind", action="store_true")
    parser.add_argument("--mariadb-rows", type=int, default=5_000)
    parser.add_argument("--backends", default="mysql9,mysql")
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--statements", type=int, default=400)
    args = parser.parse_args()
    print(f"{platform.node()}: {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores, Python {platform.python_version()}")
    if args.mariadb_callgrind:
        print(counted(args.mariadb_rows))
        return 0
    for backend in args.backends.split(","):
        print()
        print(bench(backend, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
