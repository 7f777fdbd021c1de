"""Compares what is installed with what should be, object by object, in words and Nagios exit codes."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import sqlalchemy as sa

from . import catalog, record, statement_signal
from .installation import definition_id, expected
from .policy import VERSION_TABLE, Policy
from .render import dialect_name, enforced_rules, missing_columns, rules_without

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
# A column of the row a trigger names: NEW.c / OLD.c in its body, or in an `UPDATE OF c` (SQLite's text).
_ROW_COLUMN = re.compile(r"\b(?:NEW\.|OLD\.|UPDATE OF )[`\"]?([A-Za-z_][A-Za-z0-9_]*)")
# 0.4.0's guard function set its search_path from the table it fired on, with EXECUTE left to PUBLIC.
UNSAFE_SEARCH_PATH = "set_config('search_path'"
WORDS = {OK: "installed/current", WARNING: "installed/outdated", CRITICAL: "missing", UNKNOWN: "unknown"}
# A finding's level in JSON: the Nagios name of the exit code it raises the check to.
LEVELS = {OK: "ok", WARNING: "warning", CRITICAL: "critical", UNKNOWN: "unknown"}


@dataclass(frozen=True)
class Finding:
    check: str  # what was looked at: guard (status); server, privileges, airflow, ... (doctor)
    level: int
    message: str

    def as_dict(self) -> dict:
        return {"check": self.check, "level": LEVELS[self.level], "message": self.message}


@dataclass
class Report:
    code: int = OK
    findings: list[Finding] = field(default_factory=list)
    policy: Policy | None = None

    def add(self, level: int, check: str, message: str) -> None:
        """Every finding goes through here: it raises the report's code to its level."""
        self.code = max(self.code, level)
        self.findings.append(Finding(check, level, message))

    def worse(self, code: int, line: str) -> None:
        self.add(code, "guard", line)

    def note(self, line: str) -> None:
        self.add(OK, "guard", line)

    def line(self, finding: Finding) -> str:
        return finding.message

    @property
    def lines(self) -> list[str]:
        return [self.line(f) for f in self.findings]

    @property
    def word(self) -> str:
        return WORDS[self.code]


