"""Reads back from the catalog what the guard has installed, as objects comparable with the renderers'."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from .errors import GuardError
from .policy import PREFIX, REQUIRED_COLUMNS, SETTINGS_TABLE, Policy

RULES_COLUMN = "rules"
from .render import dialect_name


@dataclass(frozen=True)
class Installed:
    kind: str
    name: str
    definition: str
    enabled: bool = True
    definer: str | None = None
    arguments: str = ""  # a PostgreSQL function's identity arguments, which DROP FUNCTION needs
    public_execute: bool = False  # a PostgreSQL function anyone may call (and attach to a table of their own)


def pg_schema(conn, policy: Policy) -> str:
    """The schema of the guarded table and of the guard's own objects: the policy's, else the
    connection's current schema (where an unqualified CREATE puts them)."""
    return policy.schema or conn.exec_driver_sql("SELECT current_schema()").scalar()


def _mysql_schema(conn, policy: Policy) -> str:
    return policy.schema or conn.exec_driver_sql("SELECT DATABASE()").scalar()


def read(conn: sa.Connection, policy: Policy) -> dict[str, Installed]:
    """Every ti_guard object on the policy's table (and, on PostgreSQL, its schema's functions)."""
    dialect = dialect_name(conn.dialect.name)
    found: list[Installed] = []
    if dialect == "postgresql":
        schema = pg_schema(conn, policy)
        rows = conn.execute(
            sa.text(
                "SELECT p.proname, p.prosrc, pg_get_function_identity_arguments(p.oid), has_function_privilege('public', p.oid, 'EXECUTE') "
                "FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = :schema"
            ),
            {"schema": schema},
        )
        found += [
            Installed("function", name, src.strip("\n"), arguments=args, public_execute=public)
            for name, src, args, public in rows
            if name.startswith(PREFIX + "_")
        ]
        rows = conn.execute(
            sa.text(
                "SELECT t.tgname, p.proname, t.tgenabled FROM pg_trigger t "
                "JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
                "JOIN pg_proc p ON p.oid = t.tgfoid "
                "WHERE NOT t.tgisinternal AND n.nspname = :schema AND c.relname = :table"
            ),
            {"schema": schema, "table": policy.table},
        )
        found += [Installed("trigger", name, fn, enabled != "D") for name, fn, enabled in rows if name.startswith(PREFIX + "_")]
    elif dialect == "mysql":
        rows = conn.execute(
            sa.text(
                "SELECT TRIGGER_NAME, ACTION_STATEMENT, DEFINER FROM information_schema.TRIGGERS "
                "WHERE TRIGGER_SCHEMA = :schema AND EVENT_OBJECT_TABLE = :table"
            ),
            {"schema": _mysql_schema(conn, policy), "table": policy.table},
        )
        found += [Installed("trigger", name, body, True, definer) for name, body, definer in rows if name.startswith(PREFIX + "_")]
    else:
        rows = conn.execute(
            sa.text("SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = :table"),
            {"table": policy.table},
        )
        found += [Installed("trigger", name, sql) for name, sql in rows if name.startswith(PREFIX + "_")]
    return {obj.name: obj for obj in found}


def table_columns(conn: sa.Connection, policy: Policy) -> list[str]:
    """The table's columns in order; a clear error when it is not an Airflow task_instance."""
    inspector = sa.inspect(conn)
    schema = policy.schema if dialect_name(conn.dialect.name) != "sqlite" else None
    where = f"schema {policy.schema!r}" if policy.schema else "the default schema"
    if not inspector.has_table(policy.table, schema=schema):
        raise GuardError(
            f"no table {policy.table!r} in {where}: is this the Airflow metadata database? "
            "check the URL, and the schema (--schema, TI_GUARD_SCHEMA, AIRFLOW__DATABASE__SQL_ALCHEMY_SCHEMA)"
        )
    columns = [c["name"] for c in inspector.get_columns(policy.table, schema=schema)]
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise GuardError(
            f"table {policy.table!r} has no column(s) {', '.join(missing)}: ti-guard needs the task_instance "
            "of Airflow 2.3 or later; check that the URL points at the Airflow metadata database"
        )
    return columns


