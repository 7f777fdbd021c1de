"""A column the guard names, dropped by an Airflow migration (none from 2.7 to 3.3.2 does): what
each backend does, as the runbook says (docs/rollout.md, "Upgrading Airflow with the guard in place").

- PostgreSQL: a column in a trigger's `UPDATE OF` list (try_number, next_method) cannot be dropped
  ("other objects depend on it"): the migration stops before changing anything, the table and the
  guard as they were, every write as before (uninstall, migrate, install). Any other column goes
  and nothing fails.
- MariaDB / MySQL 9.7: the trigger restores the columns its rules' writers write; a write that
  reaches a rule naming the dropped column fails (error 1054) until `ti-guard install` re-renders
  the trigger for the columns left (when a rule to be installed reads the column, try_number for
  stale_schedule, install refuses in one line naming both, and installing with that rule switched
  off repairs it). So `status` and `doctor` must exit 2 saying the guard is broken
  and naming the column (0.4.0 said "still guards", exit 1), and install must repair it. Writes
  that reach no such rule never fail.
- SQLite: the column goes and nothing fails; a trigger watching it guards nothing, so status says
  broken and install re-renders it.

For each backend and each column the installed guard names (read from the server's own trigger and
function text) that is not one of the seven the guard reads and Airflow keys rows by, plus the
columns the rules' writers write, on a fresh table: install (ignore), drop the column, every rule's
write and Airflow's ordinary writes, status, install, status, the writes again, and a racy skip kept.
"""

from __future__ import annotations

import re
import uuid

import sqlalchemy as sa

from ti_guard import airflow_writes as aw
from ti_guard.policy import RULE_NAMES, Policy
from ti_guard.render import missing_columns

# Read by the guard (and Airflow's key): a migration that drops one of these is not a case the
# guard can survive; every other column may go.
CORE = {"state", "start_date", "end_date", "dag_id", "task_id", "run_id", "map_index"}
# What the rules' writers write, whether the guard names it today or not.
WRITER_COLUMNS = ("try_number", "scheduled_dttm", "duration", "updated_at", "next_method")
ROWS = {"done": "success", "busy": "running", "busy2": "running", "waiting": "queued"}


