"""The guard on MySQL 8.0+ (tested on MariaDB 10.11): one BEFORE UPDATE trigger.

Only syntax both servers accept: no CREATE OR REPLACE TRIGGER, no IF NOT EXISTS on
triggers. MySQL has neither WHEN nor a column list, so the trigger body fires for every
row of every UPDATE. A row that is not being set to skipped meets one small byte comparison
and leaves; what that costs against an empty trigger is counted in benchmarks/NOTES.md.

MySQL cannot see which columns a statement wrote, only values. The racy skip writer stamps
start_date and end_date with one `now`, so a skip whose end_date equals its start_date is
not the attempt finishing itself even when a coarse clock puts that `now` on the very tick
the task started.

The bypass counts only while @ti_guard_bypass holds the current InnoDB transaction's id: a
user variable outlives the transaction (a pooled connection keeps it), the id does not.
InnoDB serves INFORMATION_SCHEMA.INNODB_TRX from a cache refreshed at most every 100 ms, so
right after a commit it can still show the connection's previous transaction: the check
waits those 100 ms once per statement (and only for a row it would otherwise refuse while
the variable is set), then remembers the verdict for the rest of that statement.
"""

from __future__ import annotations

from sqlalchemy.dialects import mysql

from ..errors import GuardError
from ..policy import AUDIT, BUMPS_TRY_NUMBER, COUNT_BUCKETS, COUNTS_TABLE, ENDS_IN_ONE_STATEMENT, RAISE, RECORD_ROWS, RECORD_TABLE, STAMPS_START, Policy, short_hash
from . import GuardObject, Quoter, enforced_rules

BYPASS_VARIABLE = "@ti_guard_bypass"
CURRENT_TRX_ID = "SELECT trx_id FROM information_schema.INNODB_TRX WHERE trx_mysql_thread_id = CONNECTION_ID()"
INNODB_TRX_CACHE_SECONDS = 0.11
# Within one statement NOW(6) is fixed, so this names "this bypass, this statement".
_VERIFIED = "CONCAT(@ti_guard_bypass, '@', NOW(6))"
MESSAGE_VARIABLE = "@ti_guard_refusal"
# MySQL caps MESSAGE_TEXT at 128 characters; run_id goes last because it is the longest.
MESSAGE_LIMIT = 128
# set_state_skip on Airflow 3 tables is not enforced: set_state and a task's own finish write the
# same values. On Airflow 2 tables it is, by value: set_state sets end_date with the skip, a 2.x
# task that skips itself writes the state alone (end_date unchanged) and end_date a commit later.
SEES = frozenset({STAMPS_START, BUMPS_TRY_NUMBER, ENDS_IN_ONE_STATEMENT})


def _nested(tests: list[str], action: str, depth: int = 1) -> str:
    """IF a THEN IF b THEN ... action, one test per IF, in the order given."""
    pad = "    " * depth
    if not tests:
        return "\n".join(pad + line for line in action.splitlines())
    return f"{pad}IF {tests[0]} THEN\n{_nested(tests[1:], action, depth + 1)}\n{pad}END IF;"


def _signature_test(signature: str) -> str:
    """The value half of a signature: MySQL cannot see which columns a statement wrote."""
    if signature == STAMPS_START:
        # The racy routes stamp start_date = end_date = now; on a coarse clock that `now` can
        # equal the old start_date, so an end_date newly set to start_date counts too.
        return ("NOT (NEW.start_date <=> OLD.start_date)"
                " OR (NOT (NEW.end_date <=> OLD.end_date) AND NEW.end_date <=> NEW.start_date)")
    if signature == ENDS_IN_ONE_STATEMENT:
        return "NEW.end_date IS NOT NULL AND NOT (NEW.end_date <=> OLD.end_date) AND NEW.start_date <=> OLD.start_date"
    if signature == BUMPS_TRY_NUMBER:
        # schedule_tis adds one to try_number of every row that is not up_for_reschedule.
        return "NOT (NEW.try_number <=> OLD.try_number)"
    raise GuardError(f"MySQL cannot test signature {signature!r}")


