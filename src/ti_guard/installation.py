"""Install, replace and remove the guard through an Alembic `op`, online or offline alike.

Online, installing is a reconcile: create each object the policy renders that is not there
yet, then drop every other ti_guard object, then record the settings. Creating before
dropping keeps a guard in place at every moment on MySQL, where each DDL statement commits
on its own; an install killed between two statements converges when it is run again.
Offline (`alembic upgrade head --sql`, the files in sql/), the same objects are printed.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext

from . import catalog, record
from .airflow_shape import AIRFLOW_3_COLUMNS
from .db import run_sql
from .policy import Policy
from .render import GuardObject, dialect_name, render, require_columns


def _dialect(op: Operations) -> str:
    return dialect_name(op.get_context().dialect.name)


def _offline(op: Operations) -> bool:
    return op.get_context().as_sql


def emit(op: Operations, sql: str, compound: bool = False) -> None:
    """Run one statement, or print it for a DBA's client (psql, mysql, sqlite3)."""
    ctx = op.get_context()
    if not ctx.as_sql:
        run_sql(op.get_bind(), sql)
    elif compound and _dialect(op) == "mysql":
        ctx.impl.static_output("DELIMITER //")
        ctx.impl.static_output(sql + "\n//")
        ctx.impl.static_output("DELIMITER ;\n")
    else:
        ctx.impl.static_output(sql + ";\n")


def _compiled(op: Operations, clause) -> str:
    return str(clause.compile(dialect=op.get_context().dialect, compile_kwargs={"literal_binds": True})).strip()


def definition_id(objects: list[GuardObject]) -> str:
    return ",".join(o.name for o in objects)


def expected(op_or_conn, policy: Policy, columns=None) -> list[GuardObject]:
    # Offline (SQL for a DBA) the table is not there to read: Airflow 3's columns are assumed, and
    # the schema is the DBA session's, read when the SQL runs.
    dialect = dialect_name(op_or_conn.dialect.name)
    schema = catalog.pg_schema(op_or_conn, policy) if isinstance(op_or_conn, sa.Connection) and dialect == "postgresql" else None
    return render(dialect, policy, AIRFLOW_3_COLUMNS if columns is None else columns, schema)


@dataclass(frozen=True)
class Step:
    """One action of a reconcile: what `install` will do, and what `doctor` says it would do."""

    verb: str  # created | replaced | enabled | dropped
    kind: str
    name: str
    statements: tuple[str, ...]
    why: str = ""

    def describe(self, future: bool = False) -> str:
        verb = {"created": "create", "replaced": "replace", "enabled": "enable", "dropped": "drop"}[self.verb] if future else self.verb
        return f"{verb} {self.kind} {self.name}" + (f" ({self.why})" if self.why else "")


def plan(conn: sa.Connection, policy: Policy) -> tuple[list[Step], list[GuardObject]]:
    """The steps that bring this database to the policy's guard, new objects before old ones go."""
    dialect = conn.dialect
    columns = catalog.table_columns(conn, policy)
    require_columns(dialect_name(dialect.name), policy, columns)  # before anything is made: one line naming the column and its rule
    objects = expected(conn, policy, columns)
    installed = catalog.read(conn, policy)
    orphaned = {name for name, _ in catalog.missing_definers(conn, installed.values()) or ()}
    # The record before the triggers that write it: on SQLite a trigger whose table is missing
    # fails every statement that fires it.
    steps = _record_steps(conn, policy)
    for obj in objects:
        have = installed.get(obj.name)
        if have is None:
            steps.append(Step("created", obj.kind, obj.name, (obj.create, *obj.after)))
        elif obj.name in orphaned:
            # Every UPDATE on the table fails while the DEFINER is gone; re-creating it as us fixes that.
            steps.append(Step("replaced", obj.kind, obj.name, (obj.drop, obj.create, *obj.after), f"its DEFINER {have.definer} no longer exists"))
        elif have.definition != obj.definition:
            # Same name, other text: changed by hand. Put ours back (a function is replaced in place).
            sql = (obj.create,) if obj.kind == "function" else (obj.drop, obj.create)
            steps.append(Step("replaced", obj.kind, obj.name, (*sql, *obj.after), "it had been changed by hand"))
        elif have.public_execute:
            steps.append(Step("replaced", obj.kind, obj.name, obj.after, "EXECUTE had been granted to PUBLIC"))
        elif not have.enabled:
            sql = f"ALTER TABLE {_table(dialect, policy)} ENABLE TRIGGER {_ident(dialect, obj.name)}"
            steps.append(Step("enabled", obj.kind, obj.name, (sql,), "it had been disabled"))
    steps += _drops(dialect, policy, installed, keep={o.name for o in objects})
    return steps, objects


