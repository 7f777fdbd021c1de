"""Drives real Airflow against real metadata databases, with and without the guard, and keeps what it saw.

One `Combo` is one Airflow version on one backend: a fresh metadata DB migrated by `airflow db
migrate`, one long-lived runner process in the Airflow venv (runner.py), and the variants run in
turn on that DB: `none` (no guard), `raise`, `ignore` (the guard installed with the project's
`alembic upgrade head`, as a user would). Each variant runs every DAG anew (new DAG runs), so each
variant's states are compared with the `none` runs of the same database. A second fresh DB
checks the upgrade path: an older Airflow schema, the guard, then `airflow db migrate`.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import sqlalchemy as sa

import airflow_venv
from conftest import dialect_of
from ti_guard import airflow_writes, catalog
from ti_guard.db import make_engine, run_sql, scratch_database
from ti_guard.policy import Policy
from ti_guard.render.mysql import BYPASS_VARIABLE

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PROJECT_BIN = Path(sys.executable).parent
DAGS = (
    "tg_skip_exception",
    "tg_branch",
    "tg_short_circuit",
    "tg_sensor_soft_fail",
    "tg_mapped_skip",
    "tg_trigger_rule_after_skip",
    "tg_fail",
    "tg_retry",
)
VARIANTS = ("none", "raise", "ignore")
# TaskInstance.set_state on a finished TI: an operator's deliberate mark, which goes through.
MARK_PLAIN = {"dag_id": "tg_branch", "task_id": "taken", "state": "skipped"}
# The racy route: a running task (a worker started it), a task not yet scheduled, a finished one.
ROUTE = {"dag_id": "tg_short_circuit", "caller": "gate", "prepare": {"after_gate": "running", "further": None},
         "tasks": ["after_gate", "further", "gate"]}
# The exact pre-fix UPDATE, over three map indexes of one run: running, not yet scheduled, success.
REPLAY_DAG, REPLAY_TASK, REPLAY_RUNNING, REPLAY_UNSCHEDULED, REPLAY_FINISHED = "tg_mapped_skip", "odd_ones_skip", 0, 1, 2


def older_version(version: str) -> str:
    """The schema an upgrade starts from: the previous minor's first release (3.0 goes back to 2.10.3)."""
    major, minor, _ = (int(p) for p in version.split("."))
    return f"{major}.{minor - 1}.0" if minor else "2.10.3"


def say(message: str) -> None:
    # pytest captures sys.stderr; CI logs need the real one to show progress.
    print(message, file=sys.__stderr__, flush=True)


class Database:
    """A uniquely named, empty database (a file for SQLite), with the URLs each side needs."""

    def __init__(self, backend: str, admin_urls: dict, workdir: Path, label: str):
        self.backend = backend  # the backend id: postgresql, mysql (MariaDB), mysql9 (MySQL 9.7), sqlite
        self.dialect = dialect_of(backend)
        self._scratch = contextlib.ExitStack()
        if backend == "sqlite":
            path = workdir / f"{label}.db"
            self.url = self.airflow_url = f"sqlite:///{path}"
            return
        self.url = self._scratch.enter_context(scratch_database(admin_urls[backend], "ti_guard_af"))
        # Airflow is driven with the drivers its docs name: psycopg2 and PyMySQL.
        driver = "postgresql+psycopg2" if backend == "postgresql" else "mysql+pymysql"
        self.airflow_url = sa.engine.make_url(self.url).set(drivername=driver).render_as_string(hide_password=False)

    def drop(self):
        self._scratch.close()

    def server_version(self) -> str:
        engine = make_engine(self.url)
        try:
            with engine.connect() as conn:
                query = {"postgresql": "SHOW server_version", "mysql": "SELECT VERSION()", "sqlite": "SELECT sqlite_version()"}
                return f"{self.backend} {conn.exec_driver_sql(query[self.dialect]).scalar()}"
        finally:
            engine.dispose()

    def guard_triggers(self) -> int:
        """Counted straight from the catalog, so `ti-guard status` is checked against something else."""
        engine = make_engine(self.url)
        try:
            with engine.connect() as conn:
                return sum(obj.kind == "trigger" for obj in catalog.read(conn, Policy.build()).values())
        finally:
            engine.dispose()

    def task_instance_columns(self):
        engine = make_engine(self.url)
        try:
            return [c["name"] for c in sa.inspect(engine).get_columns("task_instance")]
        finally:
            engine.dispose()

    def table_identity(self):
        """What changes when task_instance is dropped and created again (SQLite's batch migrations),
        and not when it is altered: SQLite's catalog row and root page, PostgreSQL's oid. None on MySQL, where
        Airflow's migrations alter tables in place (ALTER TABLE keeps triggers)."""
        if self.dialect == "mysql":
            return None
        engine = make_engine(self.url)
        try:
            with engine.connect() as conn:
                query = ("SELECT rowid, rootpage FROM sqlite_master WHERE type = 'table' AND name = 'task_instance'" if self.dialect == "sqlite"
                         else "SELECT 'task_instance'::regclass::oid, 0")
                return tuple(conn.exec_driver_sql(query).one())
        finally:
            engine.dispose()

    def airflow_revision(self):
        engine = make_engine(self.url)
        try:
            with engine.connect() as conn:
                return conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
        finally:
            engine.dispose()


