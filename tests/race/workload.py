"""Workers, branch operators and a stale scheduler writing one Airflow-shaped task_instance at once.

A worker takes a dag run whose task instances the scheduler has scheduled, queues them in
one bulk UPDATE, then moves each one queued -> running -> (heartbeats) -> success, failed,
skipped by itself, up_for_retry or up_for_reschedule (a sensor in reschedule mode; nothing
runs those again here), the steps of the run's task instances interleaved at random. Two racy
writers get the run handed over at random steps and fire at once while the worker keeps
going: one race per hand-over. Each worker has one racer thread that serves both, each writer
on a connection of its own; one thread keeps a worker's skip and schedule from locking the
same run's rows in opposite orders (a deadlock, which PostgreSQL only breaks after
deadlock_timeout, a second in which that worker's hand-overs wait).

- the skip writer (a branch operator): the pre-fix skip UPDATE (`airflow_writes.racy_skip`)
  at 2 or more task instances of the run, `races_per_run` times per run (apache/airflow#63266);
- the schedule writer (a second scheduler, or the same one a loop later, acting on a stale
  read of the run in which its task instances were not yet scheduled): the pre-3.3
  `DagRun.schedule_tis` (`airflow_writes.schedule_tis`, no check of the current state) at 1-3
  task instances of the run, `schedule_races_per_run` times per run (apache/airflow#60330).
  Rows it finds up_for_retry or up_for_reschedule are the ones its read was right about:
  scheduled legitimately (NULL would be too; this workload has none left).

Workers check the state the way Airflow's execution API does before it writes (`ti_run`
answers 409 unless the TI is queued, `ti_heartbeat` and `ti_update_state` unless it is
running), here as a condition on their UPDATE; a 409 on a running TI is the seed report's
"task killed mid-execution". The worker then reads the row's state, the `current_state` of
the 409, and keeps the task instance's key so that the harness can name the writer that took
the row from it (tests/race/observer.py logs every committed write with its writer).
"""

from __future__ import annotations

import contextlib
import functools
import queue
import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone

import sqlalchemy as sa

from ti_guard import airflow_writes as aw

from . import observer

DAG_ID = "race_dag"
# Server errors that mean "try the statement again", not a verdict on the write.
_RETRY_PG = {"40P01", "40001", "55P03"}
_RETRY_MYSQL = {1205, 1213}


