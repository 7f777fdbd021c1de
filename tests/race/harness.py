"""The races of apache/airflow#63266 and #60330, reproduced: workers vs the pre-fix skip UPDATE and the
pre-3.3 schedule_tis, with and without the guard.

    .venv/bin/python -m tests.race.harness --url postgresql+psycopg://postgres@127.0.0.1:5432/test \\
        --url mysql+pymysql://root@127.0.0.1:3306/test --url mysql+pymysql://root@127.0.0.1:3307/test \\
        --races 100000 [--docs] [--block-out FILE]     # 3307: MySQL 9.7 (tests/servers/mysql97.sh)

For each URL it creates a scratch database on that server (dropped at the end; --in-place
uses the database the URL names, which must have no task_instance), then runs three
variants on a fresh Airflow-shaped task_instance: no guard, guard in raise mode, guard in
ignore mode. What happened is read from the observer's log (tests/race/observer.py), never
from the guard: an overwrite is a committed running/success/failed -> skipped written by the
skip writer, or running/success/failed -> scheduled written by the schedule writer; a kill is
a worker's 409 on a heartbeat or finish, put down to the writer that took the row out of
running. --docs rewrites the race block of docs/deployments.md and the report block of
docs/operations.md with this run's figures; --block-out FILE writes the race block to FILE.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from ti_guard import cli, docblock
from ti_guard.config import resolve
from ti_guard.lifecycle import report
from ti_guard.report import as_text, parse_since
from ti_guard.airflow_shape import task_instance_table
from ti_guard.db import make_engine, scratch_database
from ti_guard.policy import DEFAULT_PROTECT
from ti_guard.render import dialect_name

from . import observer
from .workload import SCHEDULABLE, Plan, Race, seed

VARIANTS = ("none", "raise", "ignore", "audit")
GUARDING = ("raise", "ignore")  # audit lets every write through: it guards nothing
# Old states of rows the skip writer may skip, guard or not (the policy does not protect them).
UNGUARDED = (None, "scheduled", "queued", "up_for_retry", "up_for_reschedule")
SKIP, SCHEDULE = observer.SKIP_WRITER, observer.SCHEDULE_WRITER
# The seed's production figures (apache/airflow#63266): 409s on heartbeat per day.
SEED = {"before any fix": "14-169", "after the schedule_tis fix alone": "3-4", "after both fixes": "0"}


@dataclass
class Result:
    backend: str
    variant: str
    plan: Plan
    seconds: float
    counts: Counter
    log: dict = field(repr=False)
    # (run_id, task_id) -> writers of its committed transitions out of running (observer.left_running)
    exits: dict = field(default_factory=dict, repr=False)
    # (run_id, task_id) of every TI whose worker met a 409 on a heartbeat or a finish
    killed: list = field(default_factory=list, repr=False)
    # (rule, action, old_state) -> refusals, as `ti-guard report` reads them from the guard's record
    recorded: Counter = field(default_factory=Counter, repr=False)
    report_text: str = field(default="", repr=False)  # `ti-guard report` at the end of the variant

    def recorded_by(self, rule: str) -> int:
        return sum(n for (r, _, _), n in self.recorded.items() if r == rule)

    def _rows(self, writer, old_states, new_states) -> int:
        return sum(n for (w, o, new, _), n in self.log.items() if w == writer and new in new_states and o in old_states)

    def _skip_rows(self, old_states) -> int:
        return self._rows(SKIP, old_states, {"skipped"})

    # -- the skip writer ------------------------------------------------------------------

    @property
    def races(self) -> int:
        return self.counts["skip races"]

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
        written = sum(n for (w, _, new, _), n in self.log.items() if w == SKIP and new == "skipped")
        return self.counts["rows targeted by committed skips"] - written

    @property
    def self_skips(self) -> int:
        return self.log.get((observer.WORKER, "running", "skipped", False), 0)

    @property
    def refused(self) -> int:
        return self.counts["skip refused"]

    @property
    def targeted(self) -> int:
        return self.counts["rows targeted by committed skips"] + self.counts["rows in refused skips"]

    # -- the schedule writer --------------------------------------------------------------

    @property
    def schedule_races(self) -> int:
        return self.counts["schedule races"]

    @property
    def schedule_overwrites(self) -> dict[str, int]:
        """Committed running/success/failed -> scheduled by the schedule writer, per old state."""
        return {s: self._rows(SCHEDULE, {s}, {"scheduled"}) for s in DEFAULT_PROTECT}

    @property
    def schedule_overwritten(self) -> int:
        return sum(self.schedule_overwrites.values())

    @property
    def scheduled_legitimately(self) -> int:
        """Rows the stale read got right: NULL/up_for_retry/up_for_reschedule -> scheduled."""
        return self._rows(SCHEDULE, set(SCHEDULABLE), {"scheduled"})

    @property
    def scheduled_other(self) -> int:
        """scheduled/queued/skipped (neither protected nor schedulable) -> scheduled; queued ones lose their start."""
        olds = {o for (w, o, _, _) in self.log if w == SCHEDULE} - set(DEFAULT_PROTECT) - set(SCHEDULABLE)
        return self._rows(SCHEDULE, olds, {"scheduled"})

    @property
    def schedule_kept(self) -> int:
        """Rows a committed schedule statement targeted and the guard kept as they were."""
        return sum(n for (w, o, new, _), n in self.log.items() if w == SCHEDULE and new != "scheduled" and o == new and o in DEFAULT_PROTECT)

    @property
    def schedule_odd(self) -> int:
        """Rows the schedule writer left in any other way: none expected."""
        return sum(n for (w, o, new, _), n in self.log.items() if w == SCHEDULE and new != "scheduled" and not (o == new and o in DEFAULT_PROTECT))

    @property
    def schedule_targeted(self) -> int:
        return self.counts["rows targeted by committed schedules"] + self.counts["rows in refused schedules"]

    # -- kills, for both ------------------------------------------------------------------

    @property
    def kills(self) -> int:
        return self.counts["running TIs killed (409 on heartbeat/finish)"]

    @property
    def kills_by(self) -> Counter:
        """Killed TIs per writer that took the row out of running ('unexplained': none or several did)."""
        out = Counter()
        for key in self.killed:
            writers = self.exits.get(key, [])
            out[writers[0] if len(writers) == 1 and writers[0] in observer.RACY_WRITERS else "unexplained"] += 1
        return out

    @property
    def skip_kills(self) -> int:
        return self.kills_by[SKIP]

    @property
    def schedule_kills(self) -> int:
        return self.kills_by[SCHEDULE]

    @property
    def current_states(self) -> dict[str, int]:
        """The 409s by the current_state they report, as the seed counted them."""
        prefix = "409 current_state="
        return {k[len(prefix):]: v for k, v in sorted(self.counts.items()) if k.startswith(prefix)}

    @property
    def errors(self) -> dict[str, int]:
        return {k: v for k, v in self.counts.items() if " error" in k or k.endswith("refused") and not k.startswith("skip")}

    def problems(self) -> list[str]:
        """Checks of the harness itself: every write seen once, by the observer and by the writers."""
        out = []

        def check(ok, what):
            if not ok:
                out.append(what)

        check(not self.errors, f"errors: {self.errors}")
        # Each committed self-skip is in the log as the worker's running -> skipped, start_date untouched.
        check(self.self_skips == self.counts["finished skipped"], f"self-skips: log {self.self_skips}, worker {self.counts['finished skipped']}")
        # A task instance leaves running once; every kill is put down to exactly one racy writer,
        # and every running row a racy writer overwrote was killed at the worker's next step.
        check(not any(len(w) > 1 for w in self.exits.values()), "a task instance left running twice")
        check(self.kills == len(self.killed) and self.kills_by["unexplained"] == 0, f"kills not explained by the log: {dict(self.kills_by)} of {self.kills}")
        check(self.skip_kills == self.overwrites["running"], f"skip writer: {self.skip_kills} kills, {self.overwrites['running']} running -> skipped")
        check(self.schedule_kills == self.schedule_overwrites["running"],
              f"schedule writer: {self.schedule_kills} kills, {self.schedule_overwrites['running']} running -> scheduled")
        check(self.kills == self.skip_kills + self.schedule_kills, "kills by neither writer")
        # Each targeted row is classified once, by the state it had when the writer wrote it.
        skips = self.overwritten + self.skipped_unprotected + self.already_skipped + self.unchanged
        check(skips == self.counts["rows targeted by committed skips"], f"skip rows classified {skips} of {self.counts['rows targeted by committed skips']}")
        if self.variant != "ignore":
            # Every row a committed skip targeted is in the log (no statement left a row as it was).
            check(self.unchanged == 0, f"{self.unchanged} skip targets left unchanged in {self.variant} mode")
        schedules = self.schedule_overwritten + self.scheduled_legitimately + self.scheduled_other + self.schedule_kept
        check(schedules == self.counts["rows targeted by committed schedules"],
              f"schedule rows classified {schedules} of {self.counts['rows targeted by committed schedules']}")
        check(self.schedule_odd == 0, f"{self.schedule_odd} schedule targets neither scheduled nor kept")
        if self.variant == "none":
            check(self.schedule_kept == 0, f"{self.schedule_kept} schedule targets kept without the guard")
        return out

    def outcome(self) -> list[str]:
        """What the run must show: overwrites and kills by both writers without the guard (and in
        audit mode, which lets every write through), none with it; the record counts what the guard
        stopped (or, auditing, would have stopped)."""
        out = []
        if self.variant in ("none", "audit"):
            if not (self.overwritten and self.overwrites["running"] and self.skip_kills):
                out.append(f"the skip writer overwrote nothing in variant {self.variant}")
            if not (self.schedule_overwritten and self.schedule_overwrites["running"] and self.schedule_kills):
                out.append(f"the schedule writer overwrote nothing in variant {self.variant}")
        elif self.overwritten or self.schedule_overwritten or self.kills:
            out.append(f"guard in {self.variant} mode: {self.overwritten} + {self.schedule_overwritten} overwritten, {self.kills} killed")
        if self.variant in GUARDING and not self.scheduled_legitimately:
            # Unguarded, the skip writer takes most rows first: few are left for it to schedule.
            out.append(f"guard in {self.variant} mode: no row was scheduled legitimately")
        expected = self.expected_record()
        if expected is not None and self.record_as(expected) != expected:
            out.append(f"guard in {self.variant} mode: the record holds {self.record_as(expected)}, the observer and the writers saw {expected}")
        return out

    def record_as(self, expected: dict) -> dict:
        """The record summed over the same key as `expected` ((rule, action[, old_state]))."""
        width = len(next(iter(expected), ("", "", "")))
        summed = Counter()
        for key, n in self.recorded.items():
            summed[key[:width]] += n
        return dict(+summed)

    def expected_record(self) -> dict | None:
        """What the guard's record must hold, from the observer's log and the writers' own counts:
        audit, every overwrite by its old state; ignore, every row a statement targeted and the
        guard kept; raise, the kept schedule rows only (a refused skip rolls back with its record)."""
        if self.variant == "audit":
            found = {("racy_skip", "audit", s): n for s, n in self.overwrites.items()}
            found.update({("stale_schedule", "audit", s): n for s, n in self.schedule_overwrites.items()})
            return {k: n for k, n in found.items() if n}
        if self.variant in GUARDING:
            kept = {("stale_schedule", "keep"): self.schedule_kept}
            if self.variant == "ignore":
                kept[("racy_skip", "keep")] = self.unchanged
            return {k: n for k, n in kept.items() if n}
        return None

    # -- rows of the tables ---------------------------------------------------------------

    def row(self) -> list:
        o, so = self.overwrites, self.schedule_overwrites
        return [
            self.backend, self.variant, self.races, f"**{self.overwritten}** ({o['running']}/{o['success']}/{o['failed']})", self.skip_kills,
            self.schedule_races, f"**{self.schedule_overwritten}** ({so['running']}/{so['success']}/{so['failed']})", self.schedule_kills,
            self.scheduled_legitimately, ", ".join(f"{k} {v}" for k, v in self.current_states.items()) or "-", f"{self.seconds:.1f}",
        ]

    def skip_row(self) -> list:
        o = self.overwrites
        return [
            self.backend, self.variant, self.races, self.targeted,
            f"**{self.overwritten}** ({o['running']}/{o['success']}/{o['failed']})",
            self.skipped_unprotected, self.already_skipped, self.unchanged, self.counts["rows in refused skips"],
            self.refused, self.recorded_by("racy_skip"), self.skip_kills, self.self_skips,
        ]

    def schedule_row(self) -> list:
        o = self.schedule_overwrites
        return [
            self.backend, self.variant, self.schedule_races, self.schedule_targeted,
            f"**{self.schedule_overwritten}** ({o['running']}/{o['success']}/{o['failed']})",
            self.scheduled_legitimately, self.scheduled_other, self.schedule_kept, self.counts["schedule refused"],
            self.recorded_by("stale_schedule"), self.schedule_kills,
        ]


HEADER = ["backend", "guard", "skip races", "skip: overwritten (running/success/failed)", "skip: running TIs killed",
          "schedule races", "schedule: overwritten (running/success/failed)", "schedule: running TIs killed",
          "scheduled legitimately", "409s by current_state", "seconds"]
SKIP_HEADER = ["backend", "guard", "skip races", "rows targeted", "overwritten (running/success/failed)", "scheduled/queued/up_for_* -> skipped",
               "already skipped", "left unchanged", "rows in refused skips", "skips refused", "in the guard's record", "running TIs killed (409)",
               "self-skips through"]
SCHEDULE_HEADER = ["backend", "guard", "schedule races", "rows targeted", "overwritten (running/success/failed)",
                   "NULL/up_for_retry/up_for_reschedule -> scheduled", "scheduled/queued/skipped -> scheduled", "kept by the guard",
                   "statements refused", "in the guard's record", "running TIs killed (409)"]


def table(results: list[Result], header=HEADER, row=Result.row) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row(r)) + " |" for r in results]
    return "\n".join(lines)


def tables(results: list[Result]) -> str:
    """Both writers side by side, then each writer's rows in detail."""
    return "\n\n".join([
        table(results),
        "Skip writer, each targeted row by its state when the skip wrote it:\n\n" + table(results, SKIP_HEADER, Result.skip_row),
        "Schedule writer, each targeted row by its state when schedule_tis wrote it:\n\n" + table(results, SCHEDULE_HEADER, Result.schedule_row),
    ])


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