def settings_table(policy: Policy) -> sa.Table:
    return sa.Table(
        SETTINGS_TABLE,
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("protect", sa.String(400), nullable=False),
        sa.Column("guarded_table", sa.String(128), nullable=False),
        sa.Column("definition", sa.String(1000), nullable=False),
        sa.Column("installed_at", sa.DateTime, nullable=False),
        # Revision 0002: the rules switched on. Absent (a guard at 0001) or NULL: every rule, as 0001 installed.
        sa.Column(RULES_COLUMN, sa.String(400), nullable=True),
        schema=policy.db_schema,
    )


def settings_columns(conn: sa.Connection, policy: Policy) -> set[str] | None:
    """The columns ti_guard_settings has (None: no such table)."""
    table = settings_table(policy)
    inspector = sa.inspect(conn)
    if not inspector.has_table(table.name, schema=table.schema):
        return None
    return {c["name"] for c in inspector.get_columns(table.name, schema=table.schema)}


def read_settings(conn: sa.Connection, policy: Policy) -> dict | None:
    table = settings_table(policy)
    have = settings_columns(conn, policy)
    if have is None:
        return None
    row = conn.execute(sa.select(*(c for c in table.c if c.name in have)).where(table.c.id == 1)).mappings().first()
    return dict(row) if row else None


def recorded_policy(conn: sa.Connection, policy: Policy, recorded: dict | None = None) -> Policy | None:
    """The policy ti_guard_settings records (at `policy`'s schema and table), None when nothing is recorded."""
    row = recorded if recorded is not None else read_settings(conn, policy)
    if not row:
        return None
    return Policy.build(protect=row["protect"], mode=row["mode"], schema=policy.schema, table=policy.table, rules=row.get(RULES_COLUMN))


def missing_definers(conn: sa.Connection, triggers) -> list[tuple[str, str]] | None:
    """MySQL triggers whose DEFINER account is gone (every UPDATE on the table then fails);
    None when mysql.user cannot be read."""
    dead = []
    for obj in triggers:
        if not obj.definer or "@" not in obj.definer:
            continue
        user, host = obj.definer.rsplit("@", 1)
        try:
            exists = conn.execute(
                sa.text("SELECT COUNT(*) FROM mysql.user WHERE User = :u AND Host = :h"),
                {"u": user.strip("`'"), "h": host.strip("`'")},
            ).scalar()
        except sa.exc.DBAPIError:
            return None
        if not exists:
            dead.append((obj.name, obj.definer))
    return dead


def revision(conn: sa.Connection, version_table: str, schema: str | None) -> str | None:
    """The revision an Alembic version table holds (ours, or Airflow's `alembic_version`)."""
    if not sa.inspect(conn).has_table(version_table, schema=schema):
        return None
    table = sa.Table(version_table, sa.MetaData(), sa.Column("version_num", sa.String(32)), schema=schema)
    return conn.execute(sa.select(table.c.version_num)).scalar()


@dataclass(frozen=True)
class MySQLGrants:
    account: str
    server: frozenset  # global privileges
    database: frozenset  # global + on the database
    table: frozenset  # global + database + on the table


def mysql_grants(conn: sa.Connection, policy: Policy) -> MySQLGrants:
    """What the current account may do, from information_schema (roles are not followed)."""
    account = conn.exec_driver_sql("SELECT CURRENT_USER()").scalar()
    user, host = account.rsplit("@", 1)
    params = {"g": f"'{user}'@'{host}'", "db": _mysql_schema(conn, policy), "t": policy.table}  # compared as values

    def read(sql):
        return frozenset(row[0] for row in conn.execute(sa.text(sql), params))

    server = read("SELECT PRIVILEGE_TYPE FROM information_schema.USER_PRIVILEGES WHERE GRANTEE = :g")
    database = server | read("SELECT PRIVILEGE_TYPE FROM information_schema.SCHEMA_PRIVILEGES WHERE GRANTEE = :g AND :db LIKE TABLE_SCHEMA")
    table = database | read(
        "SELECT PRIVILEGE_TYPE FROM information_schema.TABLE_PRIVILEGES WHERE GRANTEE = :g AND TABLE_SCHEMA = :db AND TABLE_NAME = :t"
    )
    return MySQLGrants(account, server, database, table)
