"""What migrations/env.py runs: offline and online through the same code.

Settings come from the ti-guard CLI (config.attributes["ti_guard_settings"]) or, under the
plain `alembic` command, from -x arguments and the environment. Online, a lock timeout
makes the migration give up instead of queueing writers behind it, and it is retried.
"""

from __future__ import annotations

from dataclasses import replace

import sqlalchemy as sa
from alembic import context
from alembic.util import CommandError

from . import catalog
from . import config as config_mod
from . import installation
from .db import lock_timeout_statement, make_engine, with_lock_retries
from .errors import GuardError
from .policy import VERSION_TABLE
from .render import dialect_name


def settings_from_context():
    cfg = context.config
    if cfg.attributes.get("ti_guard_settings") is not None:
        return cfg.attributes["ti_guard_settings"], cfg.attributes.get("ti_guard_dialect")
    x = context.get_x_argument(as_dictionary=True)
    settings = config_mod.resolve(
        url=x.get("url"),
        schema=x.get("schema"),
        mode=x.get("mode"),
        protect=x.get("protect"),
        table=x.get("table"),
        rules=x.get("rules"),
        lock_timeout=x.get("lock_timeout"),
        lock_retries=x.get("lock_retries"),
        need_url=not (context.is_offline_mode() and x.get("dialect")),
        flag="-x url=",
    )
    return settings, x.get("dialect")


def _keep_record() -> bool:
    """Downgrading to base leaves the record of refusals: ti-guard uninstall --keep-record, -x keep_record=1."""
    cfg = context.config
    if cfg.attributes.get("ti_guard_settings") is not None:
        return bool(cfg.attributes.get("ti_guard_keep_record"))
    return context.get_x_argument(as_dictionary=True).get("keep_record", "").lower() in ("1", "true", "yes")


# Alembic's read-only commands (current, check, history -i) pass env.py no destination.
READ_ONLY = object()


def destination():
    """Where the command moves the database: a revision, None for base, or READ_ONLY."""
    try:
        revision = context.get_revision_argument()
    except KeyError:
        return READ_ONLY
    # stamp passes a tuple of revisions, which resolves to the symbols themselves.
    return None if revision in ("base", ()) else revision


def _configure(settings, dialect: str, **kw) -> None:
    context.configure(
        version_table=VERSION_TABLE,
        version_table_schema=settings.policy.db_schema,
        # SQLite too keeps the install in one transaction; MySQL cannot (DDL commits).
        transactional_ddl=dialect in ("postgresql", "sqlite"),
        ti_guard_policy=settings.policy,
        ti_guard_keep_record=_keep_record(),
        # `alembic check`: the guard is triggers, not models; it checks that the database is at head.
        target_metadata=sa.MetaData(),
        include_name=lambda *_: False,
        **kw,
    )


def run() -> None:
    try:
        settings, dialect = settings_from_context()
        if context.is_offline_mode():
            run_offline(settings, dialect_name(dialect or settings.url))
        else:
            run_online(settings)
    except GuardError as exc:
        raise CommandError(str(exc)) from None


def run_offline(settings, dialect: str) -> None:
    _configure(settings, dialect, dialect_name=dialect, literal_binds=True)
    with context.begin_transaction():
        statement = lock_timeout_statement(dialect, settings.lock_timeout)
        if statement:
            context.get_context().impl.static_output(statement + ";\n")
        context.run_migrations()
        if destination() is None:  # downgraded to base
            # As online: a removal leaves no table of ours behind.
            context.get_context().impl.static_output(f"DROP TABLE {_version_table_sql(settings.policy, dialect)};\n")


def run_online(settings) -> None:
    moving = destination() is not READ_ONLY
    config_mod.require_existing(settings)
    engine = make_engine(settings.url, writes=moving)
    dialect = dialect_name(settings.url)
    try:
        with_lock_retries(engine, settings, lambda conn: _migrate(conn, settings, dialect))
    except GuardError:
        if not moving:
            raise
        # MySQL commits each DDL statement: do not leave an empty version table or record behind.
        with_lock_retries(engine, settings, lambda conn: drop_version_table(conn, settings.policy, only_if_empty=True))
        with_lock_retries(engine, settings, lambda conn: installation.discard_unused_record(conn, settings.policy))
        raise
    finally:
        engine.dispose()


def _migrate(conn, settings, dialect: str) -> None:
    target = destination()
    if target is not None and target is not READ_ONLY:
        # Upgrading: refuse a database that is not Airflow's before writing anything to it.
        catalog.table_columns(conn, settings.policy)
        conn.rollback()
    if target is not READ_ONLY:
        # A revision over a guard in place (0002 re-renders it) keeps the recorded mode, protect
        # list and rules that the command did not name, as ti-guard install does.
        settings = replace(settings, policy=settings.over(catalog.recorded_policy(conn, settings.policy)))
        conn.rollback()
    # Read-only commands leave the database as it was: no version table either (check, history -i).
    _configure(settings, dialect, connection=conn, dont_mutate=target is READ_ONLY)
    with context.begin_transaction():
        context.run_migrations()
    if target is not READ_ONLY and not context.get_context().get_current_heads():
        # At base: remove the version table too, so that nothing of ours is left.
        drop_version_table(conn, settings.policy)


def version_column_as_text(op, policy) -> None:
    """PostgreSQL: Alembic stamps a later revision with `UPDATE ... WHERE version_num = '0001'`, and
    its varchar(32) column against an untyped literal lets an exact-match `=(varchar, varchar)` that a
    role planted in a schema on the installer's search_path (public on PostgreSQL < 15) win over
    pg_catalog's, running as the installer (tests/test_security.py). Against text, pg_catalog's
    `text = text` is the exact match. Run before the first UPDATE stamp, online and offline alike."""
    if op.get_context().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE {_version_table_sql(policy, 'postgresql')} ALTER COLUMN version_num TYPE text")


def _version_table_sql(policy, dialect: str) -> str:
    from sqlalchemy.dialects import registry

    prep = registry.load(dialect)().identifier_preparer
    schema = policy.db_schema
    return (f"{prep.quote_schema(schema)}." if schema else "") + prep.quote(VERSION_TABLE)


def drop_version_table(conn, policy, only_if_empty: bool = False) -> None:
    schema = policy.db_schema
    table = sa.Table(VERSION_TABLE, sa.MetaData(), sa.Column("version_num", sa.String(32)), schema=schema)
    if only_if_empty and sa.inspect(conn).has_table(VERSION_TABLE, schema=schema):
        if conn.execute(sa.select(sa.func.count()).select_from(table)).scalar():
            return
    table.drop(conn, checkfirst=True)
    conn.commit()