def backend_id(engine: sa.Engine) -> str:
    """The suite's backend ids (tests/conftest.py): mysql is MariaDB, mysql9 Oracle MySQL; after a connect."""
    dialect = dialect_name(engine.dialect.name)
    return ("mysql" if engine.dialect.is_mariadb else "mysql9") if dialect == "mysql" else dialect


def run_variant(url: str, variant: str, plan: Plan) -> Result:
    # A connection per worker and per racy writer of each worker, and two to spare.
    engine = make_engine(url, pool_size=3 * plan.workers + 2, poolclass=sa.pool.QueuePool)
    try:
        table = _fresh_table(engine, url)
        seed(engine, table, plan)
        with engine.begin() as conn:
            observer.install(conn, table)
        if variant != "none":
            _cli(url, "install", f"--mode={variant}")
        race = Race(engine, table, plan)
        counts, seconds = race.run()
        with engine.connect() as conn:
            log = observer.transitions(conn)
            exits = observer.left_running(conn)
        recorded, text = Counter(), ""
        if variant != "none":
            found = report(resolve(url=url), parse_since("1d"))
            text = as_text(found, f"the race's scratch database on {backend_id(engine)}")
            for t in found.totals:
                recorded[(t["rule"], t["action"], t["old_state"])] += t["refusals"]
        return Result(backend_id(engine), variant, plan, seconds, counts, log, exits, race.killed, recorded, text)
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
    return version if "MariaDB" in version or "PostgreSQL" in version else f"MySQL {version}"


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
            parts.append(
                f"without the guard the skip writer overwrote {n.overwritten} rows in {n.races} races ({n.skip_kills} running tasks killed) "
                f"and schedule_tis {n.schedule_overwritten} rows in {n.schedule_races} races ({n.schedule_kills} killed)"
            )
        guarded = [by[m] for m in GUARDING if m in by]
        if guarded:
            def through(r):
                return f"({r.races} + {r.schedule_races} races; {r.self_skips} self-skips and {r.scheduled_legitimately} legitimate schedules went through)"
            if not any(r.overwritten or r.schedule_overwritten or r.kills for r in guarded):
                parts.append("with it 0 rows overwritten by either writer and 0 killed, " + " and ".join(f"in {r.variant} mode {through(r)}" for r in guarded))
            else:
                parts.append("with it " + " and ".join(
                    f"{r.overwritten} + {r.schedule_overwritten} rows overwritten and {r.kills} killed in {r.variant} mode {through(r)}" for r in guarded))
        if "audit" in by:
            a = by["audit"]
            parts.append(f"in audit mode every write went through ({a.overwritten} + {a.schedule_overwritten} rows overwritten, {a.kills} killed) "
                         f"and the guard's record counted {a.recorded_by('racy_skip')} + {a.recorded_by('stale_schedule')} of them")
        lines.append(f"- {backend}: " + "; ".join(parts) + ".")
    return "\n".join(lines)


