"""The guard on SQLite: BEFORE UPDATE OF triggers with a WHEN clause.

SQLite resolves `UPDATE OF` when it compiles a statement, so writes that do not name the
column pay nothing at all. Like PostgreSQL it knows which columns a statement writes, so the
racy skip routes are told by the start_date they write. It cannot tell a statement that left
next_method out of SET from one that wrote it (a trigger can neither mark a row for another
nor change NEW), so set_state_skip is not enforced on Airflow 3 tables. On Airflow 2 tables it
is told by `UPDATE OF end_date` (set_state writes the skip and end_date in one statement, a 2.x
task that skips itself the state alone first); its writers check the rowcount (the scheduler's
ORM), so the row is kept by an AFTER trigger that writes the old values back: the statement
still counts it (recursive_triggers is off, so that write fires no trigger of its own).
RAISE() takes only a literal message
in the SQLite versions Python ships (3.40 here): the message names the rule, not the row.
RAISE(IGNORE) drops the row from the statement's count; only bulk Core writers (which do not
check the count) meet racy_skip and stale_schedule.
"""

from __future__ import annotations

from sqlalchemy.dialects import sqlite

from ..errors import GuardError
from ..policy import (
    BUMPS_TRY_NUMBER,
    COUNT_BUCKETS,
    COUNTS_TABLE,
    ENDS_IN_ONE_STATEMENT,
    KEEP,
    RAISE,
    RECORD_ROWS,
    RECORD_TABLE,
    STAMPS_START,
    STAMPS_START_AND_DURATION,
    Policy,
    short_hash,
)
from . import SIGNATURE_COLUMN, GuardObject, Quoter, enforced_rules, rule_condition

SEES = frozenset({STAMPS_START, STAMPS_START_AND_DURATION, BUMPS_TRY_NUMBER, ENDS_IN_ONE_STATEMENT})
KEY_COLUMNS = ("dag_id", "task_id", "run_id", "map_index")
# Writes by an ORM flush, which fails unless its row is counted: kept by an AFTER trigger that
# writes the old values back (RAISE(IGNORE) in a BEFORE trigger would leave the row uncounted).
COUNTED = (ENDS_IN_ONE_STATEMENT, STAMPS_START_AND_DURATION)


def render(policy: Policy, columns=None, schema=None) -> list[GuardObject]:
    if policy.db_schema:
        raise GuardError("a schema is not supported on SQLite (triggers live in the database of their table); drop the schema setting")
    q = Quoter(sqlite.dialect(), policy)
    objects = []
    for rule, olds, action in enforced_rules("sqlite", policy, columns):
        if action == RAISE:
            message = (
                f"ti_guard: refused a transition to {rule.new_state} from {', '.join(olds)} by {rule.name}"
                " (a task instance that a worker started or that finished is not overwritten by another writer)"
            )
            steps = f"    SELECT RAISE(ABORT, {q.literal(message)});"
        elif rule.signature in COUNTED:
            steps = _record(q, rule.name, action) + (_restore(q, rule, columns) if action == KEEP else "")
        else:
            # RAISE(IGNORE) rolls nothing back: the record written before it stays.
            steps = _record(q, rule.name, action) + ("\n    SELECT RAISE(IGNORE);" if action == KEEP else "")
        when = "AFTER" if rule.signature in COUNTED else "BEFORE"
        tail = (
            f"{when} UPDATE OF {q.ident(SIGNATURE_COLUMN[rule.signature])} ON {q.ident(policy.table)}\n"
            f"FOR EACH ROW WHEN {rule_condition(q, rule, olds, same='{a} IS {b}', columns=columns)}\n"
            f"BEGIN\n{steps}\nEND"
        )
        name = f"ti_guard_{rule.name}_{short_hash(tail)}"
        create = f"CREATE TRIGGER {q.ident(name)} {tail}"
        objects.append(
            GuardObject(
                kind="trigger",
                name=name,
                create=create,
                drop=f"DROP TRIGGER IF EXISTS {q.ident(name)}",
                definition=create,
                compound=True,
            )
        )
    return objects


def _restore(q: Quoter, rule, columns) -> str:
    """Keep a row the statement still counts: write the rule's writers' columns back (AFTER trigger)."""
    restored = ", ".join(f"{q.ident(c)} = OLD.{q.ident(c)}" for c in rule.writes if columns is None or c in columns)
    key = " AND ".join(f"{q.ident(c)} = OLD.{q.ident(c)}" for c in KEY_COLUMNS)
    return f"\n    UPDATE {q.ident(q.policy.table)} SET {restored}\n    WHERE {key};"


def _record(q: Quoter, rule: str, action: str) -> str:
    """Write the refusal to the record (record.py). SQLite has one writer at a time, so the next
    number is the last one + 1 (an index on seq makes MAX cheap); the writer is not known here."""
    details, counts = q.ident(RECORD_TABLE), q.ident(COUNTS_TABLE)
    following = f"(SELECT COALESCE(MAX(seq), 0) + 1 FROM {details})"
    return (
        f"    UPDATE {details} SET seq = {following}, refused_at = strftime('%Y-%m-%d %H:%M:%f000', 'now'),\n"
        f"        rule = {q.literal(rule)}, action = {q.literal(action)}, old_state = OLD.state, new_state = NEW.state,\n"
        "        dag_id = OLD.dag_id, task_id = OLD.task_id, run_id = OLD.run_id, map_index = OLD.map_index\n"
        f"    WHERE slot = {following} % {RECORD_ROWS};\n"
        f"    INSERT INTO {counts} (day, rule, action, old_state, new_state, connection_id, bucket, refusals)\n"
        f"    VALUES (date('now'), {q.literal(rule)}, {q.literal(action)}, OLD.state, NEW.state, 0, (SELECT MAX(seq) FROM {details}) % {COUNT_BUCKETS}, 1)\n"
        "    ON CONFLICT (day, rule, action, old_state, new_state, connection_id, bucket) DO UPDATE SET refusals = refusals + 1;"
    )
