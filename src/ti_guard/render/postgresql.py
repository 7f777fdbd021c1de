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

from ..errors import GuardError
from ..policy import (
    BUMPS_TRY_NUMBER,
    COUNT_BUCKETS,
    COUNTS_TABLE,
    ENDS_IN_ONE_STATEMENT,
    ENDS_WITHOUT_NEXT_METHOD,
    LANES,
    RECORD_ROWS,
    RECORD_SEQUENCE,
    RECORD_TABLE,
    STAMPS_START,
    STAMPS_START_AND_DURATION,
    Policy,
    short_hash,
)
from . import SIGNATURE_COLUMN, GuardObject, Quoter, enforced_rules, rule_condition

BYPASS_SETTING = "ti_guard.bypass"
SEES = frozenset({STAMPS_START, STAMPS_START_AND_DURATION, ENDS_WITHOUT_NEXT_METHOD, BUMPS_TRY_NUMBER, ENDS_IN_ONE_STATEMENT})
# The record's lanes (policy.LANES) are transaction-scoped advisory locks of this class: the two-key
# form with a first key of its own never meets Airflow's (one-key, small) advisory locks.
LANE_LOCK_CLASS = 1952997735  # 'tiGg'
# Offline SQL rendered without a schema: the DBA's session names it at install time (_offline_create).
_SCHEMA_TOKEN = "@ti_guard_schema@"
_SCHEMA_LITERAL_TOKEN = "@ti_guard_schema_literal@"
_DOLLAR_QUOTE = "$ti_guard"

# TG_ARGV[0]: raise | keep | audit | mark; TG_ARGV[1]: the rule's name; TG_ARGV[2], when given:
# the row is let through if it was marked for this statement (ti_guard.decided): by the companion
# `mark` trigger (the statement wrote next_method), or by an earlier rule that audited it.
#
# SECURITY DEFINER, for the record only: Airflow's account may hold no privilege on the record,
# and must not (it could then forge or delete refusals). So nothing in here resolves a name
# through a path a caller controls (SECURITY.md): the search_path is pinned to pg_catalog then
# pg_temp (PostgreSQL never looks up functions or operators in pg_temp), every relation is
# qualified with the schema rendered at install, the one operator on a computed value is named
# in pg_catalog, EXECUTE is revoked from PUBLIC, and on any table but the guarded one the
# function does nothing at all. A record dropped by hand is skipped, never an error for
# Airflow's write; no EXCEPTION block, whose subtransaction per refused row would slow every
# later row of a large statement. The bypass counts for an account that holds TRIGGER on the
# table (it could drop the guard anyway), never for the setting alone.
_BODY = """
DECLARE
    seq regclass;
    n bigint;
    lane bigint;
BEGIN
    IF TG_TABLE_SCHEMA <> {schema_literal} OR TG_TABLE_NAME <> {table_literal} THEN
        RETURN NEW;
    END IF;
    IF current_setting('ti_guard.bypass', true) = 'on' THEN
        IF has_table_privilege(session_user, TG_RELID, 'TRIGGER') THEN
            RETURN NEW;
        END IF;
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
            HINT = 'For a deliberate repair by an account with TRIGGER on the table: SET LOCAL ti_guard.bypass = ''on'' in the same transaction, or ti-guard set-state.';
    END IF;
    seq := to_regclass(format('%I.%I', {schema_literal}, '{sequence}'));
    IF seq IS NOT NULL AND to_regclass(format('%I.%I', {schema_literal}, '{details}')) IS NOT NULL
            AND to_regclass(format('%I.%I', {schema_literal}, '{counts}')) IS NOT NULL THEN
        n := nextval(seq);
        -- A slot another open transaction holds is skipped, never waited for: the count below still counts.
        UPDATE {schema}.{details} SET seq = n, refused_at = statement_timestamp() AT TIME ZONE 'UTC',
            rule = TG_ARGV[1], action = TG_ARGV[0], old_state = OLD.state, new_state = NEW.state,
            dag_id = OLD.dag_id, task_id = OLD.task_id, run_id = OLD.run_id, map_index = OLD.map_index,
            writer_user = session_user, writer_application = current_setting('application_name', true),
            writer_address = host(inet_client_addr()), writer_pid = pg_backend_pid()
        WHERE slot = (SELECT r.slot FROM {schema}.{details} r WHERE r.slot = n OPERATOR(pg_catalog.%) {rows} FOR UPDATE SKIP LOCKED);
        lane := 0;
        FOR i IN 1..{lanes} LOOP
            EXIT WHEN pg_try_advisory_xact_lock({lock_class}, lane::integer);
            lane := CASE WHEN i = {lanes} THEN {lanes} + pg_backend_pid() ELSE (lane + 1) OPERATOR(pg_catalog.%) {lanes} END;
        END LOOP;
        INSERT INTO {schema}.{counts} AS c (day, rule, action, old_state, new_state, connection_id, bucket, refusals)
        VALUES ((statement_timestamp() AT TIME ZONE 'UTC')::date, TG_ARGV[1], TG_ARGV[0], OLD.state, NEW.state, lane, n OPERATOR(pg_catalog.%) {buckets}, 1)
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
_CONFIG = "SECURITY DEFINER\n    SET search_path = pg_catalog, pg_temp"


def schema_ident(schema: str) -> str:
    """Always quoted, so that the text rendered here and the text a DBA's session renders at install
    (_offline_create) are the same: status compares them."""
    return '"' + schema.replace('"', '""') + '"'


def schema_literal(schema: str) -> str:
    """As PostgreSQL's quote_literal writes it (E'' when there is a backslash)."""
    text = schema.replace("'", "''")
    return f"E'{text.replace(chr(92), chr(92) * 2)}'" if "\\" in schema else f"'{text}'"


