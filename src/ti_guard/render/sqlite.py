"""The guard on SQLite: BEFORE UPDATE OF triggers with a WHEN clause.

SQLite resolves `UPDATE OF` when it compiles a statement, so writes that do not name state
(or start_date) pay nothing at all. Like PostgreSQL it knows which columns a statement
writes, so the self-finish test is exact. RAISE() takes only a literal message in the SQLite
versions Python ships (3.40 here): the message names the rule, not the row.
"""

from __future__ import annotations

from sqlalchemy.dialects import sqlite

from ..errors import GuardError
from ..policy import Policy, short_hash
from . import GuardObject, Quoter, column_triggers


def render(policy: Policy, columns=None) -> list[GuardObject]:
    if policy.db_schema:
        raise GuardError("a schema is not supported on SQLite (triggers live in the database of their table); drop the schema setting")
    q = Quoter(sqlite.dialect(), policy)
    if policy.mode == "raise":
        message = (
            "ti_guard: refused a transition to skipped from "
            + ", ".join(policy.protect)
            + " (a task instance that a worker started or that finished is not skipped by another writer)"
        )
        action = f"RAISE(ABORT, {q.literal(message)})"
    else:
        action = "RAISE(IGNORE)"
    objects = []
    for role, column, condition in column_triggers(policy, q, "{a} IS {b}"):
        tail = (
            f"BEFORE UPDATE OF {q.ident(column)} ON {q.ident(policy.table)}\n"
            f"FOR EACH ROW WHEN {condition}\n"
            f"BEGIN\n    SELECT {action};\nEND"
        )
        name = f"ti_guard_{role}_{short_hash(tail)}"
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