class Airflow:
    """Airflow's CLI and the runner, for one version and one metadata DB."""

    def __init__(self, venv: Path, db: Database, home: Path):
        self.python = str(airflow_venv.python_of(venv))
        home.mkdir(parents=True, exist_ok=True)
        self.home, self.log = home, home / "airflow.log"
        self.env = {
            **os.environ,
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": db.airflow_url,
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(HERE / "dags"),
        }
        self.proc = None

    def cli(self, *args) -> int:
        with open(self.log, "a") as log:
            log.write(f"\n$ airflow {' '.join(args)}\n")
            log.flush()
            return subprocess.run([self.python, "-m", "airflow", *args], env=self.env, stdout=log, stderr=log).returncode

    def start(self):
        read_fd, write_fd = os.pipe()
        log = open(self.log, "a")
        self.proc = subprocess.Popen(
            [self.python, str(HERE / "runner.py"), str(write_fd)],
            env=self.env, stdin=subprocess.PIPE, stdout=log, stderr=log, pass_fds=(write_fd,), text=True,
        )
        os.close(write_fd)
        self.replies = os.fdopen(read_fd)
        self._reply("start")

    def ask(self, op: str, **request):
        self.proc.stdin.write(json.dumps({"op": op, **request}) + "\n")
        self.proc.stdin.flush()
        return self._reply(op)

    def _reply(self, op):
        line = self.replies.readline()
        if not line:
            raise RuntimeError(f"the Airflow runner died during {op}: see {self.log}")
        answer = json.loads(line)
        if isinstance(answer, dict) and "crash" in answer:
            raise RuntimeError(f"the Airflow runner crashed in {op}:\n{answer['crash']}")
        return answer

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def project_tool(*args) -> tuple[int, str]:
    """The project's own CLIs, from the project's venv (never Airflow's)."""
    done = subprocess.run([str(PROJECT_BIN / args[0]), *args[1:]], capture_output=True, text=True, cwd=REPO)
    return done.returncode, (done.stdout + done.stderr).strip()


def alembic(url, *args) -> tuple[int, str]:
    return project_tool("alembic", "-c", str(REPO / "alembic.ini"), "-x", f"url={url}", *args)


def install_guard(db: Database, variant: str, fresh=False) -> dict:
    """Exactly what a user runs: alembic upgrade head; a mode change is downgrade base + upgrade head."""
    before = db.airflow_revision()
    steps = []
    if variant == "ignore" and fresh:
        steps.append(alembic(db.url, "-x", "mode=ignore", "upgrade", "head"))
    elif variant == "ignore":
        steps.append(alembic(db.url, "downgrade", "base"))
        steps.append(alembic(db.url, "-x", "mode=ignore", "upgrade", "head"))
    elif variant == "raise":
        steps.append(alembic(db.url, "-x", "mode=raise", "upgrade", "head"))
    failed = [out for rc, out in steps if rc != 0]
    return {"airflow_revision_before": before, "airflow_revision_after": db.airflow_revision(), "errors": failed}


def guard_status(db: Database) -> dict:
    rc, out = project_tool("ti-guard", "status", "--url", db.url)
    return {"rc": rc, "output": out}


def bypass_statements(db: Database, variant: str) -> dict:
    """docs/repairs.md, the bypass, as SQL run inside Airflow's own set_state transaction."""
    if variant == "none":
        return {"before": [], "after": []}
    policy = Policy.build()
    if db.dialect == "postgresql":
        return {"before": ["SELECT set_config('ti_guard.bypass', 'on', true)"], "after": []}
    engine = make_engine(db.url)
    try:
        with engine.connect() as conn:
            quote = conn.dialect.identifier_preparer.quote
            if db.dialect == "mysql":
                # Counts for an account with TRIGGER on the table (the harness's root).
                return {"before": [f"SET {BYPASS_VARIABLE} = 'on'"], "after": [f"SET {BYPASS_VARIABLE} = NULL"]}
            triggers = {name: obj for name, obj in catalog.read(conn, policy).items() if obj.kind == "trigger"}
    finally:
        engine.dispose()
    # pysqlite opens its transaction only at the first DML: a no-op UPDATE first puts the DROPs inside it.
    return {
        "before": [f"UPDATE {quote(policy.table)} SET state = state WHERE 1 = 0"] + [f"DROP TRIGGER {quote(n)}" for n in triggers],
        "after": [obj.definition for obj in triggers.values()],
    }