def _guard_function(q: Quoter, schema: str | None) -> GuardObject:
    """The guard function. Its name hashes the text before the schema is put in, so offline SQL that
    does not know the schema yet names it as an online install into that schema does."""
    template = _BODY.strip("\n").format(
        schema=_SCHEMA_TOKEN,
        schema_literal=_SCHEMA_LITERAL_TOKEN,
        table_literal=q.literal(q.policy.table),
        sequence=RECORD_SEQUENCE,
        details=RECORD_TABLE,
        counts=COUNTS_TABLE,
        rows=RECORD_ROWS,
        buckets=COUNT_BUCKETS,
        lanes=LANES,
        lock_class=LANE_LOCK_CLASS,
    )
    name = f"ti_guard_guard_{short_hash('', template, _CONFIG)}"
    fn = q.qualified(name)

    def create(body: str) -> str:
        return f"CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger\n    LANGUAGE plpgsql\n    {_CONFIG}\nAS $ti_guard$\n{body}\n$ti_guard$"

    if schema is None:
        body, statement = template, _offline_create(q, create(template))
    else:
        if _DOLLAR_QUOTE in schema:
            raise GuardError(f"schema name {schema!r} holds {_DOLLAR_QUOTE!r}, which quotes the guard function's body: rename the schema")
        body = template.replace(_SCHEMA_TOKEN, schema_ident(schema)).replace(_SCHEMA_LITERAL_TOKEN, schema_literal(schema))
        statement = create(body)
    return GuardObject(
        kind="function",
        name=name,
        create=statement,
        drop=f"DROP FUNCTION IF EXISTS {fn}()",
        definition=body,
        compound=True,
        after=(f"REVOKE ALL ON FUNCTION {fn}() FROM PUBLIC",),
    )


