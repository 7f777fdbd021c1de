"""An install stopped dead at every step, then run again, ends with exactly the right guard.

The install runs in a forked child that calls os._exit (no cleanup, no rollback sent: the
server sees the connection drop) at its n-th kill point, for n = 1, 2, ... until an install
runs to the end. Kill points are every statement that writes (DDL, INSERT, UPDATE, DELETE)
and every COMMIT of a transaction that wrote, each taken just before it: a statement that
only reads leaves the database as it was, so stopping before it or after it leaves the same
database, and these points reach every state an install passes through. After each kill the
test records what the database holds and checks that a guard that was whole before still
is; then it reruns the install and checks that it converges. After each kill, and after each
install that converged, it also writes: Airflow's own writes must go through whatever the kill
left, and a racy skip of a finished row must be kept or refused wherever a whole guard is there.
"""

from __future__ import annotations

import os
import re

import pytest
import sqlalchemy as sa

from conftest import ordinary_writes_go_through, seed_and_skip
from ti_guard import cli
from ti_guard.policy import Policy

from .guard_state import assert_converged, assert_nothing, complete, expected, installed, ours

pytestmark = pytest.mark.rollout

KILLED = 77
_READS = re.compile(r"\s*(SELECT|DESCRIBE|SHOW|PRAGMA|SET|BEGIN)\b", re.I)
RAISE, IGNORE = Policy.build(mode="raise"), Policy.build(mode="ignore")


def install_killed_at(url: str, mode: str, n: int) -> tuple[int, list[str]]:
    """Exit code of `ti-guard install --mode` in a child killed at its n-th kill point (KILLED), and
    what the child had done; 0 when the install finished before that."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(read)
        done, dirty = [], set()
        try:
            def point(conn, what):
                if what == "COMMIT" and id(conn) not in dirty:
                    return  # a transaction that only read: committing it changes nothing
                dirty.discard(id(conn)) if what == "COMMIT" else dirty.add(id(conn))
                done.append(what)
                if len(done) == n:
                    os.write(write, "\n".join(done).encode())
                    os._exit(KILLED)

            sa.event.listen(sa.engine.Engine, "before_cursor_execute", lambda c, cur, sql, *a: None if _READS.match(sql) else point(c, sql.strip().split("\n")[0][:80]))
            sa.event.listen(sa.engine.Engine, "commit", lambda c: point(c, "COMMIT"))
            rc = cli.main(["install", f"--mode={mode}", "--url", url])
            os.write(write, "\n".join(done).encode())
            os._exit(rc)
        except BaseException:  # noqa: BLE001 - anything else is a failure of the child
            os._exit(99)
    os.close(write)
    with os.fdopen(read) as pipe:
        steps = pipe.read().splitlines()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), steps


def _state(db):
    return frozenset(installed(db)), frozenset(ours(db))


def _guards(db, table) -> None:
    """A whole guard is in place: the racy skip of a finished row is kept or refused, and Airflow's own writes go through."""
    assert seed_and_skip(db.engine, table) == "success"
    ordinary_writes_go_through(db.engine, table)


def _kill_at_every_step(db, table, mode: str, before, policies_before, policy_after) -> list:
    """The states the kills left, in order; asserts convergence after each, and writes."""
    n, left = 0, []
    while True:
        n += 1
        before()
        start = _state(db)
        rc, steps = install_killed_at(db.url, mode, n)
        if rc == 0:
            assert_converged(db, policy_after)  # the install that was not killed
            _guards(db, table)
            print(f"\n{db.server}: {n - 1} kill points: {steps}")
            return [start, *left]
        assert rc == KILLED, (n, rc, steps)
        left.append(_state(db))
        # Airflow's own writes go through whatever the kill left (a half-made guard included).
        ordinary_writes_go_through(db.engine, table)
        # Whatever guard was whole before is still whole, or the new one already is, and it guards.
        if policies_before or complete(db, [policy_after]):
            assert complete(db, [*policies_before, policy_after]), (n, steps, installed(db))
            assert seed_and_skip(db.engine, table) == "success", (n, steps, installed(db))
        assert db.cli("install", f"--mode={mode}") == 0, (n, steps)
        assert_converged(db, policy_after)
        _guards(db, table)
        assert n < 100, "the install never finished"


def test_install_killed_at_every_step_converges(db, capsys):
    table = db.table()

    def nothing():
        assert db.cli("uninstall") == 0
        assert_nothing(db)

    start, *left = _kill_at_every_step(db, table, "raise", nothing, [], RAISE)
    _half_made_only_on_mysql(db, start, left)


def test_replace_killed_at_every_step_keeps_a_guard_and_converges(db, capsys):
    table = db.table()

    def raise_mode():
        assert db.cli("install", "--mode=raise") == 0
        assert_converged(db, RAISE)

    start, *left = _kill_at_every_step(db, table, "ignore", raise_mode, [RAISE], IGNORE)
    _half_made_only_on_mysql(db, start, left)
    if db.backend == "mysql":
        # The kills did land in the switch: once with both guards side by side, once with only the new one.
        both = frozenset(expected(db, RAISE)) | frozenset(expected(db, IGNORE))
        assert any(objects == both for objects, _ in left) and any(objects == frozenset(expected(db, IGNORE)) for objects, _ in left)


def _half_made_only_on_mysql(db, start, left) -> None:
    """PostgreSQL and SQLite install in transactions: a kill leaves the database as it was.
    MySQL commits each DDL statement: the kills must have left it half-way (or this test proved nothing)."""
    assert len(left) >= 3, left
    if db.backend == "mysql":
        assert len(set(left) - {start}) >= 2, left
    else:
        assert set(left) == {start}, left
