"""Every row of the policy table, in both modes, on every backend, and the same writes without the guard."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from conftest import sees_statement

from ti_guard import airflow_writes as aw
from ti_guard.policy import COUNTS_TABLE

T0 = datetime(2026, 11, 23, 10, 0, 0, 123456, tzinfo=timezone.utc)
T0_WHOLE = T0.replace(microsecond=0)  # what a whole-second clock (MySQL CURRENT_TIMESTAMP) stamps
LATER = T0 + timedelta(seconds=7)
KEY = dict(dag_id="etl", task_id="load", run_id="manual__1", map_index=-1)

REFUSED, ALLOWED = "refused", "allowed"
# set_state_skip: kept in every mode (the scheduler writes it through the ORM), where the backend
# can see it (PostgreSQL; MySQL with performance_schema recording the statement); SQLite and MariaDB
# with performance_schema off cannot tell it from a task's own finish and let it through.
KEPT = "kept"
# stale_schedule: kept in every mode on all three backends; the writer (schedule_tis) is a bulk Core
# UPDATE that does not check the count, and SQLite's RAISE(IGNORE) does not count the row.
LEFT = "left as it was"
# stale_set_state_skip: kept and counted in every mode on every backend (all three see it by value).
COUNTED = "kept everywhere"


def _racy(when):
    return lambda t: aw.racy_skip(t, KEY["dag_id"], KEY["run_id"], [(KEY["task_id"], -1)], when)


def _finish(state, when):
    return lambda t: aw.finish(t, aw.key_of(t, **KEY), state, when)


def _set_state(state, when=LATER):
    return lambda t: aw.set_state(t, aw.key_of(t, **KEY), state, when)


def _stale_set_state(state, when=LATER):
    return lambda t: aw.set_state_from_stale_copy(t, aw.key_of(t, **KEY), state, when)


def _timeout(end_date=False):
    return lambda t: aw.run_timeout(t, aw.key_of(t, **KEY), LATER, end_date=end_date)


def _schedule():
    return lambda t: aw.schedule_tis(t, aw.key_of(t, **KEY), LATER)


def _set(**values):
    return lambda t: sa.update(t).where(aw.key_of(t, **KEY)).values(**values)


# (case, old state, old start_date, old end_date, write, verdict for the default policy)
CASES = [
    ("running: the attempt skips itself", "running", T0, None, _finish("skipped", LATER), ALLOWED),
    ("running: self-skip stamped by a coarse clock before start", "running", T0, None, _finish("skipped", T0_WHOLE), ALLOWED),
    ("running: self-skip in the same tick as its start", "running", T0_WHOLE, None, _finish("skipped", T0_WHOLE), "backend"),
    ("running: branch skip (start_date replaced)", "running", T0, None, _racy(LATER), REFUSED),
    ("running: branch skip, coarse clock, same tick as the start", "running", T0_WHOLE, None, _racy(T0_WHOLE), REFUSED),
    ("running: run timeout (state only)", "running", T0, None, _timeout(), ALLOWED),
    ("running: run timeout that also sets end_date (later releases)", "running", T0, None, _timeout(end_date=True), KEPT),
    ("running: set_state(skipped) (NotPreviouslySkippedDep, REST mark)", "running", T0, None, _set_state("skipped"), KEPT),
    ("running: set_state(skipped) on a copy read before the start", "running", T0, None, _stale_set_state("skipped"), COUNTED),
    ("success: set_state(skipped) on a copy read before the start", "success", T0, LATER, _stale_set_state("skipped"), COUNTED),
    ("running: set_state(failed) (REST mark)", "running", T0, None, _set_state("failed"), ALLOWED),
    ("running: set_state(success) (REST mark)", "running", T0, None, _set_state("success"), ALLOWED),
    ("success: branch skip", "success", T0, LATER, _racy(LATER), REFUSED),
    ("success: set_state(skipped) (operator's mark)", "success", T0, LATER, _set_state("skipped"), ALLOWED),
    ("success: set_state(skipped), start and end on one tick", "success", T0, T0, _set_state("skipped"), ALLOWED),
    ("failed: branch skip", "failed", T0, LATER, _racy(LATER), REFUSED),
    ("failed: skip that only sets state", "failed", T0, LATER, _set(state="skipped"), ALLOWED),
    ("NULL: branch skip", None, None, None, _racy(LATER), ALLOWED),
    ("scheduled: branch skip", "scheduled", None, None, _racy(LATER), ALLOWED),
    ("queued: branch skip (skippable on purpose)", "queued", T0, None, _racy(LATER), ALLOWED),
    ("queued: run timeout", "queued", T0, None, _timeout(), ALLOWED),
    ("up_for_retry: branch skip", "up_for_retry", T0, LATER, _racy(LATER), ALLOWED),
    ("deferred: branch skip", "deferred", T0, None, _racy(LATER), ALLOWED),
    ("deferred: set_state(skipped)", "deferred", T0, None, _set_state("skipped"), ALLOWED),
    ("up_for_reschedule: branch skip", "up_for_reschedule", T0, LATER, _racy(LATER), ALLOWED),
    ("running: heartbeat", "running", T0, None, lambda t: aw.heartbeat(t, aw.key_of(t, **KEY), LATER), ALLOWED),
    ("running: finishes success", "running", T0, None, _finish("success", LATER), ALLOWED),
    ("running: finishes failed", "running", T0, None, _finish("failed", LATER), ALLOWED),
    ("queued: worker starts", "queued", T0, None, lambda t: aw.worker_start(t, aw.key_of(t, **KEY), LATER), ALLOWED),
    ("success: cleared for a rerun", "success", T0, LATER, _set(state=None, end_date=None), ALLOWED),
    ("skipped: re-skipped", "skipped", T0, T0, _racy(LATER), ALLOWED),
    ("running: schedule_tis from a stale read", "running", T0, None, _schedule(), LEFT),
    ("success: schedule_tis from a stale read", "success", T0, LATER, _schedule(), LEFT),
    ("failed: schedule_tis from a stale read", "failed", T0, LATER, _schedule(), LEFT),
    ("NULL: schedule_tis", None, None, None, _schedule(), ALLOWED),
    ("up_for_retry: schedule_tis", "up_for_retry", T0, LATER, _schedule(), ALLOWED),
    ("up_for_reschedule: schedule_tis", "up_for_reschedule", T0, LATER, _schedule(), ALLOWED),
    ("running: human-in-the-loop resume (state only)", "running", T0, None, _set(state="scheduled"), ALLOWED),
]


def expected_verdict(db, verdict):
    backend = db.backend
    # PostgreSQL and SQLite see that the statement did not write start_date, so a task that
    # starts and skips itself within one clock tick is let through. MySQL sees only values, and
    # there that write is indistinguishable from a same-tick branch skip: it is refused (docs/policy.md).
    if verdict == "backend":
        return REFUSED if backend == "mysql" else ALLOWED
    if verdict == KEPT and not sees_statement(db):
        return ALLOWED
    return verdict


def _seed(db, table, state, start, end):
    with db.engine.begin() as conn:
        conn.execute(table.delete())
        conn.execute(table.insert().values(id=str(uuid.uuid4()), **KEY, state=state, start_date=start, end_date=end, try_number=1))
        conn.execute(  # a neighbour the statements never touch
            table.insert().values(id=str(uuid.uuid4()), **{**KEY, "task_id": "other"}, state="running", start_date=T0, try_number=1)
        )


def _row(db, table):
    with db.engine.connect() as conn:
        row = dict(conn.execute(sa.select(table).where(aw.key_of(table, **KEY))).mappings().one())
    row.pop("id", None)  # a fresh id per seed; every other column is compared
    return row


def _apply(db, table, write):
    """The error, or the rowcount the caller sees (an ORM flush fails unless it is 1)."""
    try:
        with db.engine.begin() as conn:
            return conn.execute(write(table)).rowcount
    except sa.exc.DBAPIError as exc:
        return exc


def _outcome(db, table, case):
    _, state, start, end, write, _ = case
    _seed(db, table, state, start, end)
    before = _row(db, table)
    result = _apply(db, table, write)
    error = result if isinstance(result, Exception) else None
    return before, _row(db, table), error, (None if error else result)


def _recorded(db) -> int:
    """Refusals the guard's record has counted so far (none before it is installed)."""
    with db.engine.connect() as conn:
        if not sa.inspect(conn).has_table(COUNTS_TABLE):
            return 0
        return conn.exec_driver_sql(f"SELECT COALESCE(SUM(refusals), 0) FROM {COUNTS_TABLE}").scalar()


