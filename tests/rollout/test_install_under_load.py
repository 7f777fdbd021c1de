"""Installing on a database that is being written: writers wait no longer than the lock timeout,
nothing they write is lost or refused, and an install that cannot get the lock retries as told,
then gives up leaving the database exactly as it was. (A first install that gives up leaving
nothing is tests/test_bad_input.py::test_lock_held_by_a_long_transaction.)"""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa

from ti_guard import airflow_writes as aw
from ti_guard.policy import Policy

from .guard_state import assert_converged, ddl_given_up, holding_the_table, statements_sent
from .load import DAG, Load, seed

pytestmark = pytest.mark.rollout

LOCK_TIMEOUT = 1.0  # MySQL's lock_wait_timeout counts whole seconds
# Past the lock timeout, a writer may still wait for the install's own DDL once it holds the lock,
# and for the machine: the slowest write of the load before the install, measured in the same test.
DDL_ALLOWANCE = 0.5


def _racy_skip(db, table, run_id):
    """The pre-fix skip UPDATE of a running TI; True when it went through."""
    try:
        with db.engine.begin() as conn:
            conn.execute(aw.racy_skip(table, DAG, run_id, [("t0", -1)]))
    except sa.exc.DBAPIError as exc:
        assert "ti_guard: refused" in str(exc.orig)
        return False
    with db.engine.connect() as conn:
        return conn.execute(sa.select(table.c.state).where(table.c.run_id == run_id, table.c.task_id == "t0")).scalar() == "skipped"


def _long_transactions(db, table, stop: threading.Event, holding: threading.Event):
    """Scheduler-like transactions that keep a row of task_instance (and so the table) locked:
    the first for longer than the install's lock timeout, the next ones for less."""
    hold = 2.5 * LOCK_TIMEOUT
    with db.engine.connect() as conn:
        while not stop.is_set():
            with conn.begin():
                conn.execute(aw.heartbeat(table, aw.key_of(table, DAG, "t0", "long")))
                holding.set()
                stop.wait(hold)
            hold = 0.8 * LOCK_TIMEOUT
            stop.wait(0.2)


def test_install_under_steady_write_load(server_db, capsys):
    table = server_db.table()
    seed(server_db, table, ["probe_before", "probe_after", "long"], "running")
    stop, holding = threading.Event(), threading.Event()
    with Load(server_db, table) as load:
        time.sleep(1.5)
        baseline_end = time.perf_counter()
        assert _racy_skip(server_db, table, "probe_before")  # without the guard: overwritten
        long = threading.Thread(target=_long_transactions, args=(server_db, table, stop, holding))
        long.start()
        try:
            # So that the install's first attempt meets a lock held longer than its timeout.
            assert holding.wait(10)
            started = time.perf_counter()
            with statements_sent() as sent:
                rc = server_db.cli("install", f"--lock-timeout={LOCK_TIMEOUT}", "--lock-retries=15")
            finished = time.perf_counter()
        finally:
            stop.set()
            long.join()
        gave_up = ddl_given_up(sent)
        refused = not _racy_skip(server_db, table, "probe_after")
        time.sleep(0.5)
    assert rc == 0, capsys.readouterr().err
    assert_converged(server_db, Policy())
    assert refused  # the guard is live under the load
    load.assert_nothing_lost()
    baseline, during = load.max_wait(0, baseline_end), load.max_wait(started, finished)
    print(f"\n{server_db.server}: install {finished - started:.2f}s, {len(gave_up)} lock timeouts before it got the lock; "
          f"{load.count(started, finished)} writes during it, slowest {during:.3f}s (before the install: {load.count(0, baseline_end)} writes, slowest {baseline:.3f}s); deadlocks retried: {dict(load.retried)}")
    assert load.count(0, baseline_end) > 0 and load.count(started, finished) > 0 and load.count(finished) > 0
    assert gave_up, "the long transactions never made the install wait: this test proved nothing about waits"
    assert during <= LOCK_TIMEOUT + DDL_ALLOWANCE + baseline, (during, baseline)


@pytest.mark.parametrize("retries", [1, 3])
def test_a_held_lock_makes_the_replace_give_up_after_its_retries_leaving_the_old_guard(server_db, capsys, retries):
    table = server_db.table()
    server_db.install("raise")
    with holding_the_table(server_db, table), statements_sent() as sent:
        started = time.perf_counter()
        rc = server_db.cli("install", "--mode=ignore", f"--lock-timeout={LOCK_TIMEOUT}", f"--lock-retries={retries}")
        elapsed = time.perf_counter() - started
    gave_up = ddl_given_up(sent)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0, err
    assert "could not lock task_instance" in err and f"gave up after {retries} attempts of 1s" in err, err
    assert len(gave_up) == retries and elapsed >= retries * LOCK_TIMEOUT, (gave_up, elapsed)
    assert_converged(server_db, Policy.build(mode="raise"))  # nothing half-made: the old guard, whole


def test_an_install_that_gets_the_lock_during_its_retries_finishes(server_db, capsys):
    table = server_db.table()
    with holding_the_table(server_db, table) as holder, statements_sent() as sent:
        release = threading.Timer(LOCK_TIMEOUT * 2, holder.rollback)
        release.start()
        rc = server_db.cli("install", f"--lock-timeout={LOCK_TIMEOUT}", "--lock-retries=5")
        release.join()
    gave_up = ddl_given_up(sent)
    assert rc == 0, capsys.readouterr().err
    assert 1 <= len(gave_up) < 5, gave_up
    assert_converged(server_db, Policy())

