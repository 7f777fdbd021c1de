"""The guard on MySQL 8.0+ (tested on MariaDB 10.11): one BEFORE UPDATE trigger.

Only syntax both servers accept: no CREATE OR REPLACE TRIGGER, no IF NOT EXISTS on
triggers. MySQL has neither WHEN nor a column list, so the trigger body fires for every
row of every UPDATE. A row that is not being set to skipped meets one small byte comparison
and leaves; what that costs against an empty trigger is counted in benchmarks/NOTES.md.

A trigger sees values, not which columns a statement wrote. The racy skip writer stamps
start_date and end_date with one `now`, so a skip whose end_date equals its start_date is
not the attempt finishing itself even when a coarse clock puts that `now` on the very tick
the task started. set_state_skip on Airflow 3 tables needs the column list: for the few rows
whose values match it, the trigger reads the client's statement from performance_schema
(`_signal`; docs/policy.md, "What MySQL can see of a statement"), and lets the row through
where the server does not record it.

The bypass counts for a session that asks for it (@ti_guard_bypass = 'on') and whose account
holds TRIGGER on the table (it could drop the guard anyway): granted globally, on the database or
on the table, to the account itself (a grant through a role is not seen), read from
INFORMATION_SCHEMA as the trigger's DEFINER. The variable alone lifts nothing, and the grant is
read only for a row the guard would otherwise refuse.

Every table the trigger names resolves first to a TEMPORARY table of the writing session's, if
it made one of that name (SECURITY.md): the record can then miss that session's refusals, but no
decision of the guard reads a table a session can shadow (INFORMATION_SCHEMA cannot be).
"""

from __future__ import annotations

from sqlalchemy.dialects import mysql

from ..errors import GuardError
from ..policy import (
    AUDIT,
    BUMPS_TRY_NUMBER,
    COUNT_BUCKETS,
    COUNTS_TABLE,
    ENDS_IN_ONE_STATEMENT,
    ENDS_WITHOUT_NEXT_METHOD,
    LANES,
    RAISE,
    RECORD_ROWS,
    RECORD_TABLE,
    STAMPS_START,
    STAMPS_START_AND_DURATION,
    Policy,
    short_hash,
)
from . import GuardObject, Quoter, duration_test, enforced_rules

BYPASS_VARIABLE = "@ti_guard_bypass"
# The writing account (USER(): name@client host) against a grantee ('name'@'host pattern'). The
# quote is CHAR(39): MySQL 9 shows a trigger's body with doubled quotes undoubled, so the guard
# could no longer recognise itself.
_UNQUOTED = "REPLACE(GRANTEE, CHAR(39 USING ascii), '')"
_GRANTEE_IS_WRITER = (
    f"SUBSTRING_INDEX({_UNQUOTED}, '@', 1) = SUBSTRING_INDEX(USER(), '@', 1)"
    f" AND SUBSTRING_INDEX(USER(), '@', -1) LIKE SUBSTRING_INDEX({_UNQUOTED}, '@', -1)"
)
MESSAGE_VARIABLE = "@ti_guard_refusal"
# MySQL caps MESSAGE_TEXT at 128 characters; run_id goes last because it is the longest.
MESSAGE_LIMIT = 128
# set_state_skip on Airflow 3 tables: set_state and a task's own finish write the same values, so
# the values only select the rows worth a look at the client's statement (SIGNAL_* below), whose
# column list tells them apart as PostgreSQL's `UPDATE OF next_method` does. On Airflow 2 tables
# it is by value: set_state sets end_date with the skip, a 2.x task that skips itself writes the
# state alone (end_date unchanged) and end_date a commit later.
SEES = frozenset({STAMPS_START, STAMPS_START_AND_DURATION, BUMPS_TRY_NUMBER, ENDS_IN_ONE_STATEMENT, ENDS_WITHOUT_NEXT_METHOD})