def install(op: Operations, policy: Policy) -> list[str]:
    """Bring the database to the policy's guard; returns what was done, one line per action."""
    ctx = op.get_context()
    settings = catalog.settings_table(policy)
    if _offline(op):
        objects = expected(ctx, policy)
        emit(op, _compiled(op, sa.schema.CreateTable(settings)))
        for statement in _record_create(op, policy):
            emit(op, statement)
        for obj in objects:
            emit(op, obj.create, obj.compound)
            for statement in obj.after:
                emit(op, statement)
        emit(op, _compiled(op, settings.insert().values(_settings_row(policy, objects, sa.func.current_timestamp()))))
        return [f"printed {o.kind} {o.name}" for o in objects]

    conn = op.get_bind()
    steps, objects = plan(conn, policy)
    _run(op, steps)
    _record(op, conn, policy, settings, objects)
    return [step.describe() for step in steps]


def _record_create(op: Operations, policy: Policy, table: sa.Table | None = None) -> list[str]:
    return record.create_statements(op.get_context().dialect, policy, table)


def _record_steps(conn: sa.Connection, policy: Policy) -> list[Step]:
    """Make what is missing of the record; re-create a table that was altered (its rows are
    diagnostics, not Airflow's data: the step says they are gone)."""
    op = operations(conn)
    steps = []
    for finding in record.check(conn, policy):
        if finding.table is None:
            sequence = record.sequence(policy)
            steps.append(Step("created", "sequence", sequence.name, (_compiled(op, sa.schema.CreateSequence(sequence)),)))
        elif finding.missing:
            steps.append(Step("created", "table", finding.table.name, tuple(_record_create(op, policy, finding.table))))
        else:
            drop = _compiled(op, sa.schema.DropTable(finding.table))
            statements = (drop, *_record_create(op, policy, finding.table))
            steps.append(Step("replaced", "table", finding.table.name, statements, "it had been altered; its earlier rows are gone"))
    return steps


def uninstall(op: Operations, policy: Policy, keep_record: bool | None = None) -> list[str]:
    """Remove the guard; the record of refusals too, unless keep_record (default: the migration
    context's ti_guard_keep_record, which `ti-guard uninstall --keep-record` and `-x keep_record=1` set)."""
    if keep_record is None:
        keep_record = bool(op.get_context().opts.get("ti_guard_keep_record"))
    settings = catalog.settings_table(policy)
    if _offline(op):
        for obj in reversed(expected(op.get_context(), policy)):
            emit(op, obj.drop)
        for statement in [] if keep_record else _record_drop(op, policy):
            emit(op, statement)
        emit(op, _compiled(op, sa.schema.DropTable(settings, if_exists=True)))
        return []
    conn = op.get_bind()
    steps = _drops(conn.dialect, policy, catalog.read(conn, policy), keep=set())
    _run(op, steps)
    done = [step.describe() for step in steps]
    inspector = sa.inspect(conn)
    if not keep_record:
        done += [f"dropped table {t.name}" for t in record.tables(policy) if inspector.has_table(t.name, schema=t.schema)]
        for statement in _record_drop(op, policy):
            emit(op, statement)
    if inspector.has_table(settings.name, schema=settings.schema):
        emit(op, _compiled(op, sa.schema.DropTable(settings)))
        done.append(f"dropped table {settings.name}")
    return done


def record_held(conn: sa.Connection, policy: Policy) -> list[dict]:
    """What uninstall would delete of the record: per table, its rows and the refusals they count."""
    details, counts = record.tables(policy)
    inspector = sa.inspect(conn)
    held = []
    for table, rows, refusals in (
        (details, sa.func.count(details.c.seq), sa.func.count(details.c.seq)),  # empty slots have no seq
        (counts, sa.func.count(), sa.func.coalesce(sa.func.sum(counts.c.refusals), 0)),
    ):
        if inspector.has_table(table.name, schema=table.schema):
            n, total = conn.execute(sa.select(rows, refusals).select_from(table)).one()
            held.append({"table": table.name, "rows": int(n), "refusals": int(total)})
    return held


def record_rows(conn: sa.Connection, policy: Policy) -> dict[str, list[dict]]:
    """The record's rows, for `uninstall --export-record` (the details' empty slots left out)."""
    details, counts = record.tables(policy)
    inspector = sa.inspect(conn)
    out = {}
    for table, where, order in ((details, details.c.seq.is_not(None), details.c.seq), (counts, sa.true(), counts.c.day)):
        if inspector.has_table(table.name, schema=table.schema):
            out[table.name] = [dict(r._mapping) for r in conn.execute(sa.select(table).where(where).order_by(order))]
    return out


def discard_unused_record(conn: sa.Connection, policy: Policy) -> None:
    """After a failed install on MySQL (each DDL statement commits on its own): drop a record
    that no guard object uses and that holds no refusal, so nothing half-made is left."""
    if catalog.read(conn, policy):
        return
    inspector = sa.inspect(conn)
    details, counts = record.tables(policy)
    for table, holds in ((details, details.c.seq.is_not(None)), (counts, sa.true())):
        if inspector.has_table(table.name, schema=table.schema) and conn.execute(sa.select(sa.func.count()).select_from(table).where(holds)).scalar():
            return
    op = operations(conn)
    for statement in _record_drop(op, policy):
        emit(op, statement)
    conn.commit()


