"""The UPDATEs Airflow 3.3.2 issues on task_instance (see shared airflow-facts), as Core statements.

Used by the demo, the tests and the race harness, so that all of them replay the same writes.
"""

from __future__ import annotations

from datetime import datetime, timezone

import sqlalchemy as sa


def now() -> datetime:
    return datetime.now(timezone.utc)


def _present(table: sa.Table, **values) -> dict:
    """The values whose column the table has: 2.x tables lack some of 3.x's columns, and a later
    Airflow migration may drop one (tests/test_dropped_column.py)."""
    return {name: value for name, value in values.items() if name in table.c}


def key_of(table: sa.Table, dag_id, task_id, run_id, map_index=-1):
    return sa.and_(table.c.dag_id == dag_id, table.c.task_id == task_id, table.c.run_id == run_id, table.c.map_index == map_index)


def worker_start(table: sa.Table, key, when=None):
    """`ti_run`: queued -> running; start_date replaced, end_date cleared (2.x tables have no last_heartbeat_at)."""
    when = when or now()
    return sa.update(table).where(key).values(state="running", start_date=when, end_date=None, **_present(table, last_heartbeat_at=when))


def heartbeat(table: sa.Table, key, when=None):
    """`ti_heartbeat`: no state change."""
    return sa.update(table).where(key).values(last_heartbeat_at=when or now())


def finish(table: sa.Table, key, state: str, when=None):
    """`ti_update_state`: the attempt finishing itself (success, failed or skipped); start_date untouched."""
    return sa.update(table).where(key).values(state=state, end_date=when or now(), **_present(table, next_method=None, next_kwargs=None))


def racy_skip(table: sa.Table, dag_id, run_id, task_keys, when=None):
    """The pre-fix `ti_skip_downstream` / `SkipMixin._set_state_to_skipped`: no guard on the current state."""
    when = when or now()
    return (
        sa.update(table)
        .where(table.c.dag_id == dag_id, table.c.run_id == run_id, sa.tuple_(table.c.task_id, table.c.map_index).in_(list(task_keys)))
        .values(state="skipped", start_date=when, end_date=when)
    )


def set_state_from_stale_copy(table: sa.Table, key, state: str, when=None):
    """`TaskInstance.set_state` on an ORM copy read before a worker started the row (the scheduler's
    dependency checks, two schedulers and Celery workers: benchmarks/production.py): the copy has
    no start_date, so set_state stamps one (`self.start_date or now`) and the end_date and duration
    that follow from it."""
    when = when or now()
    return sa.update(table).where(key).values(state=state, start_date=when, end_date=when,
                                              **_present(table, duration=0.0, updated_at=when))


def set_state(table: sa.Table, key, state: str, when=None):
    """`TaskInstance.set_state` through the ORM, on a started row: state, end_date (kept when set),
    duration, updated_at. The scheduler's NotPreviouslySkippedDep / TriggerRuleDep and an
    operator's REST mark send this; so does Airflow 2's own finish (`_run_raw_task`)."""
    when = when or now()
    end = sa.func.coalesce(table.c.end_date, when)
    return sa.update(table).where(key).values(state=state, end_date=end, **_present(table, duration=0.0, updated_at=when))


def run_timeout(table: sa.Table, key, when=None, end_date=False):
    """The scheduler failing a run that reached dagrun_timeout: every unfinished TI, running
    included, gets state = skipped through the ORM (state, updated_at). `end_date=True` is the
    form later releases may send (apache/airflow PRs #63250, #58588)."""
    when = when or now()
    extra = {"end_date": when} if end_date else {}
    return sa.update(table).where(key).values(state="skipped", **_present(table, updated_at=when), **extra)


def schedule_tis(table: sa.Table, where, when=None):
    """`DagRun.schedule_tis` before 3.3 (and every 2.x): no check of the current state; try_number
    goes up by one unless the row is up_for_reschedule. 2.x tables have no scheduled_dttm."""
    c = table.c
    values = {"state": "scheduled", **_present(table, scheduled_dttm=when or now())}
    if "try_number" in c:
        values["try_number"] = sa.case((sa.or_(c.state.is_(None), c.state != "up_for_reschedule"), c.try_number + 1), else_=c.try_number)
    return sa.update(table).where(where).values(**values)
