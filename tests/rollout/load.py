"""A steady write load on task_instance, as Airflow makes it, with every statement's wait measured.

Heartbeat writers update one running TI per transaction; bulk writers move a whole run
scheduled -> queued -> skipped (the skip of queued TIs that the policy allows, written by the
pre-fix skip UPDATE) -> scheduled, one statement each. Every statement must touch exactly
the rows it aims at: a write refused or lost shows as an error or a short rowcount.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter, defaultdict

import sqlalchemy as sa

from ti_guard import airflow_writes as aw

from race.workload import classify

DAG = "load_dag"
TASKS = 5


def seed(db, table: sa.Table, runs: list[str], state: str) -> None:
    with db.engine.begin() as conn:
        conn.execute(
            table.insert(),
            [
                {"id": str(uuid.uuid4()), "dag_id": DAG, "run_id": r, "task_id": f"t{i}", "state": state, "try_number": 1,
                 "start_date": aw.now() if state == "running" else None}
                for r in runs
                for i in range(TASKS)
            ],
        )


class Threads:
    """Threads that run while the `with` block does, and are told to stop and joined after it."""

    def __init__(self, targets):
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=fn, args=args) for fn, args in targets]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()


class Load(Threads):
    """Writer threads on their own connections; waits[label] lists each statement's seconds."""

    def __init__(self, db, table: sa.Table, heartbeat_writers: int = 3, bulk_writers: int = 2):
        self.db, self.table = db, table
        self.lock = threading.Lock()
        self.waits: dict[str, list[tuple[float, float]]] = defaultdict(list)  # label -> (started, seconds)
        self.problems: list[str] = []
        self.retried: Counter = Counter()
        self.last_heartbeat: dict[tuple, object] = {}
        self.last_bulk: dict[str, str] = {}
        self.hb_runs = [f"hb_{i}" for i in range(heartbeat_writers)]
        self.bulk_runs = [f"bulk_{i}" for i in range(bulk_writers)]
        seed(db, table, self.hb_runs, "running")
        seed(db, table, self.bulk_runs, "scheduled")
        super().__init__([(self._heartbeats, (r,)) for r in self.hb_runs] + [(self._bulk, (r,)) for r in self.bulk_runs])

    def _write(self, conn, label: str, statement, rows: int) -> bool:
        started = time.perf_counter()
        while True:
            try:
                with conn.begin():
                    got = conn.execute(statement).rowcount
                break
            except sa.exc.DBAPIError as exc:
                if classify(exc) == "retry":  # a deadlock: Airflow retries the transaction too
                    self.retried[label] += 1
                    continue
                with self.lock:
                    self.problems.append(f"{label}: {str(exc.orig).splitlines()[0]}")
                return False
        with self.lock:
            self.waits[label].append((started, time.perf_counter() - started))
            if got != rows:
                self.problems.append(f"{label}: {got} rows written, {rows} meant")
        return got == rows

    def _heartbeats(self, run_id: str) -> None:
        t = self.table
        with self.db.engine.connect() as conn:
            i = 0
            while not self.stop.is_set():
                task = f"t{i % TASKS}"
                when = aw.now()
                if self._write(conn, "heartbeat", aw.heartbeat(t, aw.key_of(t, DAG, task, run_id), when), 1):
                    self.last_heartbeat[(run_id, task)] = when
                i += 1

    def _bulk(self, run_id: str) -> None:
        t = self.table
        run = (t.c.dag_id == DAG, t.c.run_id == run_id)
        steps = [
            ("queued", sa.update(t).where(*run, t.c.state == "scheduled").values(state="queued", queued_dttm=aw.now())),
            ("skipped", aw.racy_skip(t, DAG, run_id, [(f"t{i}", -1) for i in range(TASKS)])),
            ("scheduled", sa.update(t).where(*run, t.c.state == "skipped").values(state="scheduled", start_date=None, end_date=None)),
        ]
        with self.db.engine.connect() as conn:
            i = 0
            while not self.stop.is_set():
                state, statement = steps[i % len(steps)]
                if self._write(conn, "bulk state update", statement, TASKS):
                    self.last_bulk[run_id] = state
                i += 1

    def max_wait(self, since: float = 0.0, until: float = float("inf")) -> float:
        return max((s for label in self.waits for started, s in self.waits[label] if since <= started <= until), default=0.0)

    def count(self, since: float = 0.0, until: float = float("inf")) -> int:
        return sum(1 for label in self.waits for started, _ in self.waits[label] if since <= started <= until)

    def finished_within(self, since: float, until: float) -> int:
        """Writes that started and finished between the two perf_counter marks."""
        return sum(1 for label in self.waits for started, s in self.waits[label] if since <= started and started + s <= until)

    def assert_nothing_lost(self) -> None:
        """Every writer's last write is what the table holds."""
        assert not self.problems, self.problems[:5]
        t = self.table
        with self.db.engine.connect() as conn:
            rows = conn.execute(sa.select(t.c.run_id, t.c.task_id, t.c.state, t.c.last_heartbeat_at).where(t.c.dag_id == DAG)).all()
        for run_id, task, state, heartbeat in rows:
            if run_id in self.hb_runs:
                wrote = self.last_heartbeat[(run_id, task)]
                # MySQL's TIMESTAMP comes back naive (in UTC here), PostgreSQL's timestamptz aware.
                assert state == "running" and heartbeat == (wrote if heartbeat.tzinfo else wrote.replace(tzinfo=None)), (run_id, task)
            elif run_id in self.bulk_runs:
                assert state == self.last_bulk[run_id], (run_id, task, state)