def _record_drop(op: Operations, policy: Policy) -> list[str]:
    return record.drop_statements(op.get_context().dialect, policy)


def _run(op: Operations, steps: list[Step]) -> None:
    for step in steps:
        for sql in step.statements:
            emit(op, sql)


def _drops(dialect, policy: Policy, installed: dict, keep: set) -> list[Step]:
    stale = [o for o in installed.values() if o.name not in keep]
    # Triggers first: a function cannot go while a trigger still calls it.
    return [Step("dropped", o.kind, o.name, (_drop_sql(dialect, policy, o),)) for o in sorted(stale, key=lambda o: o.kind != "trigger")]


def _drop_sql(dialect, policy: Policy, obj: catalog.Installed) -> str:
    name = _qualified(dialect, policy, obj.name)
    if obj.kind == "function":
        return f"DROP FUNCTION IF EXISTS {name}({obj.arguments})"
    if dialect_name(dialect.name) == "postgresql":
        return f"DROP TRIGGER IF EXISTS {_ident(dialect, obj.name)} ON {_table(dialect, policy)}"
    return f"DROP TRIGGER IF EXISTS {name}" if dialect_name(dialect.name) == "mysql" else f"DROP TRIGGER IF EXISTS {_ident(dialect, obj.name)}"


def _ident(dialect, name: str) -> str:
    return dialect.identifier_preparer.quote(name)


def _qualified(dialect, policy: Policy, name: str) -> str:
    prep = dialect.identifier_preparer
    if policy.db_schema and dialect_name(dialect.name) != "sqlite":
        return f"{prep.quote_schema(policy.db_schema)}.{prep.quote(name)}"
    return prep.quote(name)


def _table(dialect, policy: Policy) -> str:
    return _qualified(dialect, policy, policy.table)


def _settings_row(policy: Policy, objects, when) -> dict:
    return {
        "id": 1,
        "mode": policy.mode,
        "protect": policy.protect_csv,
        "guarded_table": policy.table,
        "definition": definition_id(objects),
        "installed_at": when,
        catalog.RULES_COLUMN: policy.rules_csv,
    }


def _record(op, conn, policy: Policy, settings: sa.Table, objects) -> None:
    if not sa.inspect(conn).has_table(settings.name, schema=settings.schema):
        emit(op, _compiled(op, sa.schema.CreateTable(settings)))
    row = _settings_row(policy, objects, sa.func.current_timestamp())
    current = catalog.read_settings(conn, policy)
    if current is None:
        conn.execute(settings.insert().values(row))
    elif any(current.get(k) != v for k, v in row.items() if k not in ("installed_at",)):
        conn.execute(settings.update().where(settings.c.id == 1).values(row))


def add_rules_column(op: Operations, policy: Policy) -> None:
    """Revision 0002: ti_guard_settings gains the rules switched on (0001's guard had every rule).
    Online, a settings table made by this release's 0001 already has it."""
    settings = catalog.settings_table(policy)
    if _offline(op) or catalog.RULES_COLUMN not in (catalog.settings_columns(op.get_bind(), policy) or {catalog.RULES_COLUMN}):
        op.add_column(settings.name, sa.Column(catalog.RULES_COLUMN, sa.String(400), nullable=True), schema=settings.schema)


def drop_rules_column(op: Operations, policy: Policy) -> None:
    settings = catalog.settings_table(policy)
    if _offline(op) or catalog.RULES_COLUMN in (catalog.settings_columns(op.get_bind(), policy) or ()):
        op.drop_column(settings.name, catalog.RULES_COLUMN, schema=settings.schema)


def switch_offline(op: Operations, before: Policy, after: Policy) -> None:
    """SQL for a DBA that turns the guard `before` renders into the one `after` renders: new objects
    first, then the old ones dropped (as online), then the settings row."""
    old, new = expected(op.get_context(), before), expected(op.get_context(), after)
    kept = {o.name for o in old}
    for obj in new:
        if obj.name not in kept:
            emit(op, obj.create, obj.compound)
            for statement in obj.after:
                emit(op, statement)
    for obj in reversed(old):
        if obj.name not in {o.name for o in new}:
            emit(op, obj.drop)
    settings = catalog.settings_table(after)
    values = {"definition": definition_id(new), catalog.RULES_COLUMN: after.rules_csv}
    emit(op, _compiled(op, settings.update().where(settings.c.id == 1).values(values)))


def operations(conn: sa.Connection) -> Operations:
    """An `op` on a plain connection, for the CLI's in-place reconcile outside a revision."""
    return Operations(MigrationContext.configure(conn))

