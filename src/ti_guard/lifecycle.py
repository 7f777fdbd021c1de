"""install / uninstall / status as the CLI runs them: the Alembic revisions, then a reconcile.

`alembic upgrade head` does nothing at head, yet the guard can still be wrong there: settings
changed (a new --mode), or Airflow's SQLite batch migration dropped the triggers. So after
the revisions, install reconciles with the same function the revision runs.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field, replace

import sqlalchemy as sa
from alembic import command

from . import catalog, installation, record
from .config import require_existing
from .db import make_engine, with_lock_retries
from .errors import GuardError
from .migration_env import drop_version_table
from .policy import VERSION_TABLE, Policy
from .revisions import alembic_config, head_revision
from .status import Report, check


def _engine(settings, writes=False):
    """An engine on an existing database: a SQLite URL naming no file is refused, not created."""
    require_existing(settings)
    return make_engine(settings.url, writes=writes)


def _reconcile(conn, work):
    with conn.begin():
        return work(installation.operations(conn))


@dataclass
class Outcome:
    """What install or uninstall did: `changed` is false when the database already was as asked."""

    changed: bool
    actions: list[str]
    summary: str
    policy: Policy | None
    extra: dict = field(default_factory=dict)  # uninstall: what became of the record


@dataclass(frozen=True)
class _Snapshot:
    objects: dict  # name -> (kind, definition, enabled)
    tables: frozenset
    settings: tuple
    version: str | None


def _snapshot(conn, policy: Policy) -> _Snapshot:
    inspector = sa.inspect(conn)
    ours = [catalog.settings_table(policy), *record.tables(policy)]
    recorded = catalog.read_settings(conn, policy) or {}
    snap = _Snapshot(
        objects={n: (o.kind, o.definition, o.enabled) for n, o in catalog.read(conn, policy).items()},
        tables=frozenset(t.name for t in ours if inspector.has_table(t.name, schema=t.schema)),
        settings=tuple(sorted((k, str(v)) for k, v in recorded.items() if k != "installed_at")),
        version=catalog.revision(conn, VERSION_TABLE, policy.db_schema),
    )
    conn.rollback()
    return snap


def _differences(before: _Snapshot, after: _Snapshot) -> list[str]:
    """One line per object or table that came, went or changed between two snapshots."""
    lines = [f"created table {t}" for t in sorted(after.tables - before.tables)]
    for name, (kind, definition, enabled) in after.objects.items():
        old = before.objects.get(name)
        if old is None:
            lines.append(f"created {kind} {name}")
        elif old[1] != definition:
            lines.append(f"replaced {kind} {name}")
        elif old[2] != enabled:
            lines.append(f"enabled {kind} {name}")
    lines += [f"dropped {before.objects[n][0]} {n}" for n in before.objects if n not in after.objects]
    lines += [f"dropped table {t}" for t in sorted(before.tables - after.tables)]
    return lines


def install(settings) -> Outcome:
    engine = _engine(settings, writes=True)
    try:
        recorded = with_lock_retries(engine, settings, lambda conn: catalog.recorded_policy(conn, settings.policy))
        settings = replace(settings, policy=settings.over(recorded))
        before = with_lock_retries(engine, settings, lambda conn: _snapshot(conn, settings.policy))
        command.upgrade(alembic_config(settings), "head")
        try:
            done = with_lock_retries(engine, settings, lambda conn: _reconcile(conn, lambda op: installation.install(op, settings.policy)))
        except Exception:
            with_lock_retries(engine, settings, lambda conn: installation.discard_unused_record(conn, settings.policy))
            raise
        after = with_lock_retries(engine, settings, lambda conn: _snapshot(conn, settings.policy))
    finally:
        engine.dispose()
    changed = before != after
    # The reconcile's own lines say why (a hand-made change, a lost DEFINER); the migration's are read from the catalog.
    actions = done or _differences(before, after)
    summary = f"ti_guard {'installed' if changed else 'already installed, nothing changed'} on {settings.safe_url}: {settings.policy.describe()}"
    return Outcome(changed, actions, summary, settings.policy)


def uninstall(settings, keep_record: bool = False, export_to: str | None = None) -> Outcome:
    engine = _engine(settings, writes=True)
    try:
        before = with_lock_retries(engine, settings, lambda conn: _snapshot(conn, settings.policy))
        held = with_lock_retries(engine, settings, lambda conn: installation.record_held(conn, settings.policy))
        if export_to:
            rows = with_lock_retries(engine, settings, lambda conn: installation.record_rows(conn, settings.policy))
            _export(export_to, settings, rows)  # before anything is removed: a failure changes nothing
        cfg = alembic_config(settings)
        cfg.attributes["ti_guard_keep_record"] = keep_record
        command.downgrade(cfg, "base")
        # Sweep what an interrupted install left outside the revision history.
        with_lock_retries(engine, settings, lambda conn: _reconcile(conn, lambda op: installation.uninstall(op, settings.policy, keep_record)))
        with_lock_retries(engine, settings, lambda conn: drop_version_table(conn, settings.policy))
        after = with_lock_retries(engine, settings, lambda conn: _snapshot(conn, settings.policy))
    finally:
        engine.dispose()
    counted = {h["table"]: f" ({h['rows']} row(s), {h['refusals']} refusal(s))" for h in held}
    actions = [line + counted.get(line.rsplit(" ", 1)[-1], "") for line in _differences(before, after)]
    actions += [f"kept table {t}{counted.get(t, '')} (--keep-record)" for t in sorted(after.tables)]
    if export_to:
        actions.append(f"wrote the record of refusals to {export_to}")
    record_fate = {"kept": keep_record, "exported_to": export_to, "tables": held}
    return Outcome(before != after, actions, f"ti_guard removed from {settings.safe_url}", None, {"record": record_fate})


def _export(path: str, settings, rows: dict) -> None:
    from .report import iso

    doc = {
        "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "url": settings.safe_url,
        "tables": {name: [{k: iso(v) for k, v in row.items()} for row in table] for name, table in rows.items()},
    }
    try:
        with open(path, "x", encoding="utf-8") as out:  # never overwrite: it may be an earlier export
            json.dump(doc, out, indent=2, default=str)
    except OSError as exc:
        raise GuardError(f"cannot write the record to {path}: {exc.strerror}; name a new file in a writable directory (nothing was removed)") from None


def doctor(settings):
    from .doctor import diagnose

    engine = _engine(settings)
    try:
        with engine.connect() as conn:
            policy = settings.over(_recorded_or_none(conn, settings.policy))
            try:
                return diagnose(conn, settings, policy, head_revision())
            finally:
                conn.rollback()  # doctor only reads
    finally:
        engine.dispose()


def _recorded_or_none(conn, policy: Policy) -> Policy | None:
    try:
        return catalog.recorded_policy(conn, policy)
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