@pytest.mark.parametrize("mode", ["raise", "ignore", "audit"])
def test_policy_table(db, mode):
    table = db.table()
    baseline = {case[0]: _outcome(db, table, case) for case in CASES}
    for name, (before, after, error, count) in baseline.items():
        # Without the guard every one of these writes goes through and changes the row.
        assert error is None and after != before and count == 1, f"without guard: {name}"
    db.install(mode=mode)
    wrong = []
    for case in CASES:
        name, verdict = case[0], expected_verdict(db, case[5])
        seen = _recorded(db)
        before, after, error, count = _outcome(db, table, case)
        # Every write the guard stops is recorded, except a raise: it rolls back with its statement.
        recorded = _recorded(db) - seen == int(verdict != ALLOWED and not (mode == "raise" and verdict == REFUSED))
        if mode == "audit":
            # Nothing is stopped: every write ends as it does without the guard.
            ok = error is None and after == baseline[name][1] and count == 1
        elif verdict == ALLOWED:
            ok = error is None and after == baseline[name][1] and count == 1
        elif verdict in (KEPT, COUNTED):
            # Never raised, in any mode, and still counted: the scheduler's ORM flush goes on.
            ok = error is None and after == before and count == 1
        elif verdict == LEFT:
            ok = error is None and after == before and count == (0 if db.backend == "sqlite" else 1)
        elif mode == "raise":
            ok = error is not None and "ti_guard: refused" in str(error.orig) and after == before
        else:
            ok = error is None and after == before
        if not (ok and recorded):
            wrong.append(f"{name}: expected {verdict}, got error={error and str(error.orig)[:80]!r} changed={after != before} rowcount={count} recorded={recorded}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("shape", ["2.x", "3.x"])
def test_refusal_message_names_the_row(db, shape):
    table = db.table(shape)
    with db.engine.begin() as conn:
        values = dict(**KEY, state="running", start_date=T0, try_number=1)
        conn.execute(table.insert().values(**values, **({"id": str(uuid.uuid4())} if shape == "3.x" else {})))
    assert _apply(db, table, _racy(LATER)) == 1 and _row(db, table)["state"] == "skipped"  # without the guard
    with db.engine.begin() as conn:
        conn.execute(sa.update(table).values(state="running", start_date=T0, end_date=None))
    db.install(mode="raise")
    error = _apply(db, table, _racy(LATER))
    assert isinstance(error, sa.exc.DBAPIError)
    message = str(error.orig)
    assert "ti_guard: refused" in message
    if db.backend == "postgresql":
        assert error.orig.sqlstate == "23514"
    if db.backend == "mysql":
        assert error.orig.args[0] == 1644  # ER_SIGNAL_EXCEPTION: SIGNAL SQLSTATE '45000'
    if db.backend != "sqlite":  # SQLite's RAISE() takes only a literal message
        for part in ("running -> skipped", "dag_id=etl", "task_id=load", "map_index=-1", "run_id=manual__1"):
            assert part in message, message
    assert _row(db, table)["state"] == "running"


def test_custom_protect_list(db):
    table = db.table()
    case = ("deferred: branch skip", "deferred", T0, None, _racy(LATER), ALLOWED)
    before, after, error, _ = _outcome(db, table, case)
    assert error is None and after["state"] == "skipped"  # without the guard
    db.install(protect="running,success,failed,deferred", mode="raise")
    before, after, error, _ = _outcome(db, table, case)
    assert error is not None and after == before
    # the default list would have let it through
    db.install(protect="running,success,failed", mode="raise")
    before, after, error, _ = _outcome(db, table, case)
    assert error is None and after["state"] == "skipped"


def test_airflow_2_backfill_rerun_of_failed_tasks_goes_through(db):
    """2.x backfill --rerun-failed-tasks moves failed -> scheduled with schedule_tis's signature
    (try_number written): on Airflow 2 tables failed is spared, running is still kept."""
    table = db.table("2.x")
    with db.engine.begin() as conn:
        conn.execute(table.insert().values(**KEY, state="failed", start_date=T0, end_date=LATER, try_number=1))
        conn.execute(table.insert().values(**{**KEY, "task_id": "busy"}, state="running", start_date=T0, try_number=1))
    busy = aw.key_of(table, **{**KEY, "task_id": "busy"})
    assert _apply(db, table, lambda t: aw.schedule_tis(t, busy)) == 1  # without the guard: overwritten
    with db.engine.connect() as conn:
        assert conn.execute(sa.select(table.c.state, table.c.try_number).where(busy)).one() == ("scheduled", 2)
    with db.engine.begin() as conn:
        conn.execute(sa.update(table).where(busy).values(state="running", try_number=1))
    db.install()
    assert _apply(db, table, _schedule()) == 1 and _row(db, table)["state"] == "scheduled"
    _apply(db, table, lambda t: aw.schedule_tis(t, busy))
    with db.engine.connect() as conn:
        assert conn.execute(sa.select(table.c.state, table.c.try_number).where(busy)).one() == ("running", 1)
    # the same write on the 3.x table is kept (see test_policy_table)


def _seed_2x(db, table, state, start, end):
    with db.engine.begin() as conn:
        conn.execute(table.delete())
        conn.execute(table.insert().values(**KEY, state=state, start_date=start, end_date=end, try_number=1))
        conn.execute(table.insert().values(**{**KEY, "task_id": "other"}, state="running", start_date=T0, try_number=1))


def _self_skip_2x(t):
    """Airflow 2's `_run_raw_task` on AirflowSkipException: `save_to_db` of state (+ updated_at) alone."""
    return sa.update(t).where(aw.key_of(t, **KEY)).values(state="skipped", updated_at=LATER)


def _self_skip_end_2x(t):
    """... and its second commit: end_date and duration, on the row that is already skipped."""
    return sa.update(t).where(aw.key_of(t, **KEY)).values(end_date=LATER, duration=7.0, updated_at=LATER)


# Airflow 2 tables (no `id`): each writer of running -> skipped as 2.11.2 / 2.10.5 send it.
# (case, old state, old start, old end, writes applied one after the other, verdict)
CASES_2X = [
    ("running: the task skips itself (state, then end_date a commit later)", "running", T0, None, [_self_skip_2x, _self_skip_end_2x], ALLOWED),
    ("running: run timeout (state only)", "running", T0, None, [_timeout()], ALLOWED),
    ("running: set_state(skipped) (NotPreviouslySkippedDep, TriggerRuleDep, REST mark)", "running", T0, None, [_set_state("skipped")], KEPT),
    ("running: set_state(skipped) on a copy read before the start", "running", T0, None, [_stale_set_state("skipped")], COUNTED),
    ("success: set_state(skipped) on a copy read before the start", "success", T0, LATER, [_stale_set_state("skipped")], COUNTED),
    ("running: set_state(failed) (REST mark)", "running", T0, None, [_set_state("failed")], ALLOWED),
    ("running: set_state(success) (REST mark)", "running", T0, None, [_set_state("success")], ALLOWED),
    ("running: SkipMixin's racy skip", "running", T0, None, [_racy(LATER)], REFUSED),
    ("success: set_state(skipped) (operator's mark)", "success", T0, LATER, [_set_state("skipped")], ALLOWED),
    ("deferred: set_state(skipped)", "deferred", T0, None, [_set_state("skipped")], ALLOWED),
]


@pytest.mark.parametrize("mode", ["raise", "ignore"])
def test_airflow_2_policy_table(db, mode):
    """On Airflow 2 tables set_state_skip is told by end_date written in the skip's own statement:
    the dependency writers' (and a REST mark's) set_state is kept, still counted (the scheduler's ORM
    flush goes on), on every backend; the task's own two-commit skip and the run timeout go through."""
    table = db.table("2.x")

    def outcome(case):
        _, state, start, end, writes, _ = case
        _seed_2x(db, table, state, start, end)
        before, results = _row(db, table), [_apply(db, table, w) for w in writes]
        error = next((r for r in results if isinstance(r, Exception)), None)
        return before, _row(db, table), error, results

    baseline = {case[0]: outcome(case) for case in CASES_2X}
    for name, (before, after, error, counts) in baseline.items():
        assert error is None and after != before and set(counts) == {1}, f"without guard: {name}"
    db.install(mode=mode)
    wrong = []
    for case in CASES_2X:
        name, verdict = case[0], case[5]
        before, after, error, counts = outcome(case)
        if verdict == ALLOWED:
            ok = error is None and after == baseline[name][1] and set(counts) == {1}
        elif verdict in (KEPT, COUNTED):
            ok = error is None and after == before and counts == [1]
        elif mode == "raise":
            ok = error is not None and "ti_guard: refused" in str(error.orig) and after == before
        else:
            ok = error is None and after == before
        if not ok:
            wrong.append(f"{name}: expected {verdict}, got error={error and str(error.orig)[:80]!r} changed={after != before} rowcounts={counts}")
    assert not wrong, "\n".join(wrong)


def test_docs_policy_tables_are_generated_from_the_rules():
    from ti_guard import docblock, policy_doc

    block = docblock.read(policy_doc.PAGE, "policy")
    assert block is not None, "docs/policy.md lost its policy block"
    assert block == policy_doc.markdown(), "docs/policy.md's policy tables are stale: python -m ti_guard.policy_doc --docs"


def test_a_skip_of_a_row_whose_duration_is_zero_is_kept_never_raised(db):
    """set_state on a copy read before the start writes duration = 0; on a row whose duration was 0
    already (an earlier skip, then a clear) the racy routes write the same values, so both are kept,
    in raise mode too: the scheduler's write must never fail."""
    table = db.table()

    def seed():
        _seed(db, table, "running", T0, None)
        with db.engine.begin() as conn:
            conn.execute(sa.update(table).where(aw.key_of(table, **KEY)).values(duration=0.0))
        return _row(db, table)

    writes = {"set_state on a stale copy": _stale_set_state("skipped"), "branch skip": _racy(LATER)}
    for name, write in writes.items():
        before = seed()
        assert _apply(db, table, write) == 1 and _row(db, table) != before, f"without guard: {name}"
    db.install(mode="raise")
    for name, write in writes.items():
        before = seed()
        assert _apply(db, table, write) == 1 and _row(db, table) == before, name