# The client's statement that fired the trigger: its thread's level-0 statement event, still running
# (a thread no longer instrumented keeps its last statement there, ended). The thread is
# found through performance_schema.threads, not PS_CURRENT_THREAD_ID(): MariaDB has no such
# function and would call a stored function of that name in the table's database, code anyone with
# CREATE ROUTINE there could put in place to run with the trigger's DEFINER's rights.
SIGNAL_STATEMENT = (
    "SELECT e.SQL_TEXT FROM performance_schema.events_statements_current e"
    " JOIN performance_schema.threads t ON t.THREAD_ID = e.THREAD_ID"
    " WHERE t.PROCESSLIST_ID = CONNECTION_ID() AND e.NESTING_EVENT_LEVEL = 0 AND e.END_EVENT_ID IS NULL"
)
# A column of these named in the SET list: not set_state's write. next_method: a task's own finish
# through the execution API (PostgreSQL's companion `UPDATE OF next_method` trigger); start_date:
# the racy skip routes (racy_skip's, audited or kept by it already), which set_state never writes
# on a started row.
SIGNAL_COLUMNS = ("next_method", "start_date")
# Characters of an unquoted MySQL identifier, ASCII ones: what may not touch a keyword or a column
# name. Oracle MySQL's ICU builds a POSIX class such as [:alnum:], or a range past ASCII under (?i),
# from Unicode properties each time the trigger runs (4.5 and 0.8 ms a statement against 0.3 ms,
# measured); a SET list holding any character past ASCII is no signal instead (CHAR_LENGTH <> LENGTH).
_WORD = "A-Za-z0-9_$"
# A quoted identifier `next_method` (or "next_method" under ANSI_QUOTES) becomes the bare name, so
# that stripping quoted tokens next cannot hide it (one pattern per column: MySQL and MariaDB write
# back-references differently).
SIGNAL_QUOTED_NAME = "(?i)[`\"]{}[`\"]"
# String literals and quoted identifiers, leftmost first, so that a value never reads as SQL and a
# quote inside a value never ends it. Backslash escapes are not modelled (their meaning depends on
# the client's NO_BACKSLASH_ESCAPES): a statement holding a backslash is no signal.
SIGNAL_QUOTED = "'[^']*'|\"[^\"]*\"|`[^`]*`"
# Left in the SET list after stripping: an unterminated quote (a text cut inside a value at
# performance_schema_max_sql_text_length, and the WHERE found after it is no keyword) or a comment
# (possibly executable, /*! ... */): no signal. What follows the first WHERE cannot change the SET
# list: quoted tokens are found from the left, so a text cut after it still tells.
SIGNAL_UNSURE = "['\"`#]|/[*]|--"
# The statement up to the end of its SET list: an UPDATE (not a CALL, not INSERT ... ON DUPLICATE
# KEY UPDATE), its first SET keyword and its first WHERE keyword. A text cut before its WHERE has no
# end of SET list: no signal.
SIGNAL_SET_LIST = f"(?is)^[^{_WORD}]*UPDATE[^{_WORD}].*?[^{_WORD}]SET[^{_WORD}].*?[^{_WORD}]WHERE[^{_WORD}]"
# One of them named as a column, bare or qualified (task_instance.next_method, ti . next_method).
SIGNAL_NAMES = f"(?i)(^|[^{_WORD}])({'|'.join(SIGNAL_COLUMNS)})([^{_WORD}]|$)"