def db_message(exc: sa.exc.DBAPIError) -> str:
    """The server's message as a client shows it (PyMySQL keeps it in args[1], after the errno)."""
    args = exc.orig.args
    return str(args[1] if len(args) == 2 and isinstance(args[0], int) else exc.orig).strip().splitlines()[0]


def replay_racy_update(db: Database, run_id: str, bypass: dict | None = None) -> dict:
    """The pre-fix skip writer's exact UPDATE (ti_guard.airflow_writes.racy_skip) on Airflow's own rows
    (one running, one not yet scheduled, one finished), inside `bypass`'s statements when given."""
    bypass = bypass or {"before": [], "after": []}
    engine = make_engine(db.url)
    table = sa.Table("task_instance", sa.MetaData(), autoload_with=engine)
    keys = {"running": REPLAY_RUNNING, "unscheduled": REPLAY_UNSCHEDULED, "finished": REPLAY_FINISHED}
    key = {role: airflow_writes.key_of(table, REPLAY_DAG, REPLAY_TASK, run_id, idx) for role, idx in keys.items()}

    def states():
        with engine.connect() as conn:
            return {role: conn.execute(sa.select(table.c.state).where(k)).scalar() for role, k in key.items()}

    try:
        with engine.begin() as conn:
            conn.execute(airflow_writes.worker_start(table, key["running"]))
            conn.execute(sa.update(table).where(key["unscheduled"]).values(state=None, start_date=None, end_date=None))
            conn.execute(sa.update(table).where(key["finished"], table.c.state != "success").values(state="success"))
        before = states()
        try:
            with engine.begin() as conn:
                for sql in bypass["before"]:
                    run_sql(conn, sql)
                conn.execute(airflow_writes.racy_skip(table, REPLAY_DAG, run_id, [(REPLAY_TASK, i) for i in keys.values()]))
                for sql in bypass["after"]:
                    run_sql(conn, sql)
            error = None
        except sa.exc.DBAPIError as exc:
            error = db_message(exc)
        return {"before": before, "error": error, "after": states()}
    finally:
        engine.dispose()


def run_combo(version: str, backend: str, admin_urls: dict, workdir: Path) -> dict:
    """Everything the tests assert on for one version x backend, as plain data."""
    tag = f"[airflow {version} {backend}]"
    started = time.monotonic()
    venv = airflow_venv.ensure(version, say=say)
    result = {"version": version, "backend": backend, "variants": {}, "route_racy": route_is_racy(venv), "timings": {}}
    lap = _stopwatch(result["timings"])
    db = Database(backend, admin_urls, workdir, "main")
    airflow = Airflow(venv, db, workdir / "home")
    try:
        say(f"{tag} airflow db migrate")
        result["migrate_rc"] = airflow.cli("db", "migrate")
        result["head"], result["server"] = db.airflow_revision(), db.server_version()
        airflow.start()
        lap("migrate + runner start")
        for variant in VARIANTS:
            say(f"{tag} variant {variant}: guard, DAGs, Airflow's writers")
            out = result["variants"][variant] = {"install": install_guard(db, variant), "status": guard_status(db)}
            out["dags"] = airflow.ask("dags", dags=list(DAGS))
            lap(f"{variant}: install + DAGs")
            out["mark_plain"] = airflow.ask("set_state", **MARK_PLAIN)
            out["route_skip"] = airflow.ask("route_skip", **ROUTE)
            out["replay"] = replay_racy_update(db, out["dags"][REPLAY_DAG]["run_id"])
            # The same UPDATE, which the guard refuses (raise) or keeps (ignore), under the bypass.
            out["replay_bypassed"] = replay_racy_update(db, out["dags"][REPLAY_DAG]["run_id"], bypass_statements(db, variant))
            lap(f"{variant}: writers")
        airflow.stop()
        result["upgrade"] = upgrade_with_guard(version, db, airflow, tag)
        lap("upgrade path")
    finally:
        if airflow.proc and airflow.proc.poll() is None:
            airflow.proc.kill()
        db.drop()
    result["seconds"] = round(time.monotonic() - started, 1)
    say(f"{tag} done in {result['seconds']} s")
    return result