def check(conn: sa.Connection, policy: Policy, head: str | None) -> Report:
    """What a cron job wants to know: is the guard there, and is it the one that should be."""
    report = Report()
    columns = catalog.table_columns(conn, policy)
    recorded = catalog.read_settings(conn, policy)
    installed = catalog.read(conn, policy)
    if recorded:
        policy = catalog.recorded_policy(conn, policy, recorded)
    report.policy = policy
    if not installed and dialect_name(conn.dialect.name) == "mysql" and "TRIGGER" not in catalog.mysql_grants(conn, policy).table:
        # MySQL lists a table's triggers only to accounts that hold TRIGGER on it.
        report.worse(UNKNOWN, f"{policy.table}'s triggers are hidden from this account: MySQL shows them only with the TRIGGER privilege; run status as the installing account or grant TRIGGER")
        return report
    if not recorded and not installed:
        report.policy = None  # nothing installed: no mode to name
        report.worse(CRITICAL, f"no ti_guard objects on {policy.table}: run ti-guard install (or alembic upgrade head)")
        return report
    if not recorded:
        report.worse(WARNING, "the settings record ti_guard_settings is missing: run ti-guard install")
    objects = expected(conn, policy, columns)
    wanted = {o.name for o in objects}
    stale = [name for name in installed if name not in wanted]
    earlier = _earlier_guard_intact(recorded, installed, objects)
    for obj in objects:
        have = installed.get(obj.name)
        if have is None and earlier:
            # The recorded guard is whole and enabled, only not today's SQL: it still refuses.
            report.worse(WARNING, f"{obj.kind} {obj.name} is not installed yet: the guard in place ({earlier}) was written by another ti-guard release (or for other columns) and still guards: run ti-guard install to replace it")
        elif have is None:
            report.worse(CRITICAL, f"{obj.kind} {obj.name} is missing: {_missing_hint(conn, policy, installed)}")
        elif have.definition != obj.definition:
            report.worse(WARNING, f"{obj.kind} {obj.name} was changed by hand: run ti-guard install to restore it")
        elif not have.enabled:
            report.worse(CRITICAL, f"trigger {obj.name} is disabled: nothing is guarded; run ti-guard install")
        elif have.public_execute:
            report.worse(WARNING, f"function {obj.name} may be executed by PUBLIC (EXECUTE had been granted to PUBLIC): run ti-guard install to revoke it")
    lacking = [rule.name for _, rule in missing_columns(dialect_name(conn.dialect.name), policy, columns)]
    # A column a rule switched on reads cannot come back by reinstalling: that rule has to go.
    repair = f"run ti-guard install {rules_without(policy, lacking)} ({', '.join(lacking)} read it)" if lacking else "run ti-guard install"
    for have, gone in dropped_columns(installed, columns):
        report.worse(CRITICAL, f"the guard is broken: {have.kind} {have.name} names column(s) {', '.join(gone)} that {policy.table} no longer has (the writes that reach them fail, or it guards nothing); {repair}")
    for have in installed.values():
        if have.kind == "function" and have.public_execute and UNSAFE_SEARCH_PATH in have.definition:
            report.worse(CRITICAL, f"function {have.name} (ti-guard 0.4.0) lets any role that can connect run its own code as the function's owner (SECURITY.md): run ti-guard install now")
    for name in stale:
        report.worse(WARNING, f"{installed[name].kind} {name} is not part of the expected guard (left from another definition or setting): run ti-guard install")
    for finding in record.check(conn, policy):
        report.worse(CRITICAL if finding.critical else WARNING, finding.line)
    if dialect_name(conn.dialect.name) == "mysql":
        _check_definers(conn, installed, report)
        if statement_signal.uses_signal(enforced_rules("mysql", policy, columns)):
            definer = next((o.definer for o in installed.values() if o.kind == "trigger" and o.definer), None)
            gap = statement_signal.gap(conn, definer)
            if gap:
                report.note(gap)
    version = catalog.revision(conn, VERSION_TABLE, policy.db_schema)
    if head and version != head:
        report.worse(WARNING, f"migration revision is {version or 'none'}, head is {head}: run ti-guard install (or alembic upgrade head)")
    if report.code == OK:
        report.note(f"{len(objects)} object(s) on {policy.table} match {policy.describe()} (revision {version})")
    return report


def dropped_columns(installed: dict, columns) -> list:
    """(object, [columns]) for each installed object whose body names a column of the row
    (NEW.c / OLD.c) that the table no longer has: MySQL resolves those only when the statement
    that names one runs, so a migration that dropped it breaks just the writes that reach it."""
    have = {c.lower() for c in columns}
    found = []
    for obj in installed.values():
        named = {m.lower() for m in _ROW_COLUMN.findall(obj.definition)}
        if named - have:
            found.append((obj, sorted(named - have)))
    return found


def _earlier_guard_intact(recorded, installed, objects) -> str:
    """The recorded object names, when they are all installed and enabled and are not today's."""
    names = recorded.get("definition", "").split(",") if recorded else []
    whole = names and all(n in installed and installed[n].enabled for n in names)
    return recorded["definition"] if whole and recorded["definition"] != definition_id(objects) else ""


def _missing_hint(conn, policy, installed) -> str:
    if dialect_name(conn.dialect.name) == "sqlite" and not any(o.kind == "trigger" for o in installed.values()):
        return f"Airflow's batch migrations re-create {policy.table} on SQLite and drop its triggers; run ti-guard install"
    return "run ti-guard install"


def _check_definers(conn, installed, report: Report) -> None:
    dead = catalog.missing_definers(conn, installed.values())
    if dead is None:
        report.note("cannot verify the triggers' DEFINER accounts (no SELECT on mysql.user)")
    for name, definer in dead or ():
        report.worse(
            CRITICAL,
            f"trigger {name} has DEFINER {definer}, an account that no longer exists: every UPDATE on the table fails; run ti-guard install",
        )