def _guard_text(db) -> str:
    """The guard's trigger (and PostgreSQL function) source, as the server holds it."""
    with db.engine.connect() as conn:
        if db.backend == "postgresql":
            triggers = conn.exec_driver_sql(
                "SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgrelid = 'task_instance'::regclass AND tgname LIKE 'ti_guard%%'").scalars()
            functions = conn.exec_driver_sql("SELECT prosrc FROM pg_proc WHERE proname LIKE 'ti_guard%%'").scalars()
            return "\n".join([*triggers, *functions])
        if db.backend == "mysql":
            return "\n".join(conn.exec_driver_sql(
                "SELECT ACTION_STATEMENT FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = DATABASE() AND TRIGGER_NAME LIKE 'ti_guard%%'").scalars())
        return "\n".join(conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'ti_guard%'").scalars())


def named_columns(db, columns) -> set[str]:
    """The table's columns the guard's SQL names: NEW.c / OLD.c, or in an `UPDATE OF` list."""
    text = _guard_text(db)
    of_lists = " ".join(re.findall(r"UPDATE OF (.+?) ON ", text, re.I))
    return {c for c in columns
            if re.search(rf"\b(?:NEW|OLD)\.[`\"]?{c}\b", text, re.I) or re.search(rf"(?<![\w.]){c}\b", of_lists)}


def _columns(db) -> list[str]:
    with db.engine.connect() as conn:
        return [c["name"] for c in sa.inspect(conn).get_columns("task_instance")]


def _reflect(db) -> sa.Table:
    return sa.Table("task_instance", sa.MetaData(), autoload_with=db.engine)


def _seed(db, table) -> None:
    started, ended = aw.now(), aw.now()
    with db.engine.begin() as conn:
        conn.execute(table.delete())
        for task, state in ROWS.items():
            row = dict(id=uuid.uuid4().hex, dag_id="d", task_id=task, run_id="r", map_index=-1, state=state, try_number=1,
                       start_date=started if state != "queued" else None, end_date=ended if state == "success" else None)
            conn.execute(table.insert().values(**{k: v for k, v in row.items() if k in table.c}))


def _every_write(table):
    """(name, statement) of every rule's write and Airflow's ordinary writes, on the seeded rows."""
    key = lambda task: aw.key_of(table, "d", task, "r")  # noqa: E731
    return [
        ("racy skip (racy_skip)", aw.racy_skip(table, "d", "r", [(t, -1) for t in ROWS])),
        ("set_state skip of a running TI (set_state_skip)", aw.set_state(table, key("busy"), "skipped")),
        ("stale schedule_tis (stale_schedule)", aw.schedule_tis(table, table.c.task_id.in_(["done", "busy"]))),
        ("worker start", aw.worker_start(table, key("waiting"))),
        ("heartbeat", aw.heartbeat(table, key("busy2"))),
        ("a task's own finish", aw.finish(table, key("busy2"), "success")),
        ("a task skipping itself", aw.finish(table, key("waiting"), "skipped")),
        ("run timeout", aw.run_timeout(table, key("busy"))),
    ]


def _failures(db, table) -> list[str]:
    """Every write on freshly seeded rows, each in its own transaction: the ones that failed."""
    _seed(db, table)
    failed = []
    for name, statement in _every_write(table):
        try:
            with db.engine.begin() as conn:
                conn.execute(statement)
        except sa.exc.DBAPIError as exc:
            failed.append(f"{name}: {str(exc.orig).splitlines()[0]}")
    return failed


def _state(db, table, task) -> str:
    with db.engine.connect() as conn:
        return conn.execute(sa.select(table.c.state).where(table.c.task_id == task)).scalar()


def test_a_dropped_column_the_guard_names_is_refused_or_reported_broken_and_repaired(db, capsys):
    db.table()
    db.install("ignore")
    named = named_columns(db, _columns(db))
    candidates = sorted((named | set(WRITER_COLUMNS)) - CORE)
    _fresh(db)
    problems, refused = [], []
    for column in candidates:
        db.table()  # a whole table and a fresh guard for each column
        db.install("ignore")
        names_it = column in named_columns(db, _columns(db))
        try:
            with db.engine.begin() as conn:
                conn.exec_driver_sql(f"ALTER TABLE task_instance DROP COLUMN {column}")
        except sa.exc.DBAPIError as exc:
            # PostgreSQL and SQLite refuse to drop a column a trigger names; MySQL never does.
            refusal = {"postgresql": "depend on it", "sqlite": "after drop column"}.get(db.backend)
            if refusal is None or refusal not in str(exc.orig):
                problems.append(f"{column}: the DROP failed: {str(exc.orig).splitlines()[0]}")
            refused.append(column)
            table = _reflect(db)
            assert column in table.c  # nothing changed ...
            problems += [f"{column} kept by {db.backend}, {failure}" for failure in _failures(db, table)]  # ... and every write as before
            _fresh(db)
            continue
        table = _reflect(db)
        failures = _failures(db, table)
        if failures and not (db.backend == "mysql" and names_it):
            problems += [f"{column} dropped, {failure}" for failure in failures]
        capsys.readouterr()
        rc = db.cli("status")
        out = capsys.readouterr().out
        if names_it and not (rc == 2 and "the guard is broken" in out and column in out):
            problems.append(f"{column} dropped: status exited {rc} without saying the guard is broken and naming the column: {out.strip()}")
        rc = db.cli("install")
        err = capsys.readouterr().err.strip()
        needed_by = [rule.name for _, rule in missing_columns(db.backend, Policy(), _columns(db))]
        if needed_by:
            # A rule that reads the column cannot be put back: install says so in one line, the
            # operator switches that rule off, and that install repairs the guard.
            if rc != 2 or err.count("\n") or f"no column {column}, which rule {needed_by[0]} reads" not in err:
                problems.append(f"{column} dropped: install with {needed_by} on did not refuse in one line naming the column and rule: {rc} {err}")
            rc = db.cli("install", "--rules=" + ",".join(n for n in RULE_NAMES if n not in needed_by))
            err = capsys.readouterr().err.strip()
        if rc != 0:
            problems.append(f"{column} dropped: install cannot repair the guard: {err}")
            _fresh(db)
            continue
        capsys.readouterr()
        if db.cli("status") != 0:
            problems.append(f"{column} dropped: status after install: {capsys.readouterr().out.strip()}")
        problems += [f"{column} dropped, after install: {failure}" for failure in _failures(db, table)]
        # The repaired guard keeps the racy skip of a finished and a running row.
        _seed(db, table)
        with db.engine.begin() as conn:
            conn.execute(aw.racy_skip(table, "d", "r", [(t, -1) for t in ROWS]))
        if (_state(db, table, "done"), _state(db, table, "busy")) != ("success", "running"):
            problems.append(f"{column} dropped, after install: the racy skip overwrote a protected row")
        _fresh(db)
    print(f"\n{db.server}: the guard names {sorted(named - CORE)}; dropped in turn: {candidates}; the DROP refused: {refused}")
    assert candidates and not problems, "\n".join(problems)
    # PostgreSQL refuses the columns a trigger names (in UPDATE OF or in its WHEN), SQLite those its WHEN or
    # its restoring UPDATE (stale_set_state_skip, kept and counted) reads.
    assert refused == {"postgresql": ["duration", "next_method", "try_number"], "sqlite": ["duration", "updated_at"]}.get(db.backend, [])


def _fresh(db) -> None:
    """Back to a whole Airflow table with no guard, for the next column."""
    assert db.cli("uninstall") == 0
    with db.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE task_instance")
