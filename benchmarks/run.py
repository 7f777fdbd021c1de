"""The guard's cost, side by side with no trigger, its floor and a naive trigger. Not a test.

    .venv/bin/python benchmarks/run.py                      # 100k rows; install at 100k and 1M
    .venv/bin/python benchmarks/run.py --rows 1000000       # every workload at 1M rows
    .venv/bin/python benchmarks/run.py --rows 2000 --rounds 1 --heartbeats 10 --heartbeat-repeats 1 --install-rows 2000 --install-rounds 1 --out /tmp/bench   # smoke, ~20 s
    .venv/bin/python benchmarks/run.py --docs               # also rewrite the bench block of docs/performance.md

Per backend, in one process: an Airflow 3.3.2-shaped task_instance in a fresh database, then in
each round every variant in turn (the order rotates from round to round), each running every
workload. Writes benchmarks/results/latest.md and latest.json (raw seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_data  # noqa: E402
import bench_install  # noqa: E402
import bench_report  # noqa: E402
import bench_variants  # noqa: E402
import bench_workloads  # noqa: E402

HEARTBEAT_IDS = 200
MIN_CPU_SECONDS = 0.5
NONE = bench_variants.NONE
SKIP_RUNS = 100


def log(message: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def bench_backend(backend: str, args) -> dict:
    db = bench_data.open_db(backend)
    try:
        started = time.perf_counter()
        bench_data.grow(db, args.rows)
        log(f"{backend}: {db.rows:,} rows loaded in {time.perf_counter() - started:.1f} s")
        ids, runs = bench_data.running_ids(db, HEARTBEAT_IDS), bench_data.fresh_runs(db, SKIP_RUNS)
        variants = bench_variants.variants(db.backend)
        timings = {v.key: {w: [] for w in bench_workloads.WORKLOADS} for v in variants}
        wall = {v.key: {w: [] for w in bench_workloads.BULK} for v in variants}
        wal = {v.key: {w: [] for w in bench_workloads.BULK} for v in variants}
        cpu = {v.key: {w: [] for w in bench_workloads.BULK} for v in variants}

        def each_variant(r, work):
            # Rotate so no variant always runs first (cold) or right after a costly one.
            for v in variants[r % len(variants) :] + variants[: r % len(variants)]:
                v.install(db.engine)
                try:
                    work(v)
                finally:
                    v.remove(db.engine)

        def beat(v):
            timings[v.key]["heartbeats"].append(bench_workloads.heartbeats(db, ids, args.heartbeats))

        def bulk(v):
            for w, m in bench_workloads.run_bulk(db, runs).items():
                wall[v.key][w].append(m["wall"])
                if m["cpu"] is not None:
                    cpu[v.key][w].append(m["cpu"])
                if m["wal_per_row"] is not None:
                    wal[v.key][w].append(m["wal_per_row"])

        # Heartbeats are short: many small interleaved runs give a steadier median than a few long ones.
        for r in range(args.rounds * args.heartbeat_repeats):
            each_variant(r, beat)
        log(f"{backend}: heartbeats done")
        for r in range(args.rounds):
            each_variant(r, bulk)
            log(f"{backend}: bulk round {r + 1}/{args.rounds} done")
        # CPU time where it is read, unless the clock's ticks (10 ms) are too coarse for the workload.
        cpu_measured = {w for w in bench_workloads.BULK if cpu[NONE][w] and min(cpu[NONE][w]) >= MIN_CPU_SECONDS and all(cpu[k][w] for k in cpu)}
        for v in variants:
            for w in bench_workloads.BULK:
                timings[v.key][w] = cpu[v.key][w] if w in cpu_measured else wall[v.key][w]
        install = {}
        for size in sorted(args.install_rows):
            if size < db.rows:
                log(f"{backend}: install at {size:,} rows skipped (table already holds {db.rows:,})")
                continue
            bench_data.grow(db, size)
            repeat = range(args.install_rounds or args.rounds)
            install[str(size)] = {
                "quiet_s": [bench_install.quiet_install(db) for _ in repeat],
                "contended": [bench_install.contended_install(db, ids[:1]) for _ in repeat],
            }
            log(f"{backend}: install at {size:,} rows measured")
        return {
            "server": db.server_version(),
            "rows": args.rows,
            "rounds": args.rounds,
            "heartbeat_ops": bench_workloads.HEARTBEAT_THREADS * args.heartbeats,
            "order": [v.key for v in variants],
            "floors": {v.key: v.floor for v in variants if v.floor},
            "timing": {v.key: v.timing for v in variants},
            "sql": {v.key: v.create for v in variants},
            "timings": timings,
            "wall": wall,
            # Includes full-page images, so it moves with checkpoints: benchmarks/mechanism.py counts it cleanly.
            "wal_bytes_per_row_with_fpi": wal if backend == "postgresql" else None,
            "metric": {w: ("CPU" if w in cpu_measured else "wall") for w in bench_workloads.BULK} | {"heartbeats": "wall"},
            "install": install,
        }
    finally:
        db.close()


def machine() -> str:
    mem = ""
    try:
        kib = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal")))
        mem = f", {kib / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    return f"{os.cpu_count()} cores{mem}, {platform.system()} {platform.release()}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows in task_instance for the workloads (default 100000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; every variant runs once per round (default 3)")
    parser.add_argument("--heartbeats", type=int, default=50, help=f"commits per connection per heartbeat run ({bench_workloads.HEARTBEAT_THREADS} connections)")
    parser.add_argument("--heartbeat-repeats", type=int, default=4, help="heartbeat runs per variant per round (default 4)")
    parser.add_argument("--install-rows", type=lambda s: [int(x) for x in s.split(",")], default=None, help="table sizes for the install workload (default: ROWS and 10x ROWS)")
    parser.add_argument("--install-rounds", type=int, default=None, help="install repetitions per size (default: --rounds)")
    parser.add_argument("--backends", default="postgresql,mysql,mysql9,sqlite", help="mysql: MariaDB on 3306; mysql9: MySQL 9.7 on 3307")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--merge", action="store_true", help="keep the other backends of the existing results/latest.json (re-run one backend)")
    parser.add_argument("--docs", action="store_true", help="rewrite the bench block of docs/performance.md from the results")
    parser.add_argument("--docs-only", action="store_true", help="no measuring: rewrite results/latest.md and docs/performance.md from results/latest.json")
    args = parser.parse_args(argv)
    latest, notes = args.out / "latest.md", HERE / "NOTES.md"
    if args.docs_only:
        # Re-render the table from the raw results (the report may have changed), then the page.
        latest.write_text(bench_report.markdown(json.loads((args.out / "latest.json").read_text())))
        bench_report.update_docs(latest, notes)
        return 0
    if args.install_rows is None:
        args.install_rows = [args.rows, args.rows * 10]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    data = {"backends": {}}
    if args.merge and (args.out / "latest.json").exists():
        data["backends"] = json.loads((args.out / "latest.json").read_text())["backends"]
    args.out.mkdir(parents=True, exist_ok=True)
    for backend in backends:
        data["backends"][backend] = bench_backend(backend, args)
        data["backends"][backend]["measured"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        data["backends"][backend]["command"] = " ".join(["python benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])])
        # Keep what is measured so far: a long run interrupted later still leaves its numbers.
        (args.out / "partial.json").write_text(json.dumps(data, indent=1))
    import sqlalchemy

    data["meta"] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "versions": ", ".join(
            [f"Python {platform.python_version()}", f"SQLAlchemy {sqlalchemy.__version__}"]
            + [r["server"] for r in data["backends"].values()]
        ),
        "command": " ".join(["python benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "heartbeat": (
            f"{bench_workloads.HEARTBEAT_THREADS} connections x {args.heartbeats} single-row commits, "
            f"{args.heartbeat_repeats} runs per variant per round"
        ),
    }
    text = bench_report.markdown(data)
    latest.write_text(text)
    (args.out / "latest.json").write_text(json.dumps(data, indent=1))
    (args.out / "partial.json").unlink(missing_ok=True)
    print(text)
    if args.docs:
        bench_report.update_docs(latest, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
