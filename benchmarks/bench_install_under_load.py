"""How long writers wait while `ti-guard install` waits for its lock under a steady write load.

The scenario of tests/rollout/test_install_under_load.py (heartbeat and bulk writers, long
scheduler-like transactions that make the install's first attempt meet a lock held past its
timeout), run through the same code (tests/rollout/load.py: `install_under_load`); the test asserts
what happened, this prints how long it took. Each round measures its own baseline: the slowest
write in the seconds before the install, on the same database with the same writers. The figure
is the slowest write during the install over that baseline, and the slowest write during the
install against the lock timeout (a writer queued behind the install's lock request waits at most
about the lock timeout, plus the install's own DDL once it holds the lock).

    .venv/bin/python benchmarks/bench_install_under_load.py [--backends postgresql,mysql,mysql9] [--rounds 3] [--lock-timeout 1]

Not a test and not run by CI; needs the servers of the test suite (README). A figure on a shared
2-core machine says what happened in that run, not how fast anything is.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import sqlalchemy as sa

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from bench_data import DEFAULT_URLS  # noqa: E402
from rollout.load import install_under_load  # noqa: E402
from ti_guard import cli  # noqa: E402
from ti_guard.airflow_shape import task_instance_table  # noqa: E402
from ti_guard.db import make_engine, scratch_database  # noqa: E402
from ti_guard.render import dialect_name  # noqa: E402

SERVERS = ("postgresql", "mysql", "mysql9")


def one_round(server: str, lock_timeout: float) -> dict:
    url = DEFAULT_URLS[server]
    if "pymysql" in url and "ssl_disabled" not in url:
        url += "?ssl_disabled=true"
    with scratch_database(url, "ti_guard_bench_load") as db_url:
        engine = make_engine(db_url)
        try:
            table = task_instance_table(sa.MetaData())
            table.metadata.create_all(engine)
            db = SimpleNamespace(engine=engine, url=db_url, server=server, backend=dialect_name(engine.dialect.name),
                                 cli=lambda *args: cli.main([*args, "--url", db_url]))
            run = install_under_load(db, table, lock_timeout)
        finally:
            engine.dispose()
    load = run["load"]
    baseline = load.max_wait(0, run["baseline_end"])
    during = load.max_wait(run["started"], run["finished"])
    return {"rc": run["rc"], "install_s": run["finished"] - run["started"], "lock_timeouts": len(run["gave_up"]),
            "writes_before": load.count(0, run["baseline_end"]), "writes_during": load.count(run["started"], run["finished"]),
            "baseline_s": baseline, "during_s": during, "ratio": during / baseline if baseline else float("inf")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default=",".join(SERVERS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lock-timeout", type=float, default=1.0)
    args = parser.parse_args(argv)
    print(f"lock timeout {args.lock_timeout:g} s; per round: slowest write during the install / slowest write before it (same run)")
    print("| backend | round | install s | lock timeouts | writes before / during | slowest before s | slowest during s | during / before | during / lock timeout |")
    print("|---|---|---|---|---|---|---|---|---|")
    for server in [b.strip() for b in args.backends.split(",") if b.strip()]:
        ratios = []
        for n in range(1, args.rounds + 1):
            r = one_round(server, args.lock_timeout)
            ratios.append(r["ratio"])
            print(f"| {server} | {n}{'' if r['rc'] == 0 else ' (install failed: rc ' + str(r['rc']) + ')'} | {r['install_s']:.2f} | {r['lock_timeouts']} | "
                  f"{r['writes_before']} / {r['writes_during']} | {r['baseline_s']:.3f} | {r['during_s']:.3f} | {r['ratio']:.1f}x | "
                  f"{r['during_s'] / args.lock_timeout:.2f} |", flush=True)
        print(f"| {server} | median | | | | | | {statistics.median(ratios):.1f}x | |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