def _offline_create(q: Quoter, create: str) -> str:
    """SQL for a DBA that names no schema: the function is created in the session's current schema,
    which must hold the table (the rest of the file creates the record there too)."""
    missing = q.literal(f"ti_guard: no table {q.policy.table} in the current schema ")
    fix = q.literal(": SET search_path to Airflow's schema first, or render the SQL for it (ti-guard sql --schema NAME)")
    return (
        "DO $ti_guard_install$\nDECLARE\n    s text := current_schema();\nBEGIN\n"
        f"    IF s IS NULL OR to_regclass(format('%I.%I', s, {q.literal(q.policy.table)})) IS NULL THEN\n"
        f"        RAISE EXCEPTION USING MESSAGE = {missing} || coalesce(s, '(none)') || {fix};\n"
        "    END IF;\n"
        f"    IF position('{_DOLLAR_QUOTE}' in s) > 0 THEN\n"
        f"        RAISE EXCEPTION USING MESSAGE = 'ti_guard: the schema name holds {_DOLLAR_QUOTE}, which quotes the guard function''s body: rename the schema';\n"
        "    END IF;\n"
        f"    EXECUTE replace(replace($ti_guard_function${create}$ti_guard_function$,\n"
        f"        '{_SCHEMA_TOKEN}', '\"' || replace(s, '\"', '\"\"') || '\"'), '{_SCHEMA_LITERAL_TOKEN}', quote_literal(s));\n"
        "END\n$ti_guard_install$"
    )


def render(policy: Policy, columns=None, schema: str | None = None) -> list[GuardObject]:
    """`schema`: where the guarded table and the record are (policy.schema, or the connection's
    current schema); None only for offline SQL, which then reads it from the DBA's session."""
    q = Quoter(postgresql.dialect(), policy)
    guard = _guard_function(q, policy.db_schema or schema)
    fn_name, fn = guard.name, q.qualified(guard.name)
    objects = [guard]

    def trigger(role: str, column: str, condition: str, *args: str) -> GuardObject:
        def tail(table: str, function: str) -> str:
            return (
                f"BEFORE UPDATE OF {q.ident(column)} ON {table}\n"
                f"    FOR EACH ROW\n    WHEN ({condition})\n    EXECUTE FUNCTION {function}({q.in_list(args)})"
            )

        # Named by the text without the schema, as the function is: SQL rendered for a DBA without
        # a schema and an install that names it make the same objects.
        name = f"ti_guard_{role}_{short_hash(tail(q.ident(policy.table), q.ident(fn_name)))}"
        return GuardObject(
            kind="trigger",
            name=name,
            create=f"CREATE TRIGGER {q.ident(name)} {tail(q.table, fn)}",
            drop=f"DROP TRIGGER IF EXISTS {q.ident(name)} ON {q.table}",
            definition=fn_name,
        )

    for rule, olds, action in enforced_rules("postgresql", policy, columns):
        # Operators named in pg_catalog: the installer's search_path may hold a schema others can
        # create in (PostgreSQL < 15's public), where an exact-match `=` would win.
        condition = rule_condition(
            q, rule, olds, same="{a} IS NOT DISTINCT FROM {b}", equals="{a} OPERATOR(pg_catalog.=) {b}",
            member="{a} OPERATOR(pg_catalog.=) ANY (ARRAY[{b}])", columns=columns,
            # float8 against float8: pg_catalog's `=` is the exact match (an integer 0 would bind a
            # planted `=(float8, integer)` from the installer's search_path).
            zero="CAST(0 AS double precision)",
        )
        if rule.signature in SIGNATURE_COLUMN:
            objects.append(trigger(rule.name, SIGNATURE_COLUMN[rule.signature], condition, action, rule.name))
        elif rule.signature == ENDS_WITHOUT_NEXT_METHOD:
            # Same-event triggers fire in name order: "..._finish_" before "..._keep_" (the mark is
            # set before it is read), and racy_skip before set_state_skip (so a racy write that
            # also matches this WHEN, on a clock tick equal to the old start, raises in raise mode).
            objects.append(trigger(f"{rule.name}_finish", "next_method", condition, "mark", rule.name))
            objects.append(trigger(f"{rule.name}_keep", "state", condition, action, rule.name, "unless_marked"))
    return objects
