"""install / uninstall / status as the CLI runs them: the Alembic revisions, then a reconcile.

`alembic upgrade head` does nothing at head, yet the guard can still be wrong there: settings
changed (a new --mode), or Airflow's SQLite batch migration dropped the triggers. So after
the revisions, install reconciles with the same function the revision runs.
"""

from __future__ import annotations

from dataclasses import replace

from alembic import command

from . import catalog, installation
from .config import require_existing
from .db import make_engine, with_lock_retries
from .migration_env import drop_version_table
from .policy import Policy
from .revisions import alembic_config, head_revision
from .status import Report, check


def _engine(settings, writes=False):
    """An engine on an existing database: a SQLite URL naming no file is refused, not created."""
    require_existing(settings)
    return make_engine(settings.url, writes=writes)


def _reconcile(conn, work):
    with conn.begin():
        return work(installation.operations(conn))


def install(settings, explicit_policy: bool) -> list[str]:
    engine = _engine(settings, writes=True)
    try:
        recorded = with_lock_retries(engine, settings, lambda conn: _recorded(conn, settings.policy))
        if recorded and not explicit_policy:
            # No --mode/--protect given: keep what is installed rather than reset it.
            settings = replace(settings, policy=recorded)
        command.upgrade(alembic_config(settings), "head")
        try:
            done = with_lock_retries(engine, settings, lambda conn: _reconcile(conn, lambda op: installation.install(op, settings.policy)))
        except Exception:
            with_lock_retries(engine, settings, lambda conn: installation.discard_unused_record(conn, settings.policy))
            raise
    finally:
        engine.dispose()
    return done + [f"ti_guard installed on {settings.safe_url}: {settings.policy.describe()}"]


def uninstall(settings) -> list[str]:
    engine = _engine(settings, writes=True)
    try:
        command.downgrade(alembic_config(settings), "base")
        # Sweep what an interrupted install left outside the revision history.
        done = with_lock_retries(engine, settings, lambda conn: _reconcile(conn, lambda op: installation.uninstall(op, settings.policy)))
        with_lock_retries(engine, settings, lambda conn: drop_version_table(conn, settings.policy))
    finally:
        engine.dispose()
    return done + [f"ti_guard removed from {settings.safe_url}"]


def doctor(settings, explicit_policy: bool):
    from .doctor import diagnose

    engine = _engine(settings)
    try:
        with engine.connect() as conn:
            policy = (None if explicit_policy else _recorded_or_none(conn, settings.policy)) or settings.policy
            try:
                return diagnose(conn, settings, policy, head_revision())
            finally:
                conn.rollback()  # doctor only reads
    finally:
        engine.dispose()


def _recorded_or_none(conn, policy: Policy) -> Policy | None:
    try:
        return _recorded(conn, policy)
    except Exception:  # noqa: BLE001 - no table yet, no privilege: doctor reports those itself
        conn.rollback()
        return None


def status(settings) -> Report:
    engine = _engine(settings)
    try:
        with engine.connect() as conn:
            return check(conn, settings.policy, head_revision())
    finally:
        engine.dispose()


def report(settings, since):
    """The record of refusals over `since`, with the guard's status (whose code report exits with)."""
    from .report import gather

    engine = _engine(settings)
    try:
        with engine.connect() as conn:
            found = check(conn, settings.policy, head_revision())
            return gather(conn, found.policy or settings.policy, since, found)
    finally:
        engine.dispose()


def _recorded(conn, policy: Policy) -> Policy | None:
    row = catalog.read_settings(conn, policy)
    if row is None:
        return None
    return Policy.build(protect=row["protect"], mode=row["mode"], schema=policy.schema, table=policy.table)