def render(policy: Policy, columns=None) -> list[GuardObject]:
    q = Quoter(mysql.dialect(), policy)

    # States compare byte for byte, as on PostgreSQL and SQLite: no collation to settle per row,
    # the cheapest form of the test measured (an introducer such as _binary'skipped' counts the
    # same but MySQL drops it from the body it shows, so the guard could not recognise itself).
    new_state, old_state = "CAST(NEW.state AS BINARY)", "CAST(OLD.state AS BINARY)"

    def keep(rule) -> str:
        # Only the rule's writers' columns: assigning NEW.c makes MariaDB treat c as written by
        # every UPDATE that enters the trigger, taken or not (benchmarks/NOTES.md).
        restored = [c for c in rule.writes if columns is None or c in columns]
        return "SET " + ",\n    ".join(f"NEW.{q.ident(c)} = OLD.{q.ident(c)}" for c in restored) + ";"

    # A user variable, not a DECLAREd one: a local variable costs every row that enters the
    # trigger (its frame is built per call), refusing or not.
    refuse = (
        f"SET {MESSAGE_VARIABLE} = LEFT(CONCAT('ti_guard: refused ', OLD.state, ' -> ', NEW.state, ' for dag_id=', OLD.dag_id,\n"
        f"    ' task_id=', OLD.task_id, ' map_index=', OLD.map_index, ' run_id=', OLD.run_id), {MESSAGE_LIMIT});\n"
        f"SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = {MESSAGE_VARIABLE};"
    )
    # MariaDB re-prepares the whole expression of an IF each time the IF runs, short-circuit or
    # not, so a row costs the size of the tests it meets: the one every row meets comes first
    # and is the smallest, and each later test stands alone (the whole rule in one IF cost the
    # rows that are not skips 2.3x the instructions of the same tests nested: benchmarks/NOTES.md).
    # With rules for several new states, every row meets one IN test first; the rows being set
    # to one of them then meet that state's test and its rules.
    rules = enforced_rules("mysql", policy, columns)
    targets = list(dict.fromkeys(rule.new_state for rule, _, _ in rules))

    def act(rule, action: str) -> str:
        if action == RAISE:
            return refuse
        recorded = _record(q, rule.name, action)
        return recorded if action == AUDIT else f"{recorded}\n{keep(rule)}"

    def rules_for(target: str) -> str:
        return "\n".join(
            _nested([f"{old_state} IN ({q.in_list(olds)})", _signature_test(rule.signature)], _bypassable(act(rule, action)), 0)
            for rule, olds, action in rules if rule.new_state == target
        )

    if len(targets) == 1:
        guard = _nested([f"{new_state} = {q.literal(targets[0])}"], rules_for(targets[0]), 1)
    else:
        per_target = "\n".join(_nested([f"{new_state} = {q.literal(t)}"], rules_for(t), 0) for t in targets)
        guard = _nested([f"{new_state} IN ({q.in_list(targets)})"], per_target, 1)
    body = f"BEGIN\n{guard}\nEND"
    tail = f"BEFORE UPDATE ON {q.table} FOR EACH ROW\n{body}"
    name = f"ti_guard_guard_{short_hash(tail)}"
    return [
        GuardObject(
            kind="trigger",
            name=name,
            create=f"CREATE TRIGGER {q.qualified(name)} {tail}",
            drop=f"DROP TRIGGER IF EXISTS {q.qualified(name)}",
            definition=body,
            compound=True,
        )
    ]


def _record(q: Quoter, rule: str, action: str) -> str:
    """Write the refusal to the record (record.py). UUID_SHORT() is the server's own counter: it
    numbers refusals without a lock, and its value modulo the ring's size names the slot. The
    handler keeps a failed record from failing Airflow's write."""
    values = f"{q.literal(rule)}, {q.literal(action)}"
    return (
        "BEGIN\n"
        "    DECLARE CONTINUE HANDLER FOR SQLEXCEPTION BEGIN END;\n"
        "    SET @ti_guard_seq = UUID_SHORT();\n"
        f"    UPDATE {q.qualified(RECORD_TABLE)} SET seq = @ti_guard_seq, refused_at = UTC_TIMESTAMP(6), rule = {q.literal(rule)},\n"
        f"        action = {q.literal(action)}, old_state = OLD.state, new_state = NEW.state, dag_id = OLD.dag_id, task_id = OLD.task_id,\n"
        "        run_id = OLD.run_id, map_index = OLD.map_index, writer_user = USER(), writer_pid = CONNECTION_ID()\n"
        f"    WHERE slot = @ti_guard_seq MOD {RECORD_ROWS};\n"
        f"    INSERT INTO {q.qualified(COUNTS_TABLE)} (day, rule, action, old_state, new_state, connection_id, bucket, refusals)\n"
        f"    VALUES (UTC_DATE(), {values}, OLD.state, NEW.state, CONNECTION_ID(), @ti_guard_seq MOD {COUNT_BUCKETS}, 1)\n"
        "    ON DUPLICATE KEY UPDATE refusals = refusals + 1;\n"
        "END;"
    )


def _bypassable(action: str) -> str:
    """The action, unless this statement runs under a verified bypass (module docstring)."""
    return (
        f"IF {BYPASS_VARIABLE} IS NOT NULL AND NOT (@ti_guard_bypass_at <=> {_VERIFIED}) THEN\n"
        f"    DO SLEEP({INNODB_TRX_CACHE_SECONDS});\n"
        f"    IF {BYPASS_VARIABLE} <=> ({CURRENT_TRX_ID}) THEN\n"
        f"        SET @ti_guard_bypass_at = {_VERIFIED};\n"
        "    END IF;\n"
        "END IF;\n"
        f"IF {BYPASS_VARIABLE} IS NULL OR NOT (@ti_guard_bypass_at <=> {_VERIFIED}) THEN\n"
        + "\n".join("    " + line for line in action.splitlines())
        + "\nEND IF;"
    )
