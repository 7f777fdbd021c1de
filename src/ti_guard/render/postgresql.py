"""The guard on PostgreSQL 13+: one PL/pgSQL function, two BEFORE ROW triggers.

`UPDATE OF state` plus a WHEN clause keep every write that does not set state to skipped out
of PL/pgSQL entirely. PostgreSQL also knows which columns a statement writes, so the
self-finish test is exact: the racy skip writer always writes start_date (`UPDATE OF
start_date` catches it whatever the clock says), the attempt finishing itself never does.
"""

from __future__ import annotations

from sqlalchemy.dialects import postgresql

from ..policy import Policy, short_hash
from . import GuardObject, Quoter, column_triggers

BYPASS_SETTING = "ti_guard.bypass"

_RAISE = """
BEGIN
    IF current_setting('ti_guard.bypass', true) = 'on' THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION USING
        ERRCODE = 'check_violation',
        MESSAGE = format('ti_guard: refused %s -> skipped for dag_id=%s task_id=%s map_index=%s run_id=%s',
                         OLD.state, OLD.dag_id, OLD.task_id, OLD.map_index, OLD.run_id),
        DETAIL = 'A task instance that a worker started or that finished is not skipped by another writer.',
        HINT = 'For a deliberate repair: SET LOCAL ti_guard.bypass = ''on'' in the same transaction, or ti-guard set-state.';
END
"""

_IGNORE = """
BEGIN
    IF current_setting('ti_guard.bypass', true) = 'on' THEN
        RETURN NEW;
    END IF;
    RETURN NULL;
END
"""


def render(policy: Policy, columns=None) -> list[GuardObject]:
    q = Quoter(postgresql.dialect(), policy)
    body = (_RAISE if policy.mode == "raise" else _IGNORE).strip("\n")
    config = "SET search_path = pg_catalog, pg_temp"
    fn_name = f"ti_guard_refuse_{short_hash(body, config)}"
    fn = q.qualified(fn_name)
    function = GuardObject(
        kind="function",
        name=fn_name,
        create=(
            f"CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger\n"
            f"    LANGUAGE plpgsql\n    {config}\nAS $ti_guard$\n{body}\n$ti_guard$"
        ),
        drop=f"DROP FUNCTION IF EXISTS {fn}()",
        definition=body,
        compound=True,
    )
    objects = [function]
    for role, column, condition in column_triggers(policy, q, "{a} IS NOT DISTINCT FROM {b}"):
        tail = (
            f"BEFORE UPDATE OF {q.ident(column)} ON {q.table}\n"
            f"    FOR EACH ROW\n    WHEN ({condition})\n    EXECUTE FUNCTION {fn}()"
        )
        name = f"ti_guard_{role}_{short_hash(tail)}"
        objects.append(
            GuardObject(
                kind="trigger",
                name=name,
                create=f"CREATE TRIGGER {q.ident(name)} {tail}",
                drop=f"DROP TRIGGER IF EXISTS {q.ident(name)} ON {q.table}",
                definition=fn_name,
            )
        )
    return objects

