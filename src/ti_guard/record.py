"""The record of refusals: two tables the guard's triggers write when they keep or audit a write.

Bounded by construction, and written without a lock that two writers could wait on:

- `ti_guard_refusals`, the details: a ring of RECORD_ROWS rows made at install. A refusal
  overwrites the slot its sequence number names (PostgreSQL: a sequence; MySQL: UUID_SHORT(),
  the server's lock-free counter; SQLite: the last number + 1, one writer at a time), so the
  table never grows, and two concurrent refusals update two different rows by primary key.
- `ti_guard_refusal_counts`, exact counts per UTC day, rule, action, old and new state, kept for
  good. Each writer's connection counts in rows of its own (`connection_id`), so concurrent
  refusals never update the same counter, which a shared counter row would make them wait on
  (and deadlock on, in a transaction that also holds task_instance rows the other needs); and
  in one of COUNT_BUCKETS rows (`bucket`), so one statement refusing 100k rows does not update
  one row 100k times. At most COUNT_BUCKETS rows per day, rule, states and connection.

The SQL the triggers run to write here is in each renderer, beside the rest of that backend's
guard; this module holds the tables, the ring's fill, and what `status` and `report` read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

from . import catalog
from .policy import COUNTS_TABLE, RECORD_ROWS, RECORD_SEQUENCE, RECORD_TABLE, Policy
from .render import dialect_name

# Airflow's ids are at most 250 characters (ID_LEN).
_ID = 250
_WHEN = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def tables(policy: Policy) -> tuple[sa.Table, sa.Table]:
    """(details ring, daily counts), in the guarded table's schema."""
    md = sa.MetaData(schema=policy.db_schema)
    details = sa.Table(
        RECORD_TABLE,
        md,
        sa.Column("slot", sa.Integer, primary_key=True, autoincrement=False),
        # NULL: a slot no refusal has reached yet. Numeric: MySQL's UUID_SHORT() can pass BIGINT.
        sa.Column("seq", sa.Numeric(20, 0)),
        sa.Column("refused_at", _WHEN),
        sa.Column("rule", sa.String(64)),
        sa.Column("action", sa.String(16)),
        sa.Column("old_state", sa.String(20)),
        sa.Column("new_state", sa.String(20)),
        sa.Column("dag_id", sa.String(_ID)),
        sa.Column("task_id", sa.String(_ID)),
        sa.Column("run_id", sa.String(_ID)),
        sa.Column("map_index", sa.Integer),
        sa.Column("writer_user", sa.String(300)),  # MySQL USER(): 32 + 1 + 255
        sa.Column("writer_application", sa.String(_ID)),
        sa.Column("writer_address", sa.String(64)),
        sa.Column("writer_pid", sa.BigInteger),
    )
    sa.Index(f"{RECORD_TABLE}_seq", details.c.seq)
    counts = sa.Table(
        COUNTS_TABLE,
        md,
        sa.Column("day", sa.Date, primary_key=True),
        sa.Column("rule", sa.String(64), primary_key=True),
        sa.Column("action", sa.String(16), primary_key=True),
        sa.Column("old_state", sa.String(20), primary_key=True),
        sa.Column("new_state", sa.String(20), primary_key=True),
        sa.Column("connection_id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("bucket", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("refusals", sa.BigInteger, nullable=False),
    )
    return details, counts


def sequence(policy: Policy) -> sa.Sequence:
    """PostgreSQL only: numbers the refusals without a lock (nextval never waits)."""
    return sa.Sequence(RECORD_SEQUENCE, schema=policy.db_schema)


def fill(details: sa.Table) -> sa.Insert:
    """INSERT ... SELECT of every empty slot 0..RECORD_ROWS-1, from a cross join of digits (one
    statement that every backend and a DBA's client runs; no generate_series, no recursion cap)."""
    digits = math.ceil(math.log10(RECORD_ROWS))
    digit = sa.union_all(*[sa.select(sa.literal(d, sa.Integer).label("d")) for d in range(10)])
    parts = [digit.subquery(f"d{i}") for i in range(digits)]
    slot = sum((p.c.d * 10**i for i, p in enumerate(parts)), sa.literal(0, sa.Integer))
    rows = sa.select(slot.label("slot")).select_from(*parts).where(slot < RECORD_ROWS)
    return details.insert().from_select(["slot"], rows)


def _compiled(clause, dialect: sa.engine.Dialect) -> str:
    return str(clause.compile(dialect=dialect, compile_kwargs={"literal_binds": True})).strip()


def create_statements(dialect: sa.engine.Dialect, policy: Policy, only: sa.Table | None = None) -> list[str]:
    """The record's DDL and the ring's fill, compiled for `dialect`: all of it, or one table's."""
    def compiled(clause) -> str:
        return _compiled(clause, dialect)

    out = []
    if dialect_name(dialect.name) == "postgresql" and only is None:
        out.append(compiled(sa.schema.CreateSequence(sequence(policy))))
    for table in tables(policy):
        if only is None or table.name == only.name:
            out.append(compiled(sa.schema.CreateTable(table)))
            out += [compiled(sa.schema.CreateIndex(index)) for index in table.indexes]
            if table.name == RECORD_TABLE:
                out.append(compiled(fill(table)))
    return out


def drop_statements(dialect: sa.engine.Dialect, policy: Policy) -> list[str]:
    def compiled(clause) -> str:
        return _compiled(clause, dialect)

    out = [compiled(sa.schema.DropTable(table, if_exists=True)) for table in tables(policy)]
    if dialect_name(dialect.name) == "postgresql":
        out.append(compiled(sa.schema.DropSequence(sequence(policy), if_exists=True)))
    return out


@dataclass(frozen=True)
class Finding:
    line: str
    critical: bool = False
    table: sa.Table | None = None  # None: PostgreSQL's sequence
    missing: bool = True  # False: there, but not as made (install re-creates it)


def check(conn: sa.Connection, policy: Policy) -> list[Finding]:
    """What is wrong with the record, if anything. A missing table is critical on SQLite, which
    compiles a trigger's statements with the UPDATE that fires it and fails that UPDATE (worker
    starts included: they write start_date); PostgreSQL and MySQL turn the record's error into a
    warning and keep guarding."""
    dialect = dialect_name(conn.dialect.name)
    inspector = sa.inspect(conn)
    found = []
    for table in tables(policy):
        if not inspector.has_table(table.name, schema=table.schema):
            # A guard from before the record (0.3.0) names no record table: nothing fails then.
            fatal = dialect == "sqlite" and any(table.name in o.definition for o in catalog.read(conn, policy).values())
            why = "every UPDATE that fires the guard fails until it is back" if fatal else "refusals are not recorded"
            found.append(Finding(f"record table {table.name} is missing: {why}; run ti-guard install", fatal, table))
            continue
        have = {c["name"] for c in inspector.get_columns(table.name, schema=table.schema)}
        if have != set(table.c.keys()):
            changed = ", ".join(sorted(have ^ set(table.c.keys())))
            found.append(Finding(f"record table {table.name} was altered (columns {changed}): run ti-guard install to re-create it", table=table, missing=False))
        elif table.name == RECORD_TABLE:
            slots = conn.execute(sa.select(sa.func.count()).select_from(table)).scalar()
            if slots != RECORD_ROWS:
                found.append(Finding(f"record table {table.name} has {slots} slots, not {RECORD_ROWS}: run ti-guard install to re-create it", table=table, missing=False))
    if dialect == "postgresql" and not inspector.has_sequence(RECORD_SEQUENCE, schema=policy.db_schema):
        found.append(Finding(f"sequence {RECORD_SEQUENCE} is missing: refusals are not recorded; run ti-guard install"))
    return found
