"""The guard on PostgreSQL 13+: one PL/pgSQL function, BEFORE ROW triggers with `UPDATE OF` and WHEN.

`UPDATE OF <column>` plus a WHEN clause keep every write that does not match a rule out of
PL/pgSQL entirely. PostgreSQL knows which columns a statement writes, so each rule's
signature is tested on the statement itself:

- racy_skip: `BEFORE UPDATE OF start_date`. The racy skip routes always write start_date; a
  task's own finish, the run timeout and `TaskInstance.set_state` on a started row never do.
- stale_schedule: `BEFORE UPDATE OF try_number`. `schedule_tis` always writes try_number.
- set_state_skip: `BEFORE UPDATE OF state`, kept unless the statement also wrote next_method
  (Airflow 3's own finish always does, `set_state` never does). A trigger cannot ask whether a
  column was left out of SET, so a companion trigger `BEFORE UPDATE OF next_method` with the
  same WHEN marks the row for the statement, and the keep trigger, which fires right after it
  for the same row (same-event triggers fire in name order), consumes the mark.

Keeping a row is RETURN OLD: the row stays as it was and the statement still counts it, so an
ORM flush that expects one row (the scheduler's) does not fail.
"""

from __future__ import annotations

from sqlalchemy.dialects import postgresql

from ..policy import BUMPS_TRY_NUMBER, ENDS_WITHOUT_NEXT_METHOD, STAMPS_START, Policy, short_hash
from . import SIGNATURE_COLUMN, GuardObject, Quoter, enforced_rules, rule_condition

BYPASS_SETTING = "ti_guard.bypass"
SEES = frozenset({STAMPS_START, ENDS_WITHOUT_NEXT_METHOD, BUMPS_TRY_NUMBER})

# TG_ARGV[0]: raise | keep | mark | keep_unmarked; TG_ARGV[1]: the rule's name.
_BODY = """
BEGIN
    IF current_setting('ti_guard.bypass', true) = 'on' THEN
        RETURN NEW;
    END IF;
    IF TG_ARGV[0] = 'mark' THEN
        PERFORM set_config('ti_guard.finish', concat_ws(chr(31), OLD.dag_id, OLD.task_id, OLD.run_id, OLD.map_index, statement_timestamp()), true);
        RETURN NEW;
    END IF;
    IF TG_ARGV[0] = 'keep_unmarked' THEN
        IF current_setting('ti_guard.finish', true) = concat_ws(chr(31), OLD.dag_id, OLD.task_id, OLD.run_id, OLD.map_index, statement_timestamp()) THEN
            PERFORM set_config('ti_guard.finish', '', true);
            RETURN NEW;
        END IF;
        RETURN OLD;
    END IF;
    IF TG_ARGV[0] = 'raise' THEN
        RAISE EXCEPTION USING
            ERRCODE = 'check_violation',
            MESSAGE = format('ti_guard: refused %s -> %s for dag_id=%s task_id=%s map_index=%s run_id=%s',
                             OLD.state, NEW.state, OLD.dag_id, OLD.task_id, OLD.map_index, OLD.run_id),
            DETAIL = format('Rule %s: a task instance that a worker started or that finished is not overwritten by another writer.', TG_ARGV[1]),
            HINT = 'For a deliberate repair: SET LOCAL ti_guard.bypass = ''on'' in the same transaction, or ti-guard set-state.';
    END IF;
    RETURN OLD;
END
"""


def render(policy: Policy, columns=None) -> list[GuardObject]:
    q = Quoter(postgresql.dialect(), policy)
    body = _BODY.strip("\n")
    config = "SET search_path = pg_catalog, pg_temp"
    fn_name = f"ti_guard_guard_{short_hash(body, config)}"
    fn = q.qualified(fn_name)
    objects = [
        GuardObject(
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
    ]

    def trigger(role: str, column: str, condition: str, action: str, rule: str) -> GuardObject:
        tail = (
            f"BEFORE UPDATE OF {q.ident(column)} ON {q.table}\n"
            f"    FOR EACH ROW\n    WHEN ({condition})\n    EXECUTE FUNCTION {fn}({q.literal(action)}, {q.literal(rule)})"
        )
        name = f"ti_guard_{role}_{short_hash(tail)}"
        return GuardObject(
            kind="trigger",
            name=name,
            create=f"CREATE TRIGGER {q.ident(name)} {tail}",
            drop=f"DROP TRIGGER IF EXISTS {q.ident(name)} ON {q.table}",
            definition=fn_name,
        )

    for rule, olds, raises in enforced_rules("postgresql", policy, columns):
        condition = rule_condition(q, rule, olds, same="{a} IS NOT DISTINCT FROM {b}")
        if rule.signature in SIGNATURE_COLUMN:
            objects.append(trigger(rule.name, SIGNATURE_COLUMN[rule.signature], condition, "raise" if raises else "keep", rule.name))
        elif rule.signature == ENDS_WITHOUT_NEXT_METHOD:
            # Same-event triggers fire in name order: "..._finish_" before "..._keep_" (the mark is
            # set before it is read), and racy_skip before set_state_skip (so a racy write that
            # also matches this WHEN, on a clock tick equal to the old start, raises in raise mode).
            objects.append(trigger(f"{rule.name}_finish", "next_method", condition, "mark", rule.name))
            objects.append(trigger(f"{rule.name}_keep", "state", condition, "keep_unmarked", rule.name))
    return objects