def _stopwatch(into: dict):
    last = [time.monotonic()]

    def lap(name):
        now = time.monotonic()
        into[name], last[0] = round(now - last[0], 1), now

    return lap


def upgrade_with_guard(version, db: Database, airflow: Airflow, tag) -> dict:
    """A user upgrading Airflow with the guard in place: the previous minor's schema, guard, `db migrate`.

    The older schema comes from `airflow db downgrade` (3.1 ignores --to-version on an empty DB).
    The guard goes in in ignore mode, whose MySQL trigger lists task_instance's columns.
    """
    start = older_version(version)
    say(f"{tag} upgrade path: downgrade to {start}, guard (ignore), airflow db migrate")
    out = {"from": start, "uninstall": alembic(db.url, "downgrade", "base")[0]}
    out["downgrade_rc"] = airflow.cli("db", "downgrade", "--to-version", start, "--yes")
    columns_before = db.task_instance_columns()
    out["install"] = install_guard(db, "ignore", fresh=True)
    out["status_before"] = guard_status(db)
    identity_before = db.table_identity()
    out["rc"] = airflow.cli("db", "migrate")
    out["head_after"] = db.airflow_revision()
    out["columns_changed"] = db.task_instance_columns() != columns_before
    out["recreated"] = identity_before is not None and db.table_identity() != identity_before
    out["triggers_left"] = db.guard_triggers()
    out["status_after"] = guard_status(db)
    out["writes_after_migrate"] = writes_on_a_finished_row(db)
    # The remedy `status` names: install again, then it must say current.
    out["reinstall"] = project_tool("ti-guard", "install", "--url", db.url)[0]
    out["status_repaired"] = guard_status(db)
    out["writes_after_repair"] = writes_on_a_finished_row(db)
    return out


def writes_on_a_finished_row(db: Database) -> dict:
    """On one finished task instance of Airflow's own table, each write in its own transaction, the
    row put back after each: the pre-fix racy skip, the pre-3.3 stale schedule_tis (both kept by the
    ignore-mode guard), and an operator's mark of it to the other final state (goes through).
    {write: {"error": message or None, "after": state}} and the row's "state"."""
    engine = make_engine(db.url)
    table = sa.Table("task_instance", sa.MetaData(), autoload_with=engine)
    c = table.c
    try:
        with engine.connect() as conn:
            # A success row first: on Airflow 2 tables a failed one is spared by stale_schedule (backfill's
            # --rerun-failed-tasks), so which row the server returned first would decide the outcome.
            row = conn.execute(sa.select(c.dag_id, c.task_id, c.run_id, c.map_index, c.state, c.try_number)
                               .where(c.state.in_(["success", "failed"])).order_by(sa.case((c.state == "success", 0), else_=1)).limit(1)).first()
        if row is None:
            return {"error": "no finished task instance to write to"}
        key = airflow_writes.key_of(table, row.dag_id, row.task_id, row.run_id, row.map_index)
        other = "failed" if row.state == "success" else "success"
        writes = {"racy skip": airflow_writes.racy_skip(table, row.dag_id, row.run_id, [(row.task_id, row.map_index)]),
                  "stale schedule_tis": airflow_writes.schedule_tis(table, key),
                  "operator mark": airflow_writes.set_state(table, key, other)}
        out = {"state": row.state, "other": other}
        for name, statement in writes.items():
            try:
                with engine.begin() as conn:
                    conn.execute(statement)
                error = None
            except sa.exc.DBAPIError as exc:
                error = db_message(exc)
            with engine.begin() as conn:
                out[name] = {"error": error, "after": conn.execute(sa.select(c.state).where(key)).scalar()}
                conn.execute(sa.update(table).where(key).values(state=row.state, try_number=row.try_number))
        return out
    finally:
        engine.dispose()


def route_is_racy(venv: Path) -> bool:
    """Read the installed skip writer's source (Airflow 3's execution API route, Airflow 2's
    `SkipMixin._set_state_to_skipped`): does its UPDATE lack a filter on the current state (pre-fix)?"""
    site = next(venv.glob("lib/python*/site-packages/airflow"))
    route = site / "api_fastapi" / "execution_api" / "routes" / "task_instances.py"
    if route.exists():
        body = route.read_text().split("def ti_skip_downstream(", 1)[1].split("\n@", 1)[0]
        return "TI.state" not in body
    body = (site / "models" / "skipmixin.py").read_text().split("def _set_state_to_skipped(", 1)[1].split("\n    def ", 1)[0]
    return "TaskInstance.state" not in body
