"""`ti-guard`: a thin CLI over the Alembic migrations, the status check and the demo."""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import sys

from alembic import command
from alembic.util import CommandError

from . import config as config_mod
from .errors import GuardError, explain
from .policy import MODES, RULE_NAMES
from .revisions import alembic_config

EXIT_ERROR = 2
EXIT_CHANGED = 1  # install / uninstall --detailed-exitcode: something was changed
EXIT_PIPE = 128 + 13  # stdout closed early (| head): as a process killed by SIGPIPE


def _settings(args, need_url=True):
    settings = config_mod.resolve(
        url=args.url,
        schema=args.schema,
        mode=getattr(args, "mode", None),
        protect=getattr(args, "protect", None),
        rules=getattr(args, "rules", None),
        table=args.table,
        lock_timeout=getattr(args, "lock_timeout", None),
        lock_retries=getattr(args, "lock_retries", None),
        need_url=need_url,
    )
    if need_url:
        config_mod.require_existing(settings)  # never create a SQLite file by connecting to it
    return settings


def envelope(command: str, settings, code: int, status: str, summary: str, policy) -> dict:
    """The keys every --format json document starts with (docs/operations.md, "JSON and exit codes");
    policy: the guard's (doctor: the one install would use), None when there is none to name."""
    return {
        "command": command,
        "code": code,
        "status": status,
        "summary": summary,
        "url": settings.safe_url,
        "url_source": settings.url_source,
        "generated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "mode": policy.mode if policy else None,
        "protect": list(policy.protect) if policy else None,
        "rules": list(policy.switched_on) if policy else None,
        "schema": settings.policy.schema,
        "table": settings.policy.table,
    }


def _print_json(doc: dict) -> None:
    print(json.dumps(doc, indent=2))


def _changes(command: str, args, settings, outcome) -> int:
    """install / uninstall: what was done, whether anything changed, and the exit code for it."""
    code = EXIT_CHANGED if outcome.changed and args.detailed_exitcode else 0
    status = "changed" if outcome.changed else "unchanged"
    if args.format == "json":
        doc = envelope(command, settings, code, status, outcome.summary, outcome.policy)
        _print_json({**doc, "changed": outcome.changed, "actions": outcome.actions, **outcome.extra})
    else:
        for line in [*outcome.actions, outcome.summary]:
            print(line)
    return code


def cmd_install(args) -> int:
    from .lifecycle import install

    settings = _settings(args)
    return _changes("install", args, settings, install(settings))


def cmd_uninstall(args) -> int:
    from .lifecycle import uninstall

    settings = _settings(args)
    return _changes("uninstall", args, settings, uninstall(settings, keep_record=args.keep_record, export_to=args.export_record))


def _checked(command, settings, run, title, fmt="text") -> int:
    """A Nagios-style check: a heading, one line per finding, the report's code (3 when it cannot run)."""
    try:
        report = run()
    except Exception as exc:  # noqa: BLE001 - unknown is an answer too (Nagios 3)
        report, heading = None, str(explain(exc, settings.policy.table))
    else:
        heading = title(report)
    code, word = (report.code, report.word) if report else (3, "unknown")
    if fmt == "json":
        doc = envelope(command, settings, code, word, heading, report.policy if report else None)
        _print_json({**doc, "findings": [f.as_dict() for f in report.findings] if report else []})
        return code
    print(f"{word.upper()}: {heading}")
    for line in report.lines if report else []:
        print(f"  {line}")
    return code


def cmd_status(args) -> int:
    from .lifecycle import status

    settings = _settings(args)
    # Nothing installed names no mode (report.policy is None then).
    title = lambda r: f"ti_guard on {settings.url_origin}" + (f": {r.policy.describe()}" if r.policy else "")  # noqa: E731
    return _checked("status", settings, lambda: status(settings), title, args.format)


def cmd_doctor(args) -> int:
    from .lifecycle import doctor

    settings = _settings(args)
    return _checked("doctor", settings, lambda: doctor(settings), lambda r: f"ti-guard doctor on {settings.url_origin}", args.format)


