"""`ti-guard doctor`: what a DBA checks before rolling the guard out, read from the server itself.

Read-only: every probe is a SELECT or SHOW, run in a transaction that is rolled back. Exit
codes as `status`: 0 ready, 1 ready with warnings, 2 install would fail or harm, 3 unknown.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sqlite3
from dataclasses import dataclass

import sqlalchemy as sa

from . import catalog, installation, statement_signal
from .db import effective_lock_timeout
from .errors import BINLOG_ADVICE, GuardError, explain
from .policy import VERSION_TABLE, Policy
from .render import dialect_name, enforced_rules, require_columns
from .status import CRITICAL, OK, UNKNOWN, UNSAFE_SEARCH_PATH, WARNING, Report, dropped_columns

TAGS = {OK: "[ok]  ", WARNING: "[warn]", CRITICAL: "[FAIL]", UNKNOWN: "[??]  "}
WORDS = {OK: "ready", WARNING: "ready, with warnings", CRITICAL: "not ready", UNKNOWN: "unknown"}
AIRFLOW_VERSION_TABLE = "alembic_version"
# PostgreSQL: CREATE/DROP TRIGGER take SHARE ROW EXCLUSIVE, which waits for these modes
# (writers hold ROW EXCLUSIVE, VACUUM holds SHARE UPDATE EXCLUSIVE); readers do not block it.
PG_CONFLICTING = (
    "RowExclusiveLock",
    "ShareUpdateExclusiveLock",
    "ShareLock",
    "ShareRowExclusiveLock",
    "ExclusiveLock",
    "AccessExclusiveLock",
)


class Checkup(Report):
    def say(self, level: int, topic: str, text: str) -> None:
        """Every doctor finding goes through here: {check: topic, level, message: text} in JSON."""
        self.add(level, topic, text)

    def line(self, finding) -> str:
        return f"{TAGS[finding.level]} {finding.check}: {finding.message}"

    @property
    def word(self) -> str:
        return WORDS[self.code]


@dataclass
class Probe:
    conn: sa.Connection
    settings: object
    policy: Policy
    report: Checkup
    columns: list[str] | None = None

    @functools.cached_property
    def grants(self) -> catalog.MySQLGrants:
        return catalog.mysql_grants(self.conn, self.policy)

    @functools.cached_property
    def pg_relation(self):
        """(schema, (oid, owner, estimated rows, size) or None) of the table, read once."""
        schema = catalog.pg_schema(self.conn, self.policy)
        row = self.conn.execute(
            sa.text(
                "SELECT c.oid, pg_get_userbyid(c.relowner), c.reltuples::bigint, pg_total_relation_size(c.oid) "
                "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = :s AND c.relname = :t"
            ),
            {"s": schema, "t": self.policy.table},
        ).first()
        return schema, row


def diagnose(conn: sa.Connection, settings, policy: Policy, head: str) -> Checkup:
    """Every check in turn; one that cannot run (a privilege, a missing view) says so and the rest still run."""
    probe = Probe(conn, settings, policy, Checkup(policy=policy))
    try:
        probe.columns = catalog.table_columns(conn, policy)
    except GuardError as exc:
        table_error = exc
    else:
        table_error = None
    checks = {
        "postgresql": [_pg_server, _pg_table, _pg_privileges, _pg_security, _pg_lock_risk],
        "mysql": [_mysql_server, _mysql_privileges, _mysql_binlog, _mysql_definers, _mysql_signal, _mysql_table, _mysql_lock_risk],
        "sqlite": [_sqlite],
    }[dialect_name(conn.dialect.name)]
    if table_error:
        # The true reason first: what follows about privileges or locks is about a table that is not there.
        probe.report.say(CRITICAL, "airflow", str(table_error))
    for check in checks:
        _run(probe, check)
    if not table_error:
        _run(probe, _airflow)
        _run(probe, lambda p: _plan(p, head))
    return probe.report


def _run(probe: Probe, check) -> None:
    # On PostgreSQL a failed statement aborts the transaction: a savepoint keeps it for the next
    # check. MySQL needs none (and refuses SAVEPOINT once mysql.user, not InnoDB, was read).
    nested = probe.conn.begin_nested() if dialect_name(probe.conn.dialect.name) == "postgresql" else contextlib.nullcontext()
    try:
        with nested:
            check(probe)
    except sa.exc.DBAPIError as exc:
        probe.report.say(WARNING, "cannot check", str(explain(exc, probe.policy.table)))


def _airflow(p: Probe) -> None:
    where = f"schema {p.policy.schema!r}" if p.policy.db_schema else "the default schema"
    p.report.say(OK, "airflow", f"{p.policy.table} in {where} with {len(p.columns)} columns, including the 7 the guard reads")
    version = catalog.revision(p.conn, AIRFLOW_VERSION_TABLE, p.policy.db_schema)
    if version:
        p.report.say(OK, "airflow", f"Airflow's alembic_version is {version} (ti-guard never writes it)")
    else:
        p.report.say(WARNING, "airflow", f"no Airflow alembic_version next to {p.policy.table}: check that the URL and schema are Airflow's metadata database")


def _plan(p: Probe, head: str) -> None:
    for obj, gone in dropped_columns(catalog.read(p.conn, p.policy), p.columns):
        p.report.say(CRITICAL, "guard", f"the guard is broken: {obj.kind} {obj.name} names column(s) {', '.join(gone)} that {p.policy.table} no longer has (the writes that reach them fail, or it guards nothing); install replaces it")
    try:
        require_columns(dialect_name(p.conn.dialect.name), p.policy, p.columns)
    except GuardError as exc:
        p.report.say(CRITICAL, "table", f"install would refuse: {exc}")
        return
    steps, _ = installation.plan(p.conn, p.policy)
    version = catalog.revision(p.conn, VERSION_TABLE, p.policy.db_schema)
    actions = [step.describe(future=True) for step in steps]
    if version != head:
        actions.insert(0, f"run migration {head} (version table {VERSION_TABLE}: {version or 'absent'})")
    if catalog.read_settings(p.conn, p.policy) is None:
        actions.append("record the settings in ti_guard_settings")
    what = "; ".join(actions) if actions else "do nothing: the guard is installed and current"
    p.report.say(OK, "install would", f"{what} [{p.policy.describe()}]")


def _scalar(p: Probe, sql: str, **params):
    return p.conn.execute(sa.text(sql), params).scalar()


def _first(p: Probe, sql: str, **params):
    return p.conn.execute(sa.text(sql), params).first()


def _needs(p: Probe, have: dict[str, bool], what: str) -> None:
    missing = [name for name, ok in have.items() if not ok]
    if missing:
        p.report.say(CRITICAL, "privileges", f"missing {', '.join(missing)}: {what}")
    else:
        p.report.say(OK, "privileges", "has " + ", ".join(have))


def _lock_verdict(p: Probe, holders, long_queries: int, what: str) -> None:
    timeout = effective_lock_timeout(dialect_name(p.conn.dialect.name), p.settings.lock_timeout)
    budget = f"lock timeout {timeout:g}s x {p.settings.lock_retries} attempts"
    if not holders:
        p.report.say(OK, "lock risk", f"no session {what} right now; {long_queries} statement(s) running longer than {p.settings.lock_timeout:g}s ({budget})")
        return
    ages = [age for _pid, age in holders if age is not None]
    oldest = f"oldest open {max(ages):.0f}s" if ages else "ages hidden: grant pg_read_all_stats / PROCESS to see them"
    sessions = ", ".join(str(pid) for pid, _ in holders[:5])
    level = WARNING if not ages or max(ages) > timeout else OK
    p.report.say(level, "lock risk", f"{len(holders)} session(s) {what} (ids {sessions}; {oldest}); install waits at most {budget}, then gives up and changes nothing")


# --- PostgreSQL -----------------------------------------------------------------------


def _pg_server(p: Probe) -> None:
    version = _scalar(p, "SHOW server_version")
    user, superuser = _first(p, "SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user")
    p.report.say(OK, "server", f"PostgreSQL {version}, user {user}{' (superuser)' if superuser else ''}")
    if _scalar(p, "SELECT pg_is_in_recovery()") or _scalar(p, "SHOW transaction_read_only") == "on":
        p.report.say(CRITICAL, "server", "the connection is read-only (a replica, or default_transaction_read_only): connect to the primary")


def _pg_table(p: Probe) -> None:
    _schema, row = p.pg_relation
    if row:
        p.report.say(OK, "table", f"{_rows(row[2])} (planner estimate), {_size(row[3])} with indexes")


def _pg_privileges(p: Probe) -> None:
    schema, row = p.pg_relation
    # No table: the airflow finding says so; TRIGGER on it cannot be missing yet.
    have = {f"TRIGGER on {p.policy.table}": _scalar(p, "SELECT has_table_privilege(:oid, 'TRIGGER')", oid=row[0])} if row else {}
    have[f"CREATE on schema {schema!r}"] = _scalar(p, "SELECT has_schema_privilege(:s, 'CREATE')", s=schema)
    _needs(p, have, f"install needs both (the function and its own tables go in the schema); run as the owner of {p.policy.table}")
    if row and not _scalar(p, "SELECT pg_has_role(:owner, 'USAGE')", owner=row[1]):
        p.report.say(WARNING, "privileges", f"not the owner of {p.policy.table} ({row[1]}): install can create the guard but not replace or remove it (DROP TRIGGER needs the owner)")


def _pg_security(p: Probe) -> None:
    """The rights of what install makes (SECURITY.md), read from the catalog: the guard function's
    SECURITY mode, pinned search_path and EXECUTE grants, and where the record is."""
    schema, _row = p.pg_relation
    functions = p.conn.execute(
        sa.text(
            "SELECT p.proname, p.prosecdef, array_to_string(p.proconfig, ', '), has_function_privilege('public', p.oid, 'EXECUTE'), "
            "pg_get_userbyid(p.proowner), p.prosrc FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname = :s AND p.proname LIKE 'ti\\_guard\\_%'"
        ),
        {"s": schema},
    ).all()
    if not functions:
        p.report.say(OK, "rights", f"install makes one SECURITY DEFINER function in schema {schema!r}, owned by this user, "
                     "search_path pinned to pg_catalog, pg_temp, EXECUTE revoked from PUBLIC; it acts on this table only and writes only the record (SECURITY.md)")
    for name, definer, config, public, owner, body in functions:
        pinned = config == "search_path=pg_catalog, pg_temp" and UNSAFE_SEARCH_PATH not in body
        what = f"function {name}: {'SECURITY DEFINER' if definer else 'SECURITY INVOKER'} owned by {owner}, {config or 'no pinned search_path'}, EXECUTE {'granted to PUBLIC' if public else 'not granted to PUBLIC'}"
        if definer and public and not pinned:
            p.report.say(CRITICAL, "rights", f"{what}: any role that can connect can run its own code as {owner} (ti-guard 0.4.0, SECURITY.md); run ti-guard install now")
        elif public or not pinned:
            p.report.say(WARNING, "rights", f"{what}: run ti-guard install to restore its rights")
        else:
            p.report.say(OK, "rights", what)
    record = p.conn.execute(
        sa.text("SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relname LIKE 'ti\\_guard\\_refusal%' AND n.nspname NOT LIKE 'pg\\_temp%'")
    ).all()
    elsewhere = sorted({f"{s}.{r}" for s, r in record if s != schema})
    if elsewhere:
        p.report.say(WARNING, "rights", f"record objects outside schema {schema!r} ({', '.join(elsewhere)}): the guard writes only the record in its table's schema; drop these or install with --schema")


def _pg_lock_risk(p: Probe) -> None:
    _schema, row = p.pg_relation
    if not row:
        return
    holders = p.conn.execute(
        sa.text(
            "SELECT l.pid, EXTRACT(EPOCH FROM now() - a.xact_start) "
            "FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'relation' AND l.relation = :oid AND l.pid <> pg_backend_pid() AND l.mode IN :modes"
        ).bindparams(sa.bindparam("modes", expanding=True)),
        {"oid": row[0], "modes": list(PG_CONFLICTING)},
    ).all()
    long_queries = _scalar(
        p,
        "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND state <> 'idle' "
        "AND now() - query_start > make_interval(secs => :t)",
        t=p.settings.lock_timeout,
    )
    by_session = {pid: age for pid, age in holders}  # a session can hold several modes
    _lock_verdict(p, list(by_session.items()), long_queries, "holding a lock on the table that CREATE TRIGGER waits for")


# --- MySQL / MariaDB -------------------------------------------------------------------


def mysql_server_name(version: str, comment: str) -> str:
    """'MariaDB 10.11.6 (10.11.6-MariaDB-0+deb12u1, Debian 12)', 'MySQL 9.7.4 (9.7.4-2, Debian)'.

    MariaDB names itself in VERSION(); MySQL does not, and its version comment comes in
    parentheses of its own ('(Debian)')."""
    product = "MariaDB" if "mariadb" in version.lower() else "MySQL"
    number = re.match(r"\d+(?:\.\d+)*", version)
    details = ", ".join(x for x in (version, (comment or "").strip().strip("()")) if x)
    return f"{product} {number.group(0) if number else version} ({details})"


def _mysql_server(p: Probe) -> None:
    version, comment, read_only = _first(p, "SELECT VERSION(), @@version_comment, @@read_only")
    grants = p.grants
    p.report.say(OK, "server", f"{mysql_server_name(version, comment)}, user {grants.account}")
    if read_only and "SUPER" not in grants.server:
        p.report.say(CRITICAL, "server", "the server is read_only: connect to the primary")


def _mysql_privileges(p: Probe) -> None:
    grants = p.grants
    database = p.policy.schema or _scalar(p, "SELECT DATABASE()")
    have = {f"TRIGGER on {p.policy.table}": "TRIGGER" in grants.table}
    have.update({f"{priv} on {database}": priv in grants.database for priv in ("CREATE", "DROP", "INSERT", "UPDATE", "DELETE", "SELECT")})
    _needs(p, have, "install needs TRIGGER on the table and these on the database for its own tables (settings, version, the record of refusals; privileges held through roles are not counted)")


def _mysql_binlog(p: Probe) -> None:
    grants = p.grants
    log_bin, trust, fmt = _first(p, "SELECT @@log_bin, @@log_bin_trust_function_creators, @@binlog_format")
    if log_bin and not trust and "SUPER" not in grants.server:
        p.report.say(CRITICAL, "binary log", f"on ({fmt}), log_bin_trust_function_creators=0 and no SUPER: CREATE TRIGGER fails (error 1419); {BINLOG_ADVICE}")
    else:
        p.report.say(OK, "binary log", f"{'on (' + fmt + ')' if log_bin else 'off'}, log_bin_trust_function_creators={trust}")


def _mysql_definers(p: Probe) -> None:
    grants = p.grants
    p.report.say(
        OK, "definer",
        f"the guard's trigger will run as its DEFINER {grants.account}; it reads the writer's TRIGGER grant from INFORMATION_SCHEMA "
        "(for the bypass) and writes only the record (SECURITY.md)",
    )
    if p.columns is None:
        return
    triggers = [
        catalog.Installed("trigger", name, "", True, definer)
        for name, definer in p.conn.execute(
            sa.text("SELECT TRIGGER_NAME, DEFINER FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = COALESCE(:db, DATABASE()) AND EVENT_OBJECT_TABLE = :t"),
            {"db": p.policy.schema, "t": p.policy.table},
        )
    ]
    dead = catalog.missing_definers(p.conn, triggers)
    if dead is None:
        p.report.say(WARNING, "definer", "cannot read mysql.user to check the DEFINER of the triggers on the table")
    for name, definer in dead or ():
        p.report.say(CRITICAL, "definer", f"trigger {name} has DEFINER {definer}, an account that no longer exists: every UPDATE on {p.policy.table} fails (error 1449); recreate the account or the trigger (ti-guard install does it for its own)")
    if triggers and not dead:
        p.report.say(OK, "definer", "existing triggers: " + "; ".join(f"{t.name} by {t.definer}" for t in triggers))


def _mysql_signal(p: Probe) -> None:
    if p.columns is None or not statement_signal.uses_signal(enforced_rules("mysql", p.policy, p.columns)):
        return
    gap = statement_signal.gap(p.conn)
    p.report.say(OK, "statement", gap or "performance_schema records the client's statement: set_state_skip tells TaskInstance.set_state from a task's own finish by its columns (next_method), as on PostgreSQL")


def _mysql_table(p: Probe) -> None:
    row = _first(
        p,
        "SELECT ENGINE, TABLE_ROWS, DATA_LENGTH + INDEX_LENGTH FROM information_schema.TABLES WHERE TABLE_SCHEMA = COALESCE(:db, DATABASE()) AND TABLE_NAME = :t",
        db=p.policy.schema,
        t=p.policy.table,
    )
    if row:
        engine, rows, size = row
        p.report.say(OK if engine == "InnoDB" else WARNING, "table", f"{engine}, {_rows(rows)} (estimate), {_size(size)} with indexes")


def _mysql_lock_risk(p: Probe) -> None:
    # Not a warning by itself (doctor cannot tell Airflow's sessions from others), but the one rule a
    # MySQL rollout must keep, measured: docs/policy.md "Which mode", docs/rollout.md.
    p.report.say(OK, "rollout", "on MySQL and MariaDB stop Airflow's schedulers for install, a mode switch and uninstall (workers, API "
                 "server and triggerer may run): CREATE/DROP TRIGGER upgrade a metadata lock on the table that can deadlock the "
                 "scheduler's critical section, and MySQL then ends the scheduler (error 1213, seen on MySQL 9.7)")
    if "PROCESS" not in p.grants.server:
        p.report.say(WARNING, "lock risk", "cannot see other sessions without PROCESS: unknown")
        return
    # InnoDB does not say which tables a transaction touched: count every open transaction of a
    # session using this database, since any of them may hold the metadata lock CREATE TRIGGER needs.
    holders = p.conn.execute(
        sa.text(
            "SELECT t.trx_mysql_thread_id, TIMESTAMPDIFF(SECOND, t.trx_started, NOW()) FROM information_schema.INNODB_TRX t "
            "JOIN information_schema.PROCESSLIST s ON s.ID = t.trx_mysql_thread_id "
            "WHERE t.trx_mysql_thread_id <> CONNECTION_ID() AND s.DB = COALESCE(:db, DATABASE()) ORDER BY t.trx_started"
        ),
        {"db": p.policy.schema},
    ).all()
    long_queries = _scalar(
        p,
        "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID <> CONNECTION_ID() AND COMMAND NOT IN ('Sleep', 'Daemon', 'Binlog Dump') AND TIME > :t",
        t=p.settings.lock_timeout,
    )
    _lock_verdict(p, [(pid, float(age)) for pid, age in holders], long_queries, "of this database with a transaction open (any may hold the table's metadata lock)")


# --- SQLite ----------------------------------------------------------------------------


def _sqlite(p: Probe) -> None:
    path = p.conn.engine.url.database
    p.report.say(OK, "server", f"SQLite {sqlite3.sqlite_version}, file {path}")
    if path and path != ":memory:" and not os.access(os.path.dirname(os.path.abspath(path)), os.W_OK):
        p.report.say(CRITICAL, "privileges", f"the directory of {path} is not writable: SQLite needs it for its journal; run as the owner of the file")
    elif path and os.path.exists(path) and not os.access(path, os.W_OK):
        p.report.say(CRITICAL, "privileges", f"{path} is not writable: run as the owner of the file")
    else:
        p.report.say(OK, "privileges", "the database file and its directory are writable")
    if p.columns is not None:
        rows = _scalar(p, f"SELECT COUNT(*) FROM {p.conn.dialect.identifier_preparer.quote(p.policy.table)}")
        size = os.path.getsize(path) if path and os.path.exists(path) else 0
        p.report.say(OK, "table", f"{_rows(rows)}, database file {_size(size)}")
    p.report.say(OK, "lock risk", "one writer at a time: install holds the write lock for milliseconds")
    p.report.say(OK, "airflow", "note: Airflow's batch migrations re-create task_instance on SQLite and drop its triggers: run ti-guard status after every airflow db migrate")


def _rows(n) -> str:
    # PostgreSQL says -1 for a table never analyzed.
    return f"{int(n or 0):,} rows" if (n or 0) >= 0 else "row count unknown (never analyzed)"


def _size(n) -> str:
    n = float(n or 0)
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
