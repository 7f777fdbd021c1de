"""Renderers: one module per backend turns a Policy into the guard's SQL objects.

Each object knows its own CREATE and DROP and the text the catalog will hand back for it
(`definition`), so `catalog.py` can compare what is installed with what should be, object
by object. Object names end in a hash of their definition: a new definition is a new name,
created beside the old one before the old one is dropped (MySQL DDL is not transactional,
so that order is what keeps a guard in place at every moment).
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from ..errors import GuardError
from ..policy import (
    COLUMN_SINCE,
    ENDS_IN_ONE_STATEMENT,
    ENDS_WITHOUT_NEXT_METHOD,
    SIGNATURE_NEEDS,
    STAMPS_START,
    STAMPS_START_AND_DURATION,
    Policy,
)

SUPPORTED = ("postgresql", "mysql", "sqlite")


@dataclass(frozen=True)
class GuardObject:
    kind: str  # "function" | "trigger"
    name: str
    create: str
    drop: str
    definition: str  # what the catalog stores for it (body or full text), compared by status
    compound: bool = False  # has ';' inside: the mysql client needs a DELIMITER around it
    after: tuple[str, ...] = ()  # run right after `create`: the object's rights (PostgreSQL's REVOKE)


class Quoter:
    """Identifiers and literals through SQLAlchemy's dialect, never by string formatting."""

    def __init__(self, dialect: sa.engine.Dialect, policy: Policy):
        self.dialect = dialect
        self.prep = dialect.identifier_preparer
        self.policy = policy

    def ident(self, name: str) -> str:
        return self.prep.quote(name)

    def qualified(self, name: str) -> str:
        if self.policy.schema:
            return f"{self.prep.quote_schema(self.policy.schema)}.{self.prep.quote(name)}"
        return self.prep.quote(name)

    @property
    def table(self) -> str:
        return self.qualified(self.policy.table)

    def literal(self, value: str) -> str:
        text = str(sa.literal(value, sa.String()).compile(dialect=self.dialect, compile_kwargs={"literal_binds": True}))
        # The compiler doubles '%' for format-style drivers; this SQL is printed for a DBA or run
        # through db.run_sql (which escapes for the driver itself), so it must hold a plain '%'.
        return text.replace("%%", "%") if self.dialect.paramstyle in ("format", "pyformat") else text

    def in_list(self, values) -> str:
        return ", ".join(self.literal(v) for v in values)


def dialect_name(name: str) -> str:
    base = name.split(":", 1)[0].split("+", 1)[0].lower()
    if base in ("postgres", "postgresql"):
        return "postgresql"
    if base in ("mysql", "mariadb"):
        return "mysql"
    if base == "sqlite":
        return "sqlite"
    raise GuardError(f"unsupported database {base!r}: ti-guard supports postgresql, mysql (or mariadb) and sqlite")


def _module(dialect: str):
    from . import mysql, postgresql, sqlite

    return {"postgresql": postgresql, "mysql": mysql, "sqlite": sqlite}[dialect_name(dialect)]


def render(dialect: str, policy: Policy, columns=None, schema: str | None = None) -> list[GuardObject]:
    """The guard's objects for a dialect, in creation order (functions before triggers). `schema`:
    the schema the table was found in, for PostgreSQL's function, which names it (None offline)."""
    return _module(dialect).render(policy, columns, schema)


def sees(dialect: str) -> frozenset:
    """The rule signatures a backend can test; a rule whose signature it cannot see is not
    enforced there (docs/policy.md's policy table says so per backend)."""
    return _module(dialect).SEES


def enforced_rules(dialect: str, policy: Policy, columns=None):
    return [entry for entry in policy.rules(columns) if entry[0].signature in sees(dialect)]


def missing_columns(dialect: str, policy: Policy, columns) -> list[tuple[str, object]]:
    """(column, rule) for each column that a rule this backend will install reads and the table lacks."""
    have = {c.lower() for c in columns}
    return [(SIGNATURE_NEEDS[rule.signature], rule) for rule, _, _ in enforced_rules(dialect, policy, columns) if SIGNATURE_NEEDS[rule.signature] not in have]


def require_columns(dialect: str, policy: Policy, columns) -> None:
    """Refuse, in one line naming the column, its rule and the Airflow release that has it, a table
    that lacks a column a rule to be installed reads: before anything is made."""
    for column, rule in missing_columns(dialect, policy, columns)[:1]:
        raise GuardError(
            f"table {policy.table!r} has no column {column}, which rule {rule.name} reads ({COLUMN_SINCE[column]}): "
            f"point the URL at Airflow's metadata database, or switch the rule off ({rules_without(policy, [rule.name])})"
        )


def rules_without(policy: Policy, names) -> str:
    """The option that installs the policy's rules less `names` (or, when none is left, the way to remove the guard)."""
    others = [n for n in policy.switched_on if n not in names]
    return f"--rules {','.join(others)}" if others else "ti-guard uninstall"


# For backends that see which columns a statement writes: the column whose `UPDATE OF` carries a
# signature (policy.SIGNATURE_NEEDS); "does not write next_method" is no `UPDATE OF` (postgresql.py marks it).
# stale_set_state_skip needs duration but fires on start_date, as racy_skip does: its WHEN tells
# the two apart by duration (duration_test), the column list carries the start_date half.
SIGNATURE_COLUMN = {signature: column for signature, column in SIGNATURE_NEEDS.items() if signature != ENDS_WITHOUT_NEXT_METHOD}
SIGNATURE_COLUMN[STAMPS_START_AND_DURATION] = "start_date"


def duration_test(signature: str, columns, same: str, zero: str = "0") -> str | None:
    """The value half that tells the two start_date stampers apart: the racy routes leave duration
    as it was, `TaskInstance.set_state` writes it (0 on a copy without a start). `zero` is the
    backend's literal for 0 as a duration. None where it does not apply (a table without duration
    can have only the racy rule: stale_set_state_skip reads duration, policy.SIGNATURE_NEEDS)."""
    if columns is not None and "duration" not in columns:
        return None
    # set_state on a copy with no start_date writes duration = end - start = 0. A row whose duration
    # was 0 already (an earlier skip, then a clear) cannot tell the two apart by value: it goes to
    # the rule that keeps, never raises (the scheduler's write must not fail).
    racy = f"{same.format(a='NEW.duration', b='OLD.duration')} AND NOT ({same.format(a='NEW.duration', b=zero)})"
    if signature == STAMPS_START:
        return racy
    if signature == STAMPS_START_AND_DURATION:
        return f"NOT ({racy})"
    return None


def rule_condition(q: Quoter, rule, olds, same: str, equals: str = "{a} = {b}", member: str = "{a} IN ({b})", columns=None,
                   zero: str = "0") -> str:
    """A rule's WHEN condition for backends that see which columns a statement writes (the column
    half of the signature is the trigger's `UPDATE OF`). `same`, `equals` and `member` are the
    backend's null-safe equality, equality and list membership, with {a} and {b} for operands."""
    new = equals.format(a="NEW.state", b=q.literal(rule.new_state))
    condition = f"{new} AND {member.format(a='OLD.state', b=q.in_list(olds))}"
    if rule.signature in (ENDS_WITHOUT_NEXT_METHOD, ENDS_IN_ONE_STATEMENT):
        kept = same.format(a="NEW.start_date", b="OLD.start_date")
        condition += f" AND NEW.end_date IS NOT NULL AND {kept}"
    duration = duration_test(rule.signature, columns, same, zero)
    if duration:
        condition += f" AND {duration}"
    return condition