def cmd_report(args) -> int:
    from . import report
    from .lifecycle import report as gather

    settings = _settings(args)
    since = report.parse_since(args.since)
    found = gather(settings, since)
    if args.format == "json":
        summary = f"ti-guard report on {settings.url_origin}: {found.since} to {found.until}"
        doc = envelope("report", settings, found.code, found.status, summary, found.policy)
        _print_json({**doc, **report.as_dict(found)})
    elif args.format == "prometheus":
        print(report.as_prometheus(found), end="")
    else:
        print(report.as_text(found, settings.url_origin))
    return found.code


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


def run_alembic(argv: list[str]) -> int:
    """`ti-guard alembic ...`: Alembic's own command line on the revisions in this package, from
    any directory (its alembic.ini ships with it; -c names another)."""
    from alembic.config import CommandLine, Config

    from .revisions import packaged_ini

    line = CommandLine(prog="ti-guard alembic")
    options = line.parser.parse_args(argv)
    if not hasattr(options, "cmd"):
        line.parser.error("name a command: current, history, heads, check, upgrade, downgrade, stamp")
    options.raiseerr = True  # its errors become main's one line and exit 2, not Alembic's FAILED and 255
    line.run_cmd(Config(file_=options.config[0] if options.config else packaged_ini(), ini_section=options.name, cmd_opts=options), options)
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
    parser.add_argument("--version", action="version", version=f"%(prog)s {importlib.metadata.version('ti-guard')}")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, policy=True, lock=False):
        p.add_argument("--url", help="database URL (default: TI_GUARD_URL, then Airflow's own setting)")
        p.add_argument("--schema", help="schema of task_instance (PostgreSQL; default: Airflow's setting)")
        p.add_argument("--table", help=argparse.SUPPRESS)
        if policy:
            p.add_argument("--mode", choices=MODES, help="ignore (default): a refused row is kept as it was and recorded; raise: a racy skip route fails its statement (rules that Airflow's scheduler meets only ever keep); audit: every write goes through and each one the guard would refuse is recorded")
            p.add_argument("--protect", help="comma-separated states a skip may not overwrite (default running,success,failed)")
            p.add_argument("--rules", help=f"comma-separated rules to install: {', '.join(RULE_NAMES)}; all (the default) for every rule, -NAME switches one off (all,-set_state_skip)")
        if lock:
            p.add_argument("--lock-timeout", type=float, help="seconds to wait for the table lock per attempt (default 2)")
            p.add_argument("--lock-retries", type=int, help="attempts before giving up (default 5)")

    def changes(p):
        p.add_argument("--format", choices=("text", "json"), default="text", help="json: one document with \"changed\": true/false")
        p.add_argument("--detailed-exitcode", action="store_true", help="exit 1 when something was changed, 0 when it already was as asked (2: error)")

    p = sub.add_parser("install", help="install or update the guard (alembic upgrade head, then reconcile settings)")
    common(p, lock=True)
    changes(p)
    p.set_defaults(func=cmd_install)
    p = sub.add_parser("uninstall", help="remove every ti_guard object (alembic downgrade base), the record of refusals too unless --keep-record")
    common(p, policy=False, lock=True)
    changes(p)
    p.add_argument("--keep-record", action="store_true", help="leave the record of refusals (ti_guard_refusals, ti_guard_refusal_counts) in place")
    p.add_argument("--export-record", metavar="FILE", help="first write the record of refusals to FILE as JSON (nothing is removed if that fails)")
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
    # main() hands everything after `alembic` to Alembic's own parser; this entry is for --help.
    sub.add_parser("alembic", add_help=False, help="Alembic's own commands on the packaged revisions, from any directory: ti-guard alembic -x url=URL current | history | upgrade head [--sql] | downgrade base | stamp | check")
    p = sub.add_parser("demo", help="replay the race on a throw-away SQLite database (no server needed)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["alembic"]:
        run = lambda: run_alembic(argv[1:])  # noqa: E731
    else:
        args = build_parser().parse_args(argv)
        run = lambda: args.func(args)  # noqa: E731
    try:
        code = run()
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        return _pipe_closed()
    except (GuardError, CommandError) as exc:
        print(f"ti-guard: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - a driver error still gets one line
        print(f"ti-guard: error: {explain(exc)}", file=sys.stderr)
        return EXIT_ERROR


def _pipe_closed() -> int:
    """The reader went away (| head): stop quietly, as a process SIGPIPE ends (Python's documented recipe)."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout replaced (pytest's capture): nothing to silence
        pass
    return EXIT_PIPE


if __name__ == "__main__":
    sys.exit(main())
