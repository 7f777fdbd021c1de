"""Whether a MySQL server lets the guard read the client's statement (render/mysql.py, `_signal`).

set_state_skip on Airflow 3 tables is told on MySQL by the column list of the statement that fired
the trigger, read from performance_schema. Where the server does not record it, the rule lets the
write through, as before (docs/policy.md, "What MySQL can see of a statement"); `status` and
`doctor` name the first thing missing and its fix, in one line.
"""

from __future__ import annotations

import sqlalchemy as sa

from .policy import ENDS_WITHOUT_NEXT_METHOD
from .render.mysql import SIGNAL_STATEMENT

# The consumer hierarchy events_statements_current records under, outermost first.
CONSUMERS = ("global_instrumentation", "thread_instrumentation", "events_statements_current")
INSTRUMENT = "statement/sql/update"
TABLES = ("performance_schema.events_statements_current", "performance_schema.threads")
LOST = "set_state_skip lets TaskInstance.set_state's skip of a running task through on this server (it cannot see the statement's columns)"


def uses_signal(rules) -> bool:
    """Whether the enforced rules (render.enforced_rules) include the one that reads the statement."""
    return any(rule.signature == ENDS_WITHOUT_NEXT_METHOD for rule, _, _ in rules)


def gap(conn: sa.Connection, account: str | None = None) -> str | None:
    """One line naming why the statement cannot be read, with the fix; None when it can. `account`:
    the trigger's DEFINER, whose SELECT is probed when it is the connection's own account (None: the
    connection's account, the DEFINER that install would make). The probe is this connection's own
    statement, read as the trigger reads the writer's."""
    if not conn.exec_driver_sql("SELECT @@performance_schema").scalar():
        return f"performance_schema is OFF (MariaDB's default): {LOST}; fix: performance_schema=ON in the server's option file, then restart it"
    me = conn.exec_driver_sql("SELECT CURRENT_USER()").scalar()
    try:
        own = conn.exec_driver_sql(f"SELECT COUNT(*) FROM ({SIGNAL_STATEMENT}) AS own").scalar()
    except sa.exc.DBAPIError:
        if account is None or _same_account(account, me):
            grants = "; ".join(f"GRANT SELECT ON {t} TO {_quoted(me)}" for t in TABLES)
            return f"the trigger's DEFINER {me} cannot read {' and '.join(TABLES)}: {LOST}; fix: {grants} (no reinstall needed)"
        own = None  # another account's trigger: this one may lack what its DEFINER has
    if own:
        return None
    try:
        off = [
            name
            for (name,) in conn.execute(
                sa.text("SELECT NAME FROM performance_schema.setup_consumers WHERE NAME IN :names AND ENABLED <> 'YES'").bindparams(
                    sa.bindparam("names", expanding=True)
                ),
                {"names": list(CONSUMERS)},
            )
        ]
        instrument = conn.execute(
            sa.text("SELECT ENABLED FROM performance_schema.setup_instruments WHERE NAME = :n"), {"n": INSTRUMENT}
        ).scalar()
        actors = conn.exec_driver_sql("SELECT COUNT(*) FROM performance_schema.setup_actors WHERE ENABLED = 'YES'").scalar()
    except sa.exc.DBAPIError:
        off, instrument, actors = None, None, None
    if off:
        names = ", ".join(f"'{n}'" for n in sorted(off, key=CONSUMERS.index))
        options = " ".join(f"performance-schema-consumer-{n.replace('_', '-')}=ON" for n in sorted(off, key=CONSUMERS.index))
        return (f"performance_schema consumer(s) {names} disabled (MariaDB's default): {LOST}; fix: UPDATE performance_schema.setup_consumers "
                f"SET ENABLED='YES' WHERE NAME IN ({names}), and {options} in the option file")
    if instrument == "NO":
        return f"performance_schema instrument {INSTRUMENT} disabled: {LOST}; fix: UPDATE performance_schema.setup_instruments SET ENABLED='YES' WHERE NAME='{INSTRUMENT}'"
    if actors == 0:
        return f"performance_schema.setup_actors instruments no account's threads: {LOST}; fix: UPDATE performance_schema.setup_actors SET ENABLED='YES' for Airflow's account"
    if own is None:
        return (f"cannot tell whether set_state_skip sees the statement's columns: this account cannot read {' and '.join(TABLES)}; "
                f"run status as the trigger's DEFINER {account}")
    return (f"performance_schema does not record this connection's statement (setup_actors, or a thread set INSTRUMENTED='NO'; "
            f"performance_schema.setup_* unreadable here): {LOST} for such threads; fix: check performance_schema.setup_actors and threads.INSTRUMENTED")


def _same_account(definer: str, current: str) -> bool:
    # information_schema.TRIGGERS shows a DEFINER as name@host, CURRENT_USER() the same way.
    return definer.replace("`", "").replace("'", "") == current


def _quoted(account: str) -> str:
    user, host = account.rsplit("@", 1)
    return f"'{user}'@'{host}'"
