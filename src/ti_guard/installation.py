"""Install, replace and remove the guard through an Alembic `op`, online or offline alike.

Online, installing is a reconcile: create each object the policy renders that is not there
yet, then drop every other ti_guard object, then record the settings. Creating before
dropping keeps a guard in place at every moment on MySQL, where each DDL statement commits
on its own; an install killed between two statements converges when it is run again.
Offline (`alembic upgrade head --sql`, the files in sql/), the same objects are printed.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext

from . import catalog
from .airflow_shape import AIRFLOW_3_COLUMNS
from .policy import Policy
from .db import run_sql
from .render import GuardObject, dialect_name, render


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
    dialect = dialect_name(op_or_conn.dialect.name)
    if dialect == "mysql" and policy.mode == "ignore" and columns is None:
        columns = AIRFLOW_3_COLUMNS
    return render(dialect, policy, columns)


def install(op: Operations, policy: Policy) -> list[str]:
    """Bring the database to the policy's guard; returns what was done, one line per action."""
    ctx = op.get_context()
    settings = catalog.settings_table(policy)
    if _offline(op):
        objects = expected(ctx, policy)
        emit(op, _compiled(op, sa.schema.CreateTable(settings)))
        for obj in objects:
            emit(op, obj.create, obj.compound)
        emit(op, _compiled(op, settings.insert().values(_settings_row(policy, objects, sa.func.current_timestamp()))))
        return [f"printed {o.kind} {o.name}" for o in objects]

    conn = op.get_bind()
    columns = catalog.table_columns(conn, policy)
    objects = expected(conn, policy, columns)
    installed = catalog.read(conn, policy)
    done = []
    for obj in objects:
        have = installed.get(obj.name)
        if have is None:
            emit(op, obj.create)
            done.append(f"created {obj.kind} {obj.name}")
        elif have.definition != obj.definition:
            # Same name, other text: changed by hand. Put ours back (a function is replaced in place).
            if obj.kind != "function":
                emit(op, obj.drop)
            emit(op, obj.create)
            done.append(f"replaced {obj.kind} {obj.name} (it had been changed by hand)")
        elif not have.enabled:
            emit(op, f"ALTER TABLE {_table(op, policy)} ENABLE TRIGGER {_ident(op, obj.name)}")
            done.append(f"enabled trigger {obj.name} (it had been disabled)")
    done += _drop_others(op, policy, installed, keep={o.name for o in objects})
    _record(op, conn, policy, settings, objects)
    return done


def uninstall(op: Operations, policy: Policy) -> list[str]:
    settings = catalog.settings_table(policy)
    if _offline(op):
        for obj in reversed(expected(op.get_context(), policy)):
            emit(op, obj.drop)
        emit(op, _compiled(op, sa.schema.DropTable(settings, if_exists=True)))
        return []
    conn = op.get_bind()
    done = _drop_others(op, policy, catalog.read(conn, policy), keep=set())
    if sa.inspect(conn).has_table(settings.name, schema=settings.schema):
        emit(op, _compiled(op, sa.schema.DropTable(settings)))
        done.append(f"dropped table {settings.name}")
    return done


def _drop_others(op: Operations, policy: Policy, installed: dict, keep: set) -> list[str]:
    stale = [o for o in installed.values() if o.name not in keep]
    done = []
    # Triggers first: a function cannot go while a trigger still calls it.
    for obj in sorted(stale, key=lambda o: o.kind != "trigger"):
        emit(op, _drop_sql(op, policy, obj))
        done.append(f"dropped {obj.kind} {obj.name}")
    return done


def _drop_sql(op: Operations, policy: Policy, obj: catalog.Installed) -> str:
    name = _qualified(op, policy, obj.name)
    if obj.kind == "function":
        return f"DROP FUNCTION IF EXISTS {name}()"
    if _dialect(op) == "postgresql":
        return f"DROP TRIGGER IF EXISTS {_ident(op, obj.name)} ON {_table(op, policy)}"
    return f"DROP TRIGGER IF EXISTS {name}" if _dialect(op) == "mysql" else f"DROP TRIGGER IF EXISTS {_ident(op, obj.name)}"


def _ident(op: Operations, name: str) -> str:
    return op.get_context().dialect.identifier_preparer.quote(name)


def _qualified(op: Operations, policy: Policy, name: str) -> str:
    prep = op.get_context().dialect.identifier_preparer
    if policy.db_schema and _dialect(op) != "sqlite":
        return f"{prep.quote_schema(policy.db_schema)}.{prep.quote(name)}"
    return prep.quote(name)


def _table(op: Operations, policy: Policy) -> str:
    return _qualified(op, policy, policy.table)


def _settings_row(policy: Policy, objects, when) -> dict:
    return {
        "id": 1,
        "mode": policy.mode,
        "protect": policy.protect_csv,
        "guarded_table": policy.table,
        "definition": definition_id(objects),
        "installed_at": when,
    }


def _record(op, conn, policy: Policy, settings: sa.Table, objects) -> None:
    if not sa.inspect(conn).has_table(settings.name, schema=settings.schema):
        emit(op, _compiled(op, sa.schema.CreateTable(settings)))
    row = _settings_row(policy, objects, sa.func.current_timestamp())
    current = catalog.read_settings(conn, policy)
    if current is None:
        conn.execute(settings.insert().values(row))
    elif any(current[k] != v for k, v in row.items() if k not in ("installed_at",)):
        conn.execute(settings.update().where(settings.c.id == 1).values(row))


def operations(conn: sa.Connection) -> Operations:
    """An `op` on a plain connection, for the CLI's in-place reconcile outside a revision."""
    return Operations(MigrationContext.configure(conn))

