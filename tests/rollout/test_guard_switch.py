"""Replacing the guard (a mode change, a change of protected states) never leaves a moment without one.

MySQL commits each DDL statement, so the new trigger is created beside the old one before the
old one is dropped. Skip writers hammer running task instances with the pre-fix skip UPDATE,
each in a transaction of its own, while the guard is replaced again and again; the observer
(tests/race/observer.py) logs every committed write, independently of the guard.
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter

import pytest
import sqlalchemy as sa

from race import observer
from race.workload import classify
from ti_guard import airflow_writes as aw
from ti_guard.policy import DEFAULT_PROTECT

from .guard_state import statements_sent
from .load import DAG, TASKS, Threads, seed

pytestmark = pytest.mark.rollout

RUNS = [f"hammered_{i}" for i in range(4)]
WIDER = ",".join((*DEFAULT_PROTECT, "deferred"))
_GUARD_DDL = re.compile(r"\s*(CREATE|DROP)\s+(OR\s+REPLACE\s+)?(TRIGGER|FUNCTION)\b", re.I)
SWITCHES = [("ignore", None), ("raise", None), ("ignore", WIDER), ("raise", WIDER), ("ignore", None), ("raise", None)] * 2


class Hammer(Threads):
    """Skip writers firing at running TIs until stopped; attempts lists (started, ended, verdict)."""

    def __init__(self, db, table, writers: int = 2):
        self.db, self.table = db, table
        self.attempts: list[tuple[float, float, str]] = []
        super().__init__([(self._hammer, (i,)) for i in range(writers)])

    def _hammer(self, seed_: int) -> None:
        rng = random.Random(seed_)
        with self.db.engine.connect() as conn:
            observer.tag(conn, observer.SKIP_WRITER)
            while not self.stop.is_set():
                run = rng.choice(RUNS)
                tasks = rng.sample([f"t{i}" for i in range(TASKS)], 2)
                started = time.perf_counter()
                try:
                    with conn.begin():
                        conn.execute(aw.racy_skip(self.table, DAG, run, [(t, -1) for t in tasks]))
                    verdict = "went through"
                except sa.exc.DBAPIError as exc:
                    verdict = classify(exc)
                    if verdict == "error":
                        verdict = f"error: {str(exc.orig).splitlines()[0]}"
                self.attempts.append((started, time.perf_counter(), verdict))

    def during(self, windows) -> int:
        return sum(1 for s, e, _ in self.attempts if any(s < we and e > ws for ws, we in windows))


def _overwrites(db) -> int:
    with db.engine.connect() as conn:
        log = observer.transitions(conn)
    return sum(n for (w, old, new, _), n in log.items() if w == observer.SKIP_WRITER and new == "skipped" and old in DEFAULT_PROTECT)


def test_replacing_the_guard_under_a_hammer_lets_no_refused_skip_through(server_db, capsys):
    table = server_db.table()
    seed(server_db, table, RUNS, "running")
    with server_db.engine.begin() as conn:
        log = observer.install(conn, table)
    with Hammer(server_db, table) as unguarded:
        time.sleep(0.3)
    assert _overwrites(server_db) > 0 and unguarded.attempts  # without the guard the hammer overwrites
    with server_db.engine.begin() as conn:
        conn.execute(sa.update(table).values(state="running"))
        conn.execute(log.delete())

    server_db.install("raise")
    windows = []
    with Hammer(server_db, table) as hammer:
        time.sleep(0.2)
        for mode, protect in SWITCHES:
            with statements_sent() as sent:
                assert server_db.cli("install", f"--mode={mode}", f"--protect={protect or ','.join(DEFAULT_PROTECT)}") == 0
            ddl = [(started, ended) for statement, started, ended in sent if _GUARD_DDL.match(statement)]
            assert len(ddl) >= 2, ddl  # the new guard created, the old one dropped
            windows.append((ddl[0][0], ddl[-1][1]))
        time.sleep(0.2)

    verdicts = Counter(verdict for *_, verdict in hammer.attempts)
    print(f"\n{server_db.server}: {len(hammer.attempts)} skip attempts, {hammer.during(windows)} of them between the first "
          f"CREATE and the last DROP of the {len(windows)} replacements: {dict(verdicts)}")
    assert _overwrites(server_db) == 0
    with server_db.engine.connect() as conn:
        assert set(conn.execute(sa.select(table.c.state)).scalars()) == {"running"}
    assert not [v for v in verdicts if v.startswith("error")], verdicts
    assert verdicts["refused"] > 0 and verdicts["went through"] > 0  # both modes were hit
    assert hammer.during(windows) > 0