def long_transactions(db, table: sa.Table, lock_timeout: float, stop: threading.Event, holding: threading.Event) -> None:
    """Scheduler-like transactions that keep a row of task_instance (and so the table) locked:
    the first for longer than an install's lock timeout, the next ones for less."""
    hold = 2.5 * lock_timeout
    with db.engine.connect() as conn:
        while not stop.is_set():
            with conn.begin():
                conn.execute(aw.heartbeat(table, aw.key_of(table, DAG, "t0", "long")))
                holding.set()
                stop.wait(hold)
            hold = 0.8 * lock_timeout
            stop.wait(0.2)


def racy_skip_went_through(db, table: sa.Table, run_id: str) -> bool:
    """The pre-fix skip UPDATE of a running TI of `run_id`; True when it overwrote the row."""
    try:
        with db.engine.begin() as conn:
            conn.execute(aw.racy_skip(table, DAG, run_id, [("t0", -1)]))
    except sa.exc.DBAPIError as exc:
        assert "ti_guard: refused" in str(exc.orig)
        return False
    with db.engine.connect() as conn:
        return conn.execute(sa.select(table.c.state).where(table.c.run_id == run_id, table.c.task_id == "t0")).scalar() == "skipped"


def install_under_load(db, table: sa.Table, lock_timeout: float, retries: int = 15, before: float = 1.5) -> dict:
    """`ti-guard install` on a table that heartbeat and bulk writers keep writing (Load), while
    long scheduler-like transactions make its first attempt meet a lock held past its timeout.
    Returns what happened (exit code, DDL attempts given up, the racy skip before and after, the
    Load with every write's wait, and the perf_counter marks: baseline end, install start and end).
    Used by tests/rollout/test_install_under_load.py (what happened) and
    benchmarks/bench_install_under_load.py (how long the writers waited)."""
    from .guard_state import ddl_given_up, statements_sent

    seed(db, table, ["probe_before", "probe_after", "long"], "running")
    stop, holding = threading.Event(), threading.Event()
    with Load(db, table) as load:
        time.sleep(before)
        baseline_end = time.perf_counter()
        overwritten_before = racy_skip_went_through(db, table, "probe_before")
        long = threading.Thread(target=long_transactions, args=(db, table, lock_timeout, stop, holding))
        long.start()
        try:
            # So that the install's first attempt meets a lock held longer than its timeout.
            assert holding.wait(10), "the long transaction never started"
            started = time.perf_counter()
            with statements_sent() as sent:
                rc = db.cli("install", f"--lock-timeout={lock_timeout}", f"--lock-retries={retries}")
            finished = time.perf_counter()
        finally:
            stop.set()
            long.join()
        refused_after = not racy_skip_went_through(db, table, "probe_after")
        time.sleep(0.5)
    return {"rc": rc, "gave_up": ddl_given_up(sent), "overwritten_before": overwritten_before, "refused_after": refused_after,
            "load": load, "baseline_end": baseline_end, "started": started, "finished": finished}

