"""The guard on PostgreSQL 13+: one PL/pgSQL function, BEFORE ROW triggers with `UPDATE OF` and WHEN.

`UPDATE OF <column>` plus a WHEN clause keep every write that does not match a rule out of
PL/pgSQL entirely. PostgreSQL knows which columns a statement writes, so each rule's
signature is tested on the statement itself:

- racy_skip: `BEFORE UPDATE OF start_date`. The racy skip routes always write start_date; a
  task's own finish, the run timeout and `TaskInstance.set_state` on a started row never do.
- stale_schedule: `BEFORE UPDATE OF try_number`. `schedule_tis` always writes try_number.
- set_state_skip on Airflow 2 tables: `BEFORE UPDATE OF end_date`. set_state writes the skip
  and its end_date in one statement; a 2.x task that skips itself writes the state alone first.
- set_state_skip on Airflow 3 tables: `BEFORE UPDATE OF state`, kept unless the statement also wrote next_method
  (Airflow 3's own finish always does, `set_state` never does). A trigger cannot ask whether a
  column was left out of SET, so a companion trigger `BEFORE UPDATE OF next_method` with the
  same WHEN marks the row for the statement, and the keep trigger, which fires right after it
  for the same row (same-event triggers fire in name order), consumes the mark.

Keeping a row is RETURN OLD: the row stays as it was and the statement still counts it, so an
ORM flush that expects one row (the scheduler's) does not fail.
"""

from __future__ import annotations

from sqlalchemy.dialects import postgresql

from ..policy import (
    BUMPS_TRY_NUMBER,
    COUNT_BUCKETS,
    COUNTS_TABLE,
    ENDS_IN_ONE_STATEMENT,
    ENDS_WITHOUT_NEXT_METHOD,
    RECORD_ROWS,
    RECORD_SEQUENCE,
    RECORD_TABLE,
    STAMPS_START,
    Policy,
    short_hash,
)
from . import SIGNATURE_COLUMN, GuardObject, Quoter, enforced_rules, rule_condition

BYPASS_SETTING = "ti_guard.bypass"
SEES = frozenset({STAMPS_START, ENDS_WITHOUT_NEXT_METHOD, BUMPS_TRY_NUMBER, ENDS_IN_ONE_STATEMENT})

# TG_ARGV[0]: raise | keep | audit | mark; TG_ARGV[1]: the rule's name; TG_ARGV[2], when given:
# the row is let through if it was marked for this statement (ti_guard.decided): by the companion
# `mark` trigger (the statement wrote next_method), or by an earlier rule that audited it.
#
# The record (record.py): the function is SECURITY DEFINER because Airflow's account may hold no
# privilege on it; it lives in the guarded table's schema, which only the trigger knows
# (TG_TABLE_SCHEMA: the offline SQL cannot), so the search_path names it, after pg_catalog so
# that nothing there is shadowed (the function's SET restores the path on exit). A record dropped
# by hand is skipped, never an error for Airflow's write; no EXCEPTION block, whose
# subtransaction per refused row would slow every later row of a large statement.
_BODY = """
DECLARE
    n bigint;
BEGIN
    IF current_setting('ti_guard.bypass', true) = 'on' THEN
        RETURN NEW;
    END IF;
    IF TG_ARGV[0] = 'mark' THEN
        PERFORM set_config('ti_guard.decided', concat_ws(chr(31), OLD.dag_id, OLD.task_id, OLD.run_id, OLD.map_index, statement_timestamp()), true);
        RETURN NEW;
    END IF;
    IF TG_NARGS > 2 AND current_setting('ti_guard.decided', true) = concat_ws(chr(31), OLD.dag_id, OLD.task_id, OLD.run_id, OLD.map_index, statement_timestamp()) THEN
        PERFORM set_config('ti_guard.decided', '', true);
        RETURN NEW;
    END IF;
    IF TG_ARGV[0] = 'raise' THEN
        RAISE EXCEPTION USING
            ERRCODE = 'check_violation',
            MESSAGE = format('ti_guard: refused %s -> %s for dag_id=%s task_id=%s map_index=%s run_id=%s',
                             OLD.state, NEW.state, OLD.dag_id, OLD.task_id, OLD.map_index, OLD.run_id),
            DETAIL = format('Rule %s: a task instance that a worker started or that finished is not overwritten by another writer.', TG_ARGV[1]),
            HINT = 'For a deliberate repair: SET LOCAL ti_guard.bypass = ''on'' in the same transaction, or ti-guard set-state.';
    END IF;
    PERFORM set_config('search_path', format('pg_catalog, %I, pg_temp', TG_TABLE_SCHEMA), true);
    IF to_regclass('{sequence}') IS NOT NULL AND to_regclass('{details}') IS NOT NULL AND to_regclass('{counts}') IS NOT NULL THEN
        n := nextval('{sequence}');
        UPDATE {details} SET seq = n, refused_at = statement_timestamp() AT TIME ZONE 'UTC',
            rule = TG_ARGV[1], action = TG_ARGV[0], old_state = OLD.state, new_state = NEW.state,
            dag_id = OLD.dag_id, task_id = OLD.task_id, run_id = OLD.run_id, map_index = OLD.map_index,
            writer_user = session_user, writer_application = current_setting('application_name', true),
            writer_address = host(inet_client_addr()), writer_pid = pg_backend_pid()
        WHERE slot = n % {rows};
        INSERT INTO {counts} AS c (day, rule, action, old_state, new_state, connection_id, bucket, refusals)
        VALUES ((statement_timestamp() AT TIME ZONE 'UTC')::date, TG_ARGV[1], TG_ARGV[0], OLD.state, NEW.state, pg_backend_pid(), n % {buckets}, 1)
        ON CONFLICT (day, rule, action, old_state, new_state, connection_id, bucket) DO UPDATE SET refusals = c.refusals + 1;
    END IF;
    IF TG_ARGV[0] = 'audit' THEN
        -- Recorded once: a later rule's trigger for this row and statement lets it be.
        PERFORM set_config('ti_guard.decided', concat_ws(chr(31), OLD.dag_id, OLD.task_id, OLD.run_id, OLD.map_index, statement_timestamp()), true);
        RETURN NEW;
    END IF;
    RETURN OLD;
END
"""