@dataclass(frozen=True)
class Plan:
    races: int
    tasks_per_run: int = 4
    races_per_run: int = 4
    # Stale schedule_tis per run, each at 1..schedule_targets of the run's task instances.
    schedule_races_per_run: int = 1
    schedule_targets: int = 3
    # Each worker has a branch operator and a stale scheduler of its own (one thread, two
    # connections), so a run it hands over is written at once.
    workers: int = 6
    heartbeats: int = 1
    self_skip: float = 0.15
    fail: float = 0.10
    # Attempts that end waiting for the scheduler: rows schedule_tis is meant for.
    retry: float = 0.10
    reschedule: float = 0.05
    seed: int = 63266

    @property
    def runs(self) -> int:
        return -(-self.races // self.races_per_run)

    def races_of(self, run_number: int) -> int:
        return min(self.races_per_run, self.races - run_number * self.races_per_run)

    @property
    def schedule_races(self) -> int:
        return self.runs * self.schedule_races_per_run


def run_ids(plan: Plan) -> list[str]:
    return [f"run_{i:07d}" for i in range(plan.runs)]


def task_ids(plan: Plan) -> list[str]:
    return [f"task_{i}" for i in range(plan.tasks_per_run)]


def seed(engine: sa.Engine, table: sa.Table, plan: Plan, chunk: int = 2000) -> None:
    """Every run's task instances, scheduled (the scheduler's NULL -> scheduled already happened)."""
    rows = [
        {"id": str(uuid.uuid4()), "dag_id": DAG_ID, "run_id": r, "task_id": t, "map_index": -1, "state": "scheduled", "try_number": 1}
        for r in run_ids(plan)
        for t in task_ids(plan)
    ]
    with engine.begin() as conn:
        for i in range(0, len(rows), chunk):
            conn.execute(table.insert(), rows[i : i + chunk])


def classify(exc: sa.exc.DBAPIError) -> str:
    """'refused' (the guard), 'retry' (deadlock, lock timeout) or 'error'."""
    orig = exc.orig
    if "ti_guard: refused" in str(orig):
        return "refused"
    if getattr(orig, "sqlstate", None) in _RETRY_PG:
        return "retry"
    args = getattr(orig, "args", ())
    if args and args[0] in _RETRY_MYSQL:
        return "retry"
    return "error"


def execute(conn: sa.Connection, run, counts: Counter, role: str, on_miss=None):
    """run(conn) in a transaction of its own; its rowcount, or the verdict when the server refused it.
    on_miss(conn), if given, runs in the same transaction when no row matched."""
    while True:
        try:
            with conn.begin():
                rowcount = run(conn).rowcount
                if rowcount == 0 and on_miss is not None:
                    on_miss(conn)
                return rowcount
        except sa.exc.DBAPIError as exc:
            verdict = classify(exc)
            if verdict != "retry":
                counts[f"{role} {verdict}"] += 1
                if verdict == "error":
                    counts[f"{role} error: {str(exc.orig).splitlines()[0][:160]}"] += 1
                return verdict
            counts[f"{role} retried"] += 1


class Prepared:
    """A write from airflow_writes compiled once; later calls only swap the values.

    The statement is built with stand-in values, which name its bind parameters; executing
    the compiled text directly keeps SQLAlchemy's compiler out of the workers' loop, so the
    client is not what limits how many writes race.
    """

    def __init__(self, dialect, statement, **stand_ins):
        compiled = statement.compile(dialect=dialect, compile_kwargs={"render_postcompile": True})
        self.sql = str(compiled)
        self.defaults = dict(compiled.params)
        self.names = {key: [n for n, v in self.defaults.items() if v == value] for key, value in stand_ins.items()}
        assert all(self.names.values()), (self.sql, self.names)

    def __call__(self, **values):
        params = dict(self.defaults)
        for key, value in values.items():
            params.update(dict.fromkeys(self.names[key], value))
        return lambda conn: conn.exec_driver_sql(self.sql, params)


_RUN, _TASK = "\x00run", "\x00task"
_WHEN = datetime(1901, 2, 3, 4, 5, 6, 7, tzinfo=timezone.utc)


def worker_writes(dialect, table: sa.Table) -> dict[str, Prepared]:
    """The worker-side writes, each with Airflow's own state check (a 409 otherwise)."""
    key = aw.key_of(table, DAG_ID, _TASK, _RUN)
    state = table.c.state
    stand_ins = {"run_id": _RUN, "task_id": _TASK, "when": _WHEN}
    return {
        "queue": Prepared(dialect, queue_run(table, _RUN, _WHEN), run_id=_RUN, when=_WHEN),
        "start": Prepared(dialect, aw.worker_start(table, key, _WHEN).where(state == "queued"), **stand_ins),
        "heartbeat": Prepared(dialect, aw.heartbeat(table, key, _WHEN).where(state == "running"), **stand_ins),
        **{
            f"finish {outcome}": Prepared(dialect, aw.finish(table, key, outcome, _WHEN).where(state == "running"), **stand_ins)
            for outcome in OUTCOMES
        },
    }


def skip_writes(dialect, table: sa.Table, plan: Plan) -> dict[int, Prepared]:
    """The racy skip over n task instances of a run, for every n a branch operator may pick."""
    skips = {}
    for n in range(2, plan.tasks_per_run + 1):
        tasks = {f"task{i}": f"\x00task{i}" for i in range(n)}
        statement = aw.racy_skip(table, DAG_ID, _RUN, [(t, -1) for t in tasks.values()], _WHEN)
        skips[n] = Prepared(dialect, statement, run_id=_RUN, when=_WHEN, **tasks)
    return skips


def stale_schedules(dialect, table: sa.Table, plan: Plan) -> dict[int, Prepared]:
    """The pre-3.3 schedule_tis over n task instances of a run, for every n the stale scheduler may pick.
    Airflow names the rows by id; here by key, as the skip does (no guard rule reads the WHERE)."""
    schedules = {}
    for n in range(1, min(plan.schedule_targets, plan.tasks_per_run) + 1):
        tasks = {f"task{i}": f"\x00task{i}" for i in range(n)}
        where = sa.and_(
            table.c.dag_id == DAG_ID, table.c.run_id == _RUN,
            sa.tuple_(table.c.task_id, table.c.map_index).in_([(t, -1) for t in tasks.values()]),
        )
        schedules[n] = Prepared(dialect, aw.schedule_tis(table, where, _WHEN), run_id=_RUN, when=_WHEN, **tasks)
    return schedules


# The states schedule_tis is meant for: 3.3 adds exactly this check to its WHERE.
SCHEDULABLE = (None, "up_for_retry", "up_for_reschedule")


def queue_run(table: sa.Table, run_id, when):
    """The scheduler queueing a run's scheduled TIs in one statement. airflow_writes has no such
    write; built from what 3.3.2 writes here: state, start_date replaced, queued_dttm, updated_at."""
    return (
        sa.update(table)
        .where(table.c.dag_id == DAG_ID, table.c.run_id == run_id, table.c.state == "scheduled")
        .values(state="queued", start_date=when, queued_dttm=when, updated_at=when)
    )


def _steps(plan: Plan, rng: random.Random):
    """Per task instance: start, heartbeats, finish; interleaved across the run's TIs at random."""
    pending = {t: ["start"] + ["heartbeat"] * plan.heartbeats + ["finish"] for t in task_ids(plan)}
    order = []
    while pending:
        t = rng.choice(sorted(pending))
        order.append((t, pending[t].pop(0)))
        if not pending[t]:
            del pending[t]
    return order


OUTCOMES = ("success", "failed", "skipped", "up_for_retry", "up_for_reschedule")


def _outcome(plan: Plan, rng: random.Random) -> str:
    x = rng.random()
    for outcome, p in (("skipped", plan.self_skip), ("failed", plan.fail), ("up_for_retry", plan.retry), ("up_for_reschedule", plan.reschedule)):
        if x < p:
            return outcome
        x -= p
    return "success"


@dataclass(frozen=True)
class Racer:
    """One racy writer: its observer tag, the word its counts use, the fewest task instances it targets."""

    tag: str
    noun: str  # "skip" -> counts "skip races", "rows targeted by committed skips", ...
    fewest: int
    seed_offset: int

    def key(self, what: str) -> str:
        return f"{self.noun} {what}"


SKIP = Racer(observer.SKIP_WRITER, "skip", 2, 500)
SCHEDULE = Racer(observer.SCHEDULE_WRITER, "schedule", 1, 700)


class Race:
    """One variant's run of the workload; counts what each side saw.

    `killed` lists the key (run_id, task_id) of every task instance whose worker met a 409 on
    a heartbeat or a finish.
    """

    def __init__(self, engine: sa.Engine, table: sa.Table, plan: Plan):
        self.engine, self.table, self.plan = engine, table, plan
        self.runs = iter(enumerate(run_ids(plan)))
        self.runs_lock = threading.Lock()
        self.counts: list[Counter] = []
        self.killed: list[tuple[str, str]] = []
        self.writes = worker_writes(engine.dialect, table)
        self.statements = {
            SKIP: skip_writes(engine.dialect, table, plan),
            SCHEDULE: stale_schedules(engine.dialect, table, plan),
        }
        self.most = {SKIP: plan.tasks_per_run, SCHEDULE: min(plan.schedule_targets, plan.tasks_per_run)}

    def _next_run(self):
        with self.runs_lock:
            return next(self.runs, (None, None))

    def _connect(self, writer: str) -> sa.Connection:
        conn = self.engine.connect()
        observer.tag(conn, writer)
        return conn

    def _note_current_state(self, counts: Counter, run_id: str, task: str, conn: sa.Connection) -> None:
        """What the worker's 409 reports as current_state, read in the failed write's transaction."""
        state = conn.execute(sa.select(self.table.c.state).where(aw.key_of(self.table, DAG_ID, task, run_id))).scalar()
        counts[f"409 current_state={state}"] += 1

    def worker(self, number: int, handoff: queue.Queue) -> None:
        rng = random.Random(self.plan.seed * 1000 + number)
        # The schedule writer's moments come from a generator of their own, so that the skip
        # writer's moments and the runs' outcomes are those of the skip-only workload.
        schedule_rng = random.Random(self.plan.seed * 1000 + 250 + number)
        counts = Counter()
        self.counts.append(counts)
        w = self.writes
        with self._connect(observer.WORKER) as conn:
            while True:
                run_number, run_id = self._next_run()
                if run_id is None:
                    return
                steps = [("*", "queue")] + _steps(self.plan, rng)
                # The moments each racy writer fires: before step i (len(steps): after the last).
                releases = {
                    SKIP: Counter(rng.randint(0, len(steps)) for _ in range(self.plan.races_of(run_number))),
                    SCHEDULE: Counter(schedule_rng.randint(0, len(steps)) for _ in range(self.plan.schedule_races_per_run)),
                }
                outcome = {task: _outcome(self.plan, rng) for task in task_ids(self.plan)}
                dead = set()
                for i, (task, step) in enumerate(steps):
                    for racer, moments in releases.items():
                        for _ in range(moments[i]):
                            handoff.put((racer, run_id, time.perf_counter()))
                    if task in dead:
                        continue
                    when = aw.now()
                    if step == "queue":
                        execute(conn, w["queue"](run_id=run_id, when=when), counts, "scheduler")
                    elif step == "start":
                        if execute(conn, w["start"](run_id=run_id, task_id=task, when=when), counts, "worker") != 1:
                            counts["TIs taken before they started (409 on ti_run)"] += 1
                            dead.add(task)
                    else:
                        write = w["heartbeat"] if step == "heartbeat" else w[f"finish {outcome[task]}"]
                        miss = functools.partial(self._note_current_state, counts, run_id, task)
                        if execute(conn, write(run_id=run_id, task_id=task, when=when), counts, "worker", on_miss=miss) != 1:
                            counts["running TIs killed (409 on heartbeat/finish)"] += 1
                            self.killed.append((run_id, task))
                            dead.add(task)
                        elif step == "finish":
                            counts[f"finished {outcome[task]}"] += 1
                for racer, moments in releases.items():
                    for _ in range(moments[len(steps)]):
                        handoff.put((racer, run_id, time.perf_counter()))

    def racers(self, number: int, handoff: queue.Queue) -> None:
        """A worker's racy writers: each fires its statement at the run it is handed, at once."""
        rngs = {r: random.Random(self.plan.seed * 1000 + r.seed_offset + number) for r in self.statements}
        counts = Counter()
        self.counts.append(counts)
        tasks = task_ids(self.plan)
        with contextlib.ExitStack() as stack:
            conns = {r: stack.enter_context(self._connect(r.tag)) for r in self.statements}
            while (handed := handoff.get()) is not None:
                racer, run_id, at = handed
                lag = time.perf_counter() - at
                counts[racer.key("handoff lag total (s)")] += lag
                counts[racer.key("handoff lag max (s)")] = max(counts[racer.key("handoff lag max (s)")], lag)
                rng = rngs[racer]
                targets = rng.sample(tasks, rng.randint(racer.fewest, self.most[racer]))
                named = {f"task{i}": t for i, t in enumerate(targets)}
                verdict = execute(conns[racer], self.statements[racer][len(targets)](run_id=run_id, when=aw.now(), **named), counts, racer.noun)
                counts[racer.key("races")] += 1
                if verdict == "refused":
                    counts[f"rows in refused {racer.noun}s"] += len(targets)
                elif verdict != "error":
                    counts[racer.key("races committed")] += 1
                    counts[f"rows targeted by committed {racer.noun}s"] += len(targets)
                    if verdict != len(targets):
                        # Every targeted row exists: a guard that keeps a row must still count it.
                        counts[racer.key(f"error: rowcount {verdict} for {len(targets)} rows")] += 1

    def run(self) -> tuple[Counter, float]:
        started = time.perf_counter()
        handoffs = [queue.Queue() for _ in range(self.plan.workers)]
        workers = [threading.Thread(target=self.worker, args=(i, q)) for i, q in enumerate(handoffs)]
        racers = [threading.Thread(target=self.racers, args=(i, q)) for i, q in enumerate(handoffs)]
        for thread in workers + racers:
            thread.start()
        for thread, handoff in zip(workers, handoffs):
            thread.join()
            handoff.put(None)
        for thread in racers:
            thread.join()
        total = Counter()
        for c in self.counts:
            total.update({k: v for k, v in c.items() if "max" not in k})
            total.update({k: max(0, v - total[k]) for k, v in c.items() if "max" in k})
        return total, time.perf_counter() - started
