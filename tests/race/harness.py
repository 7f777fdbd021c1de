"""The race of apache/airflow#63266, reproduced: workers vs the pre-fix skip UPDATE, with and without the guard.

    .venv/bin/python -m tests.race.harness --url postgresql+psycopg://postgres@127.0.0.1:5432/test \\
        --url mysql+pymysql://root@127.0.0.1:3306/test --races 100000 [--readme]

For each URL it creates a scratch database on that server (dropped at the end; --in-place
uses the database the URL names, which must have no task_instance), then runs three
variants on a fresh Airflow-shaped task_instance: no guard, guard in raise mode, guard in
ignore mode. What happened is read from the observer's log (tests/race/observer.py), never
from the guard: an overwrite is a committed running/success/failed -> skipped written by the
skip writer. --readme rewrites the race block of README.md with the figures of this run.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from ti_guard import cli
from ti_guard.airflow_shape import task_instance_table
from ti_guard.db import make_engine, scratch_database
from ti_guard.policy import DEFAULT_PROTECT
from ti_guard.render import dialect_name

from . import observer
from .workload import Plan, Race, seed

VARIANTS = ("none", "raise", "ignore")
UNGUARDED = (None, "scheduled", "queued")
README = Path(__file__).resolve().parents[2] / "README.md"
BLOCK = re.compile(r"(<!-- race:begin[^\n]*-->\n)(.*?)(<!-- race:end -->)", re.S)


@dataclass
class Result:
    backend: str
    variant: str
    plan: Plan
    seconds: float
    counts: Counter
    log: dict = field(repr=False)

    def _skip_rows(self, old_states) -> int:
        return sum(n for (w, o, new, _), n in self.log.items() if w == observer.SKIP_WRITER and new == "skipped" and o in old_states)

    @property
    def races(self) -> int:
        return self.counts["races"]

    @property
    def overwrites(self) -> dict[str, int]:
        """Committed running/success/failed -> skipped by the skip writer, per old state."""
        return {s: self._skip_rows({s}) for s in DEFAULT_PROTECT}

    @property
    def overwritten(self) -> int:
        return sum(self.overwrites.values())

    @property
    def skipped_unprotected(self) -> int:
        return self._skip_rows(UNGUARDED)

    @property
    def already_skipped(self) -> int:
        return self._skip_rows({"skipped"})

    @property
    def unchanged(self) -> int:
        """Rows a committed skip statement targeted but left as they were (ignore mode)."""
        written = sum(n for (w, _, new, _), n in self.log.items() if w == observer.SKIP_WRITER and new == "skipped")
        return self.counts["rows targeted by committed skips"] - written

    @property
    def self_skips(self) -> int:
        return self.log.get((observer.WORKER, "running", "skipped", False), 0)

    @property
    def refused(self) -> int:
        return self.counts["skip refused"]

    @property
    def kills(self) -> int:
        return self.counts["running TIs killed (409 on heartbeat/finish)"]

    @property
    def errors(self) -> dict[str, int]:
        return {k: v for k, v in self.counts.items() if " error" in k or k.endswith("refused") and not k.startswith("skip")}

    @property
    def targeted(self) -> int:
        return self.counts["rows targeted by committed skips"] + self.counts["rows in refused skips"]

    def row(self) -> list:
        o = self.overwrites
        return [
            self.backend, self.variant, self.races, self.targeted,
            f"**{self.overwritten}** ({o['running']}/{o['success']}/{o['failed']})",
            self.skipped_unprotected, self.already_skipped, self.unchanged, self.counts["rows in refused skips"],
            self.refused, self.kills, self.self_skips, f"{self.seconds:.1f}",
        ]


HEADER = ["backend", "guard", "races", "rows targeted", "overwritten (running/success/failed)", "scheduled/queued -> skipped",
          "already skipped", "left unchanged", "rows in refused skips", "skips refused", "running TIs killed (409)",
          "self-skips through", "seconds"]


def table(results: list[Result]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(str(c) for c in r.row()) + " |" for r in results]
    return "\n".join(lines)


def _cli(url: str, *args: str) -> None:
    rc = cli.main([*args, "--url", url])
    if rc != 0:
        raise RuntimeError(f"ti-guard {' '.join(args)} exited {rc}")


def _fresh_table(engine: sa.Engine, url: str) -> sa.Table:
    """Drop what an earlier variant left (guard, observer, table) and create an empty task_instance."""
    table = task_instance_table(sa.MetaData())
    with engine.connect() as conn:
        exists = sa.inspect(conn).has_table(table.name)
    if exists:
        _cli(url, "uninstall")
        with engine.begin() as conn:
            observer.uninstall(conn, table)
    table.drop(engine, checkfirst=True)
    table.metadata.create_all(engine)
    return table


def run_variant(url: str, variant: str, plan: Plan) -> Result:
    engine = make_engine(url, pool_size=2 * plan.workers + 2, poolclass=sa.pool.QueuePool)
    try:
        table = _fresh_table(engine, url)
        seed(engine, table, plan)
        with engine.begin() as conn:
            observer.install(conn, table)
        if variant != "none":
            _cli(url, "install", f"--mode={variant}")
        counts, seconds = Race(engine, table, plan).run()
        with engine.connect() as conn:
            log = observer.transitions(conn)
        return Result(dialect_name(engine.dialect.name), variant, plan, seconds, counts, log)
    finally:
        engine.dispose()


def run(url: str, plan: Plan, variants=VARIANTS, baseline_races: int | None = None) -> list[Result]:
    """All variants in the (empty) database `url`; the unguarded one may run fewer races."""
    results = []
    for variant in variants:
        races = baseline_races if variant == "none" and baseline_races else plan.races
        results.append(run_variant(url, variant, Plan(**{**plan.__dict__, "races": races})))
    return results




def refuse_a_used_database(url: str) -> None:
    """The harness drops and re-creates task_instance: never let it near a real Airflow database."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            if sa.inspect(conn).has_table(task_instance_table(sa.MetaData()).name):
                raise SystemExit(f"{engine.url.render_as_string()} already has a task_instance: --in-place needs an empty database")
    finally:
        engine.dispose()