def beside_the_seed(results: list[Result]) -> str:
    """One line: this run's kills beside the seed's production 409s."""
    backends = list(dict.fromkeys(r.backend for r in results))
    unguarded = [r for r in results if r.variant == "none"]
    guarded = [r for r in results if r.variant in GUARDING]
    before = ", ".join(f"{r.kills} on {r.backend} ({r.schedule_kills} by schedule_tis)" for r in unguarded)
    alone = ", ".join(f"{r.skip_kills} on {r.backend}" for r in unguarded)
    after = sum(r.kills for r in guarded)
    races = ", ".join(sorted({f"{r.races} skip and {r.schedule_races} schedule_tis races" for r in unguarded}))
    return (
        f"- Beside the seed's production figures (apache/airflow#63266: 409s on heartbeat a day, 5 schedulers, ~500 workers): "
        f"before any fix {SEED['before any fix']} a day, here without the guard {before} killed in {races}; "
        f"after the schedule_tis fix alone {SEED['after the schedule_tis fix alone']} a day, all current_state skipped, "
        f"here the skip writer's share: {alone}; after both fixes {SEED['after both fixes']}, here {after} with the guard "
        f"(raise and ignore, {' and '.join(backends)}). These are counts over the races above, not rates a day, and the split between "
        "the writers follows how often this harness fires each, not production's."
    )


