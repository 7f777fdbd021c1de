"""What recording a refusal costs, timed: one statement that refuses every one of N running rows.

    .venv/bin/python benchmarks/refusals.py [--rows 100000] [--rounds 3] [--backends postgresql,mysql,sqlite]

Variants, in the same database and rounds (order rotated), on a fresh copy of the rows each time:
- none: no guard, the skip applies to every row (the write's own cost);
- ignore: each row kept and recorded (ring update + counter upsert per row);
- audit: each row let through and recorded;
- ignore unrecorded (PostgreSQL only): the same guard with the record's tables dropped, which the
  guard then skips: the cost of keeping alone, so ignore / this is the record's share;
- ignore 0.4.0 (PostgreSQL, MySQL): 0.4.0's guard from its sql/ file (tests/security/), the
  baseline for what 0.5.0's security changes cost a refused row.
Writes the guard lets through never reach the record; their counts are in mechanism.py.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sqlalchemy as sa  # noqa: E402

import bench_data  # noqa: E402
from ti_guard import airflow_writes, cli  # noqa: E402
from ti_guard.policy import COUNTS_TABLE, RECORD_TABLE  # noqa: E402

VARIANTS = ("none", "ignore", "audit", "ignore unrecorded", "ignore 0.4.0")
BASELINE = Path(__file__).resolve().parent.parent / "tests" / "security"


def _fill(engine, table, rows: int) -> None:
    with engine.begin() as conn:
        conn.execute(table.delete())
        batch = [dict(id=str(uuid.uuid4()), dag_id="d", run_id="r", task_id=f"t{i}", map_index=-1, state="running", try_number=1,
                      start_date=airflow_writes.now(), pool="p", pool_slots=1, priority_weight=1, max_tries=0) for i in range(rows)]
        for i in range(0, rows, 10_000):
            conn.execute(table.insert(), batch[i:i + 10_000])


def _set(url: str, variant: str) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        if variant == "none":
            cli.main(["uninstall", "--url", url])
            return
        if variant == "ignore 0.4.0":
            _client(url, BASELINE / f"{sa.engine.make_url(url).get_backend_name()}-0.4.0-install.sql")
            return
        assert cli.main(["install", "--url", url, f"--mode={variant.split()[0]}"]) == 0
    if variant == "ignore unrecorded":
        engine = sa.create_engine(url)
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE {RECORD_TABLE}")
            conn.exec_driver_sql(f"DROP TABLE {COUNTS_TABLE}")
        engine.dispose()


def _client(url: str, path: Path) -> None:
    """A sql/ file as a DBA installs it, through the server's own client."""
    u = sa.engine.make_url(url)
    if u.get_backend_name() == "postgresql":
        cmd, stdin = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", f"postgresql://{u.username}@{u.host}:{u.port or 5432}/{u.database}", "-f", str(path)], None
    else:
        cmd, stdin = ["mariadb", f"-u{u.username}", f"-h{u.host}", f"-P{u.port or 3306}", u.database], path.read_text()
    subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=True)


def _timed(engine, table) -> float:
    when = airflow_writes.now()
    started = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(sa.update(table).where(table.c.state == "running").values(state="skipped", start_date=when, end_date=when))
    return time.perf_counter() - started


def run(backend: str, rows: int, rounds: int) -> dict:
    db = bench_data.open_db(backend, None)
    kept = {"postgresql": VARIANTS, "mysql": [v for v in VARIANTS if v != "ignore unrecorded"], "sqlite": VARIANTS[:3]}
    times = {v: [] for v in kept[backend]}
    try:
        order = list(times)
        for r in range(rounds):
            for variant in order[r % len(order):] + order[:r % len(order)]:
                _fill(db.engine, db.table, rows)
                _set(db.url, variant)
                times[variant].append(_timed(db.engine, db.table))
                _set(db.url, "none")
    finally:
        db.close()
    return {v: statistics.median(t) for v, t in times.items()}, {v: max(t) / min(t) for v, t in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backends", default="postgresql,mysql,sqlite")
    args = parser.parse_args(argv)
    print(f"| backend | {' | '.join(VARIANTS)} | ignore / none | record's share (ignore / ignore unrecorded) | ignore / ignore 0.4.0 | spread of ignore 0.4.0 (slowest / fastest round) |")
    print("|---|" + "---|" * (len(VARIANTS) + 4))
    for backend in args.backends.split(","):
        med, spread = run(backend, args.rows, args.rounds)
        cells = [f"{med[v]:.2f} s ({med[v] / args.rows * 1e6:.0f} µs/row)" if v in med else "-" for v in VARIANTS]
        share = f"{med['ignore'] / med['ignore unrecorded']:.2f}x" if "ignore unrecorded" in med else "-"
        versus, noise = (f"{med['ignore'] / med['ignore 0.4.0']:.2f}x", f"{spread['ignore 0.4.0']:.2f}x") if "ignore 0.4.0" in med else ("-", "-")
        print(f"| {backend} | {' | '.join(cells)} | {med['ignore'] / med['none']:.1f}x | {share} | {versus} | {noise} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
