"""`ti-guard`: a thin CLI over the Alembic migrations, the status check and the demo."""

from __future__ import annotations

import argparse
import json
import sys

from alembic import command
from alembic.util import CommandError

from . import config as config_mod
from .errors import GuardError, explain
from .policy import MODES
from .revisions import alembic_config

EXIT_ERROR = 2


def _settings(args, need_url=True):
    return config_mod.resolve(
        url=args.url,
        schema=args.schema,
        mode=getattr(args, "mode", None),
        protect=getattr(args, "protect", None),
        table=args.table,
        lock_timeout=getattr(args, "lock_timeout", None),
        lock_retries=getattr(args, "lock_retries", None),
        need_url=need_url,
    )


def cmd_install(args) -> int:
    from .lifecycle import install

    for line in install(_settings(args), explicit_policy=args.mode is not None or args.protect is not None):
        print(line)
    return 0


def cmd_uninstall(args) -> int:
    from .lifecycle import uninstall

    for line in uninstall(_settings(args)):
        print(line)
    return 0


def _checked(settings, run, title, fmt="text") -> int:
    """A Nagios-style check: a heading, one line per finding, the report's code (3 when it cannot run)."""
    try:
        report = run()
    except Exception as exc:  # noqa: BLE001 - unknown is an answer too (Nagios 3)
        report, heading = None, explain(exc, settings.policy.table)
    else:
        heading = title(report)
    code, word, lines = (report.code, report.word, report.lines) if report else (3, "unknown", [])
    if fmt == "json":
        policy = report.policy if report and report.policy else settings.policy
        print(json.dumps({
            "status": word, "code": code, "summary": heading, "url": settings.safe_url, "findings": lines,
            "mode": policy.mode, "protect": list(policy.protect), "schema": policy.schema, "table": policy.table,
        }, indent=2))
        return code
    print(f"{word.upper()}: {heading}")
    for line in lines:
        print(f"  {line}")
    return code


def cmd_status(args) -> int:
    from .lifecycle import status

    settings = _settings(args)
    title = lambda r: f"ti_guard on {settings.safe_url} ({r.policy.describe()})"  # noqa: E731
    return _checked(settings, lambda: status(settings), title, args.format)


def cmd_doctor(args) -> int:
    from .lifecycle import doctor

    settings = _settings(args)
    explicit = args.mode is not None or args.protect is not None
    return _checked(settings, lambda: doctor(settings, explicit_policy=explicit), lambda r: f"ti-guard doctor on {settings.safe_url}", args.format)


def cmd_report(args) -> int:
    from . import report
    from .lifecycle import report as gather

    settings = _settings(args)
    since = report.parse_since(args.since)
    found = gather(settings, since)
    if args.format == "json":
        print(report.as_json(found))
    elif args.format == "prometheus":
        print(report.as_prometheus(found), end="")
    else:
        print(report.as_text(found, settings.safe_url))
    return found.status_code


def cmd_sql(args) -> int:
    settings = _settings(args, need_url=False)
    dialect = args.dialect or (settings.url and settings.url.split(":", 1)[0])
    if not dialect:
        raise GuardError("name a dialect: ti-guard sql --dialect postgresql|mysql|sqlite (or give --url)")
    cfg = alembic_config(settings, dialect=dialect)
    if args.uninstall:
        command.downgrade(cfg, "head:base", sql=True)
    else:
        command.upgrade(cfg, "head", sql=True)
    return 0


def cmd_set_state(args) -> int:
    from .db import make_engine
    from .runtime import set_state

    settings = _settings(args)
    engine = make_engine(settings.url, writes=True)
    try:
        print(set_state(engine, settings.policy, args.dag_id, args.task_id, args.run_id, args.map_index, args.state))
    finally:
        engine.dispose()
    return 0


def cmd_demo(args) -> int:
    from .demo import run

    return run()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ti-guard",
        description="Guard Airflow's task_instance against skips that overwrite started or finished tasks.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, policy=True, lock=False):
        p.add_argument("--url", help="database URL (default: TI_GUARD_URL, then Airflow's own setting)")
        p.add_argument("--schema", help="schema of task_instance (PostgreSQL; default: Airflow's setting)")
        p.add_argument("--table", help=argparse.SUPPRESS)
        if policy:
            p.add_argument("--mode", choices=MODES, help="ignore (default): a refused row is kept as it was and recorded; raise: a racy skip route fails its statement (rules that Airflow's scheduler meets only ever keep); audit: every write goes through and each one the guard would refuse is recorded")
            p.add_argument("--protect", help="comma-separated states a skip may not overwrite (default running,success,failed)")
        if lock:
            p.add_argument("--lock-timeout", type=float, help="seconds to wait for the table lock per attempt (default 2)")
            p.add_argument("--lock-retries", type=int, help="attempts before giving up (default 5)")

    p = sub.add_parser("install", help="install or update the guard (alembic upgrade head, then reconcile settings)")
    common(p, lock=True)
    p.set_defaults(func=cmd_install)
    p = sub.add_parser("uninstall", help="remove every ti_guard object (alembic downgrade base)")
    common(p, policy=False, lock=True)
    p.set_defaults(func=cmd_uninstall)
    p = sub.add_parser("status", help="installed/current (0), installed/outdated (1), missing (2), unknown (3)")
    common(p, policy=False)
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("doctor", help="preflight: server, privileges, Airflow's tables, lock risk, binary log, definer, what install would do")
    common(p, lock=True)
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=cmd_doctor)
    p = sub.add_parser("report", help="what the guard refused: counts by day, rule and old state, top DAGs and tasks, the latest refusals (exits as status)")
    common(p, policy=False)
    p.add_argument("--since", default="24h", help="how far back: 30m, 24h (default), 7d, 2w")
    p.add_argument("--format", choices=("text", "json", "prometheus"), default="text")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("sql", help="print the DDL for review or for a DBA")
    common(p)
    p.add_argument("--dialect", choices=("postgresql", "mysql", "sqlite"))
    p.add_argument("--uninstall", action="store_true", help="print the removal script instead")
    p.set_defaults(func=cmd_sql)
    p = sub.add_parser("set-state", help="deliberate repair: set one task instance's state past the guard")
    common(p, policy=False)
    p.add_argument("--dag-id", required=True)
    p.add_argument("--task-id", required=True)
    p.add_argument("--run-id", required=True)
    p.add_argument("--map-index", type=int, default=-1)
    p.add_argument("--state", required=True)
    p.set_defaults(func=cmd_set_state)
    p = sub.add_parser("demo", help="replay the race on a throw-away SQLite database (no server needed)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (GuardError, CommandError) as exc:
        print(f"ti-guard: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - a driver error still gets one line
        print(f"ti-guard: error: {explain(exc)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