def _signal(q: Quoter, action: str) -> str:
    """The action, when the client's statement provably names neither SIGNAL_COLUMNS in its SET
    list (TaskInstance.set_state's shape: state, end_date, duration, updated_at): a statement it
    cannot read or not parse surely (performance_schema off, consumer or thread not instrumented, the
    definer without SELECT on the two tables, a CALL, a cut text, a backslash, a comment, a SET list
    whose parentheses do not pair, as with a WHERE of a subquery) leaves the row to go through, as
    it went before; an error reading it does the same (the EXIT handler)."""
    s = "@ti_guard_statement"
    bare = s
    for column in SIGNAL_COLUMNS:
        bare = f"REGEXP_REPLACE({bare}, {_text(q, SIGNAL_QUOTED_NAME.format(column))}, {q.literal(column)})"
    return (
        "SET @ti_guard_set_state = FALSE;\n"
        "BEGIN\n"
        "    DECLARE EXIT HANDLER FOR SQLEXCEPTION SET @ti_guard_set_state = FALSE;\n"
        f"    SET {s} = ({SIGNAL_STATEMENT});\n"
        # NULL (nothing recorded) skips the rest; so does a backslash (SIGNAL_QUOTED).
        f"    IF LOCATE(CHAR(92 USING ascii), {s}) = 0 THEN\n"
        f"        SET {s} = REGEXP_SUBSTR(REGEXP_REPLACE({bare}, {_text(q, SIGNAL_QUOTED)}, ' '), {_text(q, SIGNAL_SET_LIST)});\n"
        f"        SET @ti_guard_set_state = CHAR_LENGTH({s}) > 0 AND CHAR_LENGTH({s}) = LENGTH({s}) AND NOT ({s} REGEXP {_text(q, SIGNAL_UNSURE)})\n"
        f"            AND CHAR_LENGTH(REPLACE({s}, '(', '')) = CHAR_LENGTH(REPLACE({s}, ')', ''))\n"
        f"            AND NOT ({s} REGEXP {_text(q, SIGNAL_NAMES)});\n"
        "    END IF;\n"
        "END;\n"
        "IF @ti_guard_set_state THEN\n"
        + "\n".join("    " + line for line in action.splitlines())
        + "\nEND IF;"
    )


def _nested(tests: list[str], action: str, depth: int = 1) -> str:
    """IF a THEN IF b THEN ... action, one test per IF, in the order given."""
    pad = "    " * depth
    if not tests:
        return "\n".join(pad + line for line in action.splitlines())
    return f"{pad}IF {tests[0]} THEN\n{_nested(tests[1:], action, depth + 1)}\n{pad}END IF;"


def _signature_test(signature: str, columns=None) -> str:
    """The value half of a signature: MySQL cannot see which columns a statement wrote."""
    if signature in (STAMPS_START, STAMPS_START_AND_DURATION):
        # The racy routes stamp start_date = end_date = now; on a coarse clock that `now` can
        # equal the old start_date, so an end_date newly set to start_date counts too.
        stamps = ("(NOT (NEW.start_date <=> OLD.start_date)"
                  " OR (NOT (NEW.end_date <=> OLD.end_date) AND NEW.end_date <=> NEW.start_date))")
        duration = duration_test(signature, columns, "{a} <=> {b}")
        return f"{stamps} AND {duration}" if duration else stamps
    if signature == ENDS_IN_ONE_STATEMENT:
        return "NEW.end_date IS NOT NULL AND NOT (NEW.end_date <=> OLD.end_date) AND NEW.start_date <=> OLD.start_date"
    if signature == ENDS_WITHOUT_NEXT_METHOD:
        # The rows set_state and a task's own finish both write; the statement tells them apart (_signal).
        return "NEW.end_date IS NOT NULL AND NEW.start_date <=> OLD.start_date"
    if signature == BUMPS_TRY_NUMBER:
        # schedule_tis adds one to try_number of every row that is not up_for_reschedule.
        return "NOT (NEW.try_number <=> OLD.try_number)"
    raise GuardError(f"MySQL cannot test signature {signature!r}")