def server_version(url: str) -> str:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            version = conn.exec_driver_sql("SELECT version()").scalar()
    finally:
        engine.dispose()
    version = version.split(" on ")[0].split(",")[0]
    return f"{version} (standing in for MySQL 8)" if "MariaDB" in version else version


def machine() -> str:
    mem = next((int(line.split()[1]) // 2**20 for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")), 0) if Path("/proc/meminfo").exists() else 0
    return (f"{os.cpu_count()} cores, {mem} GiB, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, SQLAlchemy {sa.__version__}")


def summary(results: list[Result]) -> str:
    lines = []
    for backend in dict.fromkeys(r.backend for r in results):
        by = {r.variant: r for r in results if r.backend == backend}
        parts = []
        if "none" in by:
            n = by["none"]
            parts.append(f"without the guard {n.overwritten} rows overwritten in {n.races} races ({n.kills} running tasks killed)")
        guarded = [by[m] for m in ("raise", "ignore") if m in by]
        if guarded:
            parts.append("with it " + " and ".join(f"{r.overwritten} in {r.races} races ({r.variant}; {r.self_skips} self-skips went through)" for r in guarded))
        lines.append(f"- {backend}: " + "; ".join(parts) + ".")
    return "\n".join(lines)


def block(results: list[Result], versions: list[str], command: str) -> str:
    plan = results[0].plan
    return (
        summary(results) + "\n\n"
        f"Measured with `{command}` on {machine()}; {'; '.join(versions)}. Other work shared the "
        "machine, so the seconds say how long the run took, not how fast anything is. CI runs the same through pytest "
        "(`tests/race`, 10,000 races per guarded variant and backend, 2,000 without the guard; `TI_GUARD_RACES` and "
        "`TI_GUARD_BASELINE_RACES` ask for more).\n"
        f"Each race is one pre-fix skip UPDATE over 2-{plan.tasks_per_run} task instances of a dag run while a worker "
        f"moves that run's {plan.tasks_per_run} task instances queued -> running -> (heartbeat) -> success/failed/skipped "
        f"({plan.workers} workers, each with a skip writer of its own, one connection each). An overwrite is a committed "
        "running/success/failed -> skipped written by the skip writer, read from an AFTER UPDATE observer, not from the guard; "
        "a killed TI is a worker's heartbeat or finish finding its running TI gone (the seed's 409). Each targeted row is "
        "counted once, by its committed state when the skip wrote it: overwritten, skipped from scheduled/queued, already "
        "skipped (by the task itself or an earlier skip of the same run), left unchanged (ignore mode), or in a statement the "
        "guard refused (raise mode; the whole statement fails).\n\n"
        + table(results) + "\n"
    )


def write_readme(text: str, path: Path = README) -> None:
    readme = path.read_text()
    if not BLOCK.search(readme):
        raise RuntimeError(f"no race block in {path}")
    path.write_text(BLOCK.sub(lambda m: m.group(1) + text + m.group(3), readme, count=1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.race.harness", description=__doc__.split("\n")[0])
    parser.add_argument("--url", action="append", required=True, help="a PostgreSQL or MySQL/MariaDB server (repeatable)")
    parser.add_argument("--races", type=int, default=10_000, help="races per guarded variant (default 10000)")
    parser.add_argument("--baseline-races", type=int, help="races without the guard (default: as many as --races)")
    parser.add_argument("--workers", type=int, default=Plan.workers)
    parser.add_argument("--in-place", action="store_true", help="use the database the URL names instead of a scratch one")
    parser.add_argument("--readme", action="store_true", help="rewrite the race block of README.md with this run's figures")
    args = parser.parse_args(argv)
    plan = Plan(races=args.races, workers=args.workers)
    results, versions = [], []
    for url in args.url:
        versions.append(server_version(url))
        if args.in_place:
            refuse_a_used_database(url)
            got = run(url, plan, baseline_races=args.baseline_races)
        else:
            with scratch_database(url, "ti_guard_race") as scratch:
                got = run(url=scratch, plan=plan, baseline_races=args.baseline_races)
        for r in got:
            print(table([r]).splitlines()[-1], flush=True)
            for message, n in r.errors.items():
                print(f"    {n} x {message}")
            lag = r.counts["handoff lag total (s)"] / max(1, r.races)
            print(f"    handoff lag mean {lag * 1000:.1f} ms, max {r.counts['handoff lag max (s)'] * 1000:.0f} ms; {dict((k, v) for k, v in r.counts.items() if 'lag' not in k)}")
        results += got
    print()
    print(table(results))
    if args.readme:
        shown = ["python -m tests.race.harness", *(f"--url {u.split('://')[0]}://..." for u in args.url), f"--races {args.races}"]
        if args.baseline_races:
            shown.append(f"--baseline-races {args.baseline_races}")
        write_readme(block(results, versions, " ".join(shown)))
        print(f"\nwrote the race block of {README}")
    bad = [r for r in results if (r.variant == "none") == (r.overwritten == 0) or (r.variant != "none" and r.kills) or r.errors]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
