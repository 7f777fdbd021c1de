"""`ti-guard demo`: the race, replayed on a throw-away SQLite database shaped like Airflow's."""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

import sqlalchemy as sa

from . import airflow_writes as aw
from .airflow_shape import task_instance_table
from .config import resolve
from .db import make_engine
from .lifecycle import install, report
from .report import as_text, parse_since

DAG, RUN = "branchy", "manual__2026-11-23T10:00:00+00:00"
# task -> state before the branch decision lands
ROWS = {"extract": "running", "load": "success", "report": "failed", "notify": None, "cleanup": "queued"}


def _seed(engine, table):
    with engine.begin() as conn:
        conn.execute(table.delete())
        started = aw.now()
        for task, state in list(ROWS.items()) + [("sensor", "running")]:
            conn.execute(
                table.insert().values(
                    id=str(uuid.uuid4()), dag_id=DAG, run_id=RUN, task_id=task, map_index=-1, state=state,
                    try_number=1, start_date=started if state else None,
                    end_date=started if state in ("success", "failed") else None,
                )
            )


def _states(engine, table) -> dict:
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(table.c.task_id, table.c.state)).all())


def _replay(engine, table, title: str, install_mode: str | None = None) -> None:
    """One section: its heading, the install that switches to its mode (created/dropped lines), the race."""
    print(f"\n== {title}")
    if install_mode:
        url = engine.url.render_as_string(hide_password=False)
        outcome = install(resolve(url=url, mode=install_mode))
        for line in [*outcome.actions, outcome.summary]:
            print(f"  {line}")
    _seed(engine, table)
    try:
        with engine.begin() as conn:
            conn.execute(aw.racy_skip(table, DAG, RUN, [(t, -1) for t in ROWS]))
        print("  branch skip of 5 tasks (the pre-fix UPDATE): went through")
    except sa.exc.DBAPIError as exc:
        print(f"  branch skip of 5 tasks (the pre-fix UPDATE): REFUSED: {str(exc.orig).splitlines()[0]}")
    with engine.begin() as conn:
        conn.execute(aw.finish(table, aw.key_of(table, DAG, "sensor", RUN), "skipped"))
    print("  sensor skips itself (AirflowSkipException):   went through")
    after = _states(engine, table)
    for task, before in list(ROWS.items()) + [("sensor", "running")]:
        mark = "  <-- overwritten" if before in ("running", "success", "failed") and after[task] == "skipped" and task != "sensor" else ""
        print(f"    {task:8} {str(before):8} -> {after[task]}{mark}")


def run() -> int:
    with tempfile.TemporaryDirectory(prefix="ti-guard-demo-") as tmp:
        url = f"sqlite:///{Path(tmp) / 'airflow.db'}"
        engine = make_engine(url)
        table = task_instance_table(sa.MetaData())
        table.metadata.create_all(engine)
        print(f"Airflow-shaped metadata DB: {url}")
        _replay(engine, table, "without ti-guard")
        _replay(engine, table, "with ti-guard, mode=audit: every write goes through, what would be refused is recorded", "audit")
        _replay(engine, table, "with ti-guard, mode=raise: the statement fails, nothing is overwritten", "raise")
        _replay(engine, table, "with ti-guard, mode=ignore: guarded rows are left as they were, the rest is skipped", "ignore")
        engine.dispose()
        print("\n== ti-guard report (what the guard recorded above; raise mode's refusals rolled back with their statement)")
        settings = resolve(url=url)
        print(as_text(report(settings, parse_since("1h")), settings.safe_url))
    return 0