def render(policy: Policy, columns=None, schema=None) -> list[GuardObject]:
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
    if not rules:
        return []  # every rule it could enforce here switched off: no trigger, not an empty one
    targets = list(dict.fromkeys(rule.new_state for rule, _, _ in rules))

    def act(rule, action: str) -> str:
        if action == RAISE:
            return refuse
        recorded = _record(q, rule.name, action)
        return recorded if action == AUDIT else f"{recorded}\n{keep(rule)}"

    def guarded(rule, action: str) -> str:
        body = _bypassable(q, act(rule, action))
        return _signal(q, body) if rule.signature == ENDS_WITHOUT_NEXT_METHOD else body

    def rules_for(target: str) -> str:
        return "\n".join(
            _nested([f"{old_state} IN ({q.in_list(olds)})", _signature_test(rule.signature, columns)], guarded(rule, action), 0)
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
    numbers refusals without a lock. Both writes go to rows of a lane this session holds alone (a
    named lock, policy.LANES): its counters, and its share of the ring (the slots equal to the lane
    modulo LANES), so no other session ever waits on them. SKIP LOCKED cannot do it here: Oracle
    MySQL 9.7 waits on a locked row inside a trigger all the same (MariaDB skips it). The handlers
    keep a failed record from failing Airflow's write."""
    values = f"{q.literal(rule)}, {q.literal(action)}"
    # MySQL 9 refuses a NULL lock name (error 3057): a session's first refusal asks for lane -1.
    lane = "CONCAT('ti_guard_lane_', COALESCE(@ti_guard_lane, -1))"
    return (
        "BEGIN\n"
        "    DECLARE CONTINUE HANDLER FOR SQLEXCEPTION BEGIN END;\n"
        "    SET @ti_guard_seq = UUID_SHORT();\n"
        f"    IF NOT (IS_USED_LOCK({lane}) <=> CONNECTION_ID()) THEN\n"
        "        SET @ti_guard_lane = 0, @ti_guard_tries = 1;\n"
        f"        WHILE @ti_guard_tries <= {LANES} AND NOT (GET_LOCK({lane}, 0) <=> 1) DO\n"
        f"            SET @ti_guard_lane = IF(@ti_guard_tries = {LANES}, {LANES} + CONNECTION_ID(), (@ti_guard_lane + 1) MOD {LANES}),\n"
        "                @ti_guard_tries = @ti_guard_tries + 1;\n"
        "        END WHILE;\n"
        "    END IF;\n"
        f"    UPDATE {q.qualified(RECORD_TABLE)} SET seq = @ti_guard_seq, refused_at = UTC_TIMESTAMP(6), rule = {q.literal(rule)},\n"
        f"        action = {q.literal(action)}, old_state = OLD.state, new_state = NEW.state, dag_id = OLD.dag_id, task_id = OLD.task_id,\n"
        "        run_id = OLD.run_id, map_index = OLD.map_index, writer_user = USER(), writer_pid = CONNECTION_ID()\n"
        f"    WHERE @ti_guard_lane < {LANES} AND slot = @ti_guard_lane + {LANES} * (@ti_guard_seq MOD {RECORD_ROWS // LANES});\n"
        f"    INSERT INTO {q.qualified(COUNTS_TABLE)} (day, rule, action, old_state, new_state, connection_id, bucket, refusals)\n"
        f"    VALUES (UTC_DATE(), {values}, OLD.state, NEW.state, @ti_guard_lane, @ti_guard_seq MOD {COUNT_BUCKETS}, 1)\n"
        "    ON DUPLICATE KEY UPDATE refusals = refusals + 1;\n"
        "END;"
    )


def _text(q: Quoter, value: str) -> str:
    """A string literal that MySQL 9 shows back as written: one holding a quote or a backslash as
    hex (MySQL 9 shows a trigger's body with its escapes undone, so the guard would not recognise itself)."""
    if "'" in value or "\\" in value:
        return f"CONVERT(X'{value.encode().hex()}' USING utf8mb4)"
    return q.literal(value)


def _bypassable(q: Quoter, action: str) -> str:
    """The action, unless the session asked for the bypass and its account holds TRIGGER on the table."""
    granted = " OR ".join(
        f"EXISTS (SELECT 1 FROM information_schema.{view} WHERE PRIVILEGE_TYPE = 'TRIGGER'{where} AND {_GRANTEE_IS_WRITER})"
        for view, where in (
            ("USER_PRIVILEGES", ""),
            ("SCHEMA_PRIVILEGES", " AND TABLE_SCHEMA = DATABASE()"),
            ("TABLE_PRIVILEGES", f" AND TABLE_SCHEMA = DATABASE() AND TABLE_NAME = {_text(q, q.policy.table)}"),
        )
    )
    return (
        "SET @ti_guard_granted = FALSE;\n"
        f"IF {BYPASS_VARIABLE} <=> 'on' THEN\n"
        f"    SET @ti_guard_granted = {granted};\n"
        "END IF;\n"
        "IF NOT @ti_guard_granted THEN\n"
        + "\n".join("    " + line for line in action.splitlines())
        + "\nEND IF;"
    )
