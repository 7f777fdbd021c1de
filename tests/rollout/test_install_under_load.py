"""Installing on a database that is being written: writers keep getting through while the install
waits for its lock (it gives its request up after the lock timeout and retries; how long writers
waited is measured by benchmarks/bench_install_under_load.py, never asserted), nothing they write
is lost or refused, and an install that cannot get the lock retries as told,
then gives up leaving the database exactly as it was. (A first install that gives up leaving
nothing is tests/test_bad_input.py::test_lock_held_by_a_long_transaction.)"""

from __future__ import annotations

import threading

import pytest

from ti_guard.policy import Policy

from .guard_state import assert_converged, ddl_given_up, holding_the_table, statements_sent
from .load import install_under_load

pytestmark = pytest.mark.rollout

LOCK_TIMEOUT = 1.0  # MySQL's lock_wait_timeout counts whole seconds


def test_install_under_steady_write_load(server_db, capsys):
    """Writers keep writing while the install waits for its lock (writes start and finish during
    it), none is lost or refused, and the install ends with a live guard. How long the writers
    waited is a measurement, not asserted here: benchmarks/bench_install_under_load.py."""
    table = server_db.table()
    run = install_under_load(server_db, table, LOCK_TIMEOUT)
    load, started, finished = run["load"], run["started"], run["finished"]
    assert run["rc"] == 0, capsys.readouterr().err
    assert run["overwritten_before"]  # without the guard: overwritten
    assert_converged(server_db, Policy())
    assert run["refused_after"]  # the guard is live under the load
    load.assert_nothing_lost()
    print(f"\n{server_db.server}: {len(run['gave_up'])} lock timeouts before the install got the lock; "
          f"{load.count(started, finished)} writes during it; deadlocks retried: {dict(load.retried)}")
    assert load.count(0, run["baseline_end"]) > 0 and load.count(finished) > 0
    # Writers were not held up for the whole install: writes started during it (while it waited
    # for its lock and between its attempts) and finished before it did.
    assert load.finished_within(started, finished) > 0, "no write got through while the install ran"
    assert run["gave_up"], "the long transactions never made the install wait: this test proved nothing about waits"


@pytest.mark.parametrize("retries", [1, 3])
def test_a_held_lock_makes_the_replace_give_up_after_its_retries_leaving_the_old_guard(server_db, capsys, retries):
    table = server_db.table()
    server_db.install("raise")
    with holding_the_table(server_db, table), statements_sent() as sent:
        rc = server_db.cli("install", "--mode=ignore", f"--lock-timeout={LOCK_TIMEOUT}", f"--lock-retries={retries}")
    gave_up = ddl_given_up(sent)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0, err
    assert "could not lock task_instance" in err and f"gave up after {retries} attempts of 1s" in err, err
    assert len(gave_up) == retries, gave_up  # one DDL attempt given up per retry
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