def _function(q: Quoter, role: str, args: str, returns: str, body: str, config: str) -> GuardObject:
    name = f"ti_guard_{role}_{short_hash(args, body, config)}"
    fn = q.qualified(name)
    return GuardObject(
        kind="function",
        name=name,
        create=(
            f"CREATE OR REPLACE FUNCTION {fn}({args}) RETURNS {returns}\n"
            f"    LANGUAGE plpgsql\n    {config}\nAS $ti_guard$\n{body}\n$ti_guard$"
        ),
        drop=f"DROP FUNCTION IF EXISTS {fn}({args})",
        definition=body,
        compound=True,
    )


def render(policy: Policy, columns=None) -> list[GuardObject]:
    q = Quoter(postgresql.dialect(), policy)
    body = _BODY.strip("\n").format(
        sequence=RECORD_SEQUENCE, details=RECORD_TABLE, counts=COUNTS_TABLE, rows=RECORD_ROWS, buckets=COUNT_BUCKETS,
    )
    guard = _function(q, "guard", "", "trigger", body, "SECURITY DEFINER\n    SET search_path = pg_catalog, pg_temp")
    fn_name, fn = guard.name, q.qualified(guard.name)
    objects = [guard]

    def trigger(role: str, column: str, condition: str, *args: str) -> GuardObject:
        tail = (
            f"BEFORE UPDATE OF {q.ident(column)} ON {q.table}\n"
            f"    FOR EACH ROW\n    WHEN ({condition})\n    EXECUTE FUNCTION {fn}({q.in_list(args)})"
        )
        name = f"ti_guard_{role}_{short_hash(tail)}"
        return GuardObject(
            kind="trigger",
            name=name,
            create=f"CREATE TRIGGER {q.ident(name)} {tail}",
            drop=f"DROP TRIGGER IF EXISTS {q.ident(name)} ON {q.table}",
            definition=fn_name,
        )

    for rule, olds, action in enforced_rules("postgresql", policy, columns):
        condition = rule_condition(q, rule, olds, same="{a} IS NOT DISTINCT FROM {b}")
        if rule.signature in SIGNATURE_COLUMN:
            objects.append(trigger(rule.name, SIGNATURE_COLUMN[rule.signature], condition, action, rule.name))
        elif rule.signature == ENDS_WITHOUT_NEXT_METHOD:
            # Same-event triggers fire in name order: "..._finish_" before "..._keep_" (the mark is
            # set before it is read), and racy_skip before set_state_skip (so a racy write that
            # also matches this WHEN, on a clock tick equal to the old start, raises in raise mode).
            objects.append(trigger(f"{rule.name}_finish", "next_method", condition, "mark", rule.name))
            objects.append(trigger(f"{rule.name}_keep", "state", condition, action, rule.name, "unless_marked"))
    return objects