def _times(n: int) -> str:
    return {1: "once", 2: "twice"}.get(n, f"{n} times")


def block(results: list[Result], versions: list[str], command: str) -> str:
    plan = results[0].plan
    return (
        summary(results) + "\n" + beside_the_seed(results) + "\n\n"
        f"Measured with `{command}` on {machine()}; {'; '.join(versions)}. Other work shared the "
        "machine, so the seconds say how long the run took, not how fast anything is. CI runs the same through pytest "
        "(`tests/race`, 10,000 skip races per guarded variant and backend, 2,000 without the guard; `TI_GUARD_RACES` and "
        "`TI_GUARD_BASELINE_RACES` ask for more).\n"
        f"A worker takes a dag run's {plan.tasks_per_run} scheduled task instances, "
        f"queues them and moves each queued -> running -> (heartbeat) -> success/failed/skipped/up_for_retry/up_for_reschedule. Two racy writers get the run "
        f"handed over at random steps and fire at once ({plan.workers} workers, each with a skip writer and a schedule writer "
        f"of its own, one connection each): the pre-fix skip UPDATE over 2-{plan.tasks_per_run} task instances, {_times(plan.races_per_run)} "
        f"per run (apache/airflow#63266), and the pre-3.3 `DagRun.schedule_tis` over 1-{min(plan.schedule_targets, plan.tasks_per_run)} "
        f"of them, {_times(plan.schedule_races_per_run)} per run (apache/airflow#60330): a scheduler acting on a stale read in which "
        "they were not yet scheduled. An overwrite is a committed running/success/failed -> skipped by the skip writer, or "
        "-> scheduled by the schedule writer, read from an AFTER UPDATE observer, not from the guard; a killed TI is a worker's "
        "heartbeat or finish finding its running TI gone (the seed's 409; its current_state as the worker read it), put down "
        "to the writer the observer saw take the row out of running. Each targeted row is counted once, by its committed "
        "state when the writer wrote it: for the skip writer overwritten, skipped from scheduled/queued/up_for_retry/up_for_reschedule, already skipped "
        "(by the task itself or an earlier skip of the same run), left unchanged (ignore mode), or in a statement the guard "
        "refused (raise mode; the whole statement fails); for the schedule writer overwritten, scheduled legitimately (from "
        "NULL/up_for_retry/up_for_reschedule: the stale read was still right), scheduled from scheduled/queued/skipped (rows the policy does not protect; a queued one "
        "loses its start), or kept by the guard (rule stale_schedule: kept and counted in both modes, never refused).\n\n"
        + tables(results) + "\n"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.race.harness", description=__doc__.split("\n")[0])
    parser.add_argument("--url", action="append", required=True, help="a PostgreSQL, MariaDB or MySQL server (repeatable)")
    parser.add_argument("--races", type=int, default=10_000, help="skip races per guarded variant (default 10000)")
    parser.add_argument("--baseline-races", type=int, help="skip races without the guard (default: as many as --races)")
    parser.add_argument("--workers", type=int, default=Plan.workers)
    parser.add_argument("--in-place", action="store_true", help="use the database the URL names instead of a scratch one")
    parser.add_argument("--docs", action="store_true", help="rewrite the race block (docs/deployments.md) and the report block (docs/operations.md)")
    parser.add_argument("--block-out", type=Path, metavar="FILE", help="write the race block for this run's figures to FILE")
    parser.add_argument("--report-out", type=Path, metavar="FILE", help="write the report block (the first server's audit variant) to FILE")
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
            for message in r.problems() + r.outcome():
                print(f"    FAILED: {message}")
            for racer in ("skip", "schedule"):
                lag = r.counts[f"{racer} handoff lag total (s)"] / max(1, r.counts[f"{racer} races"])
                print(f"    {racer} handoff lag mean {lag * 1000:.1f} ms, max {r.counts[f'{racer} handoff lag max (s)'] * 1000:.0f} ms")
            print(f"    {dict((k, v) for k, v in sorted(r.counts.items()) if 'lag' not in k)}", flush=True)
        results += got
    print()
    print(tables(results))
    if args.docs or args.block_out:
        shown = ["python -m tests.race.harness", *(f"--url {u.split('://')[0]}://..." for u in args.url), f"--races {args.races}"]
        if args.baseline_races:
            shown.append(f"--baseline-races {args.baseline_races}")
        text = block(results, versions, " ".join(shown))
        if args.block_out:
            args.block_out.write_text(text)
            print(f"\nwrote the race block to {args.block_out}")
        if args.docs:
            docblock.rewrite(docblock.DOCS / "deployments.md", "race", text)
    audited = next((r for r in results if r.variant == "audit"), None)
    if (args.report_out or args.docs) and audited:
        text = (
            f"`ti-guard report --since 1d` at the end of the race harness's audit variant ({audited.races} skip and "
            f"{audited.schedule_races} schedule_tis races on {versions[0]}; every write went through, each one the guard "
            "would have refused is counted; the harness checks the counts against its observer):\n\n"
            + "\n".join("    " + line for line in audited.report_text.splitlines()) + "\n"
        )
        if args.report_out:
            args.report_out.write_text(text)
            print(f"wrote the report block to {args.report_out}")
        if args.docs:
            docblock.rewrite(docblock.DOCS / "operations.md", "report", text)
    bad = [r for r in results if r.problems() or r.outcome()]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
