"""One real Airflow deployment: api-server, scheduler, dag-processor, triggerer on a scratch metadata DB
(Airflow 2: webserver and scheduler, REST API v1 with basic auth of a user `airflow users create` made).

`Deployment` starts every component as a process group of its own, each writing to its own log
file in the work dir, with LocalExecutor; talks to the public REST API (a token from the simple
auth manager's `GET /auth/token`, which needs no password when `simple_auth_manager_all_admins`
is on, in 3.1 and 3.3 alike); reads task instances, runs and scheduler heartbeats straight from
the database; installs and removes the guard with the project's own `ti-guard` CLI. Every wait
has a deadline: a hung component raises `DeploymentError`, it never hangs the suite.

Below the class: the cases (one function per case in CASES, each driving its DAG runs from
dags/deploy_dags.py) and `run_deployment`, which starts one deployment, runs every variant on it
and returns plain data for test_deploy.py and deploy_table.py.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import sqlalchemy as sa

from ti_guard.db import make_engine, scratch_database

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO / "tests" / "airflow"))
import airflow_venv  # noqa: E402  (tests/airflow: the cached Airflow virtualenvs)

PROJECT_BIN = REPO / ".venv" / "bin" if (REPO / ".venv" / "bin" / "ti-guard").exists() else Path(sys.executable).parent
# Airflow 3: the API server (REST v2 and the workers' execution API) and a separate DAG processor.
# Airflow 2: the webserver serves REST v1 (basic auth); the scheduler parses the DAGs and its
# LocalExecutor runs each task under a LocalTaskJob that heartbeats through the database. No
# 2.x case defers, so no triggerer there.
COMPONENTS_BY_MAJOR = {3: ("api-server", "scheduler", "dag-processor", "triggerer"), 2: ("webserver", "scheduler")}
COMPONENTS = tuple(dict.fromkeys(c for names in COMPONENTS_BY_MAJOR.values() for c in names))
DAG_IDS = ("deploy_timeout", "deploy_rest_marks", "deploy_fail_fast", "deploy_deferrable", "deploy_race", "deploy_schedule_tis")
FINISHED_RUN = ("success", "failed")
# What counts as a component crashing: a traceback or the scheduler loop's own last words.
BAD_LOG_LINES = re.compile(r"Traceback \(most recent call last\)|Exception when executing SchedulerJob\._run_scheduler_loop")


class DeploymentError(RuntimeError):
    pass


@dataclass(frozen=True)
class Profile:
    """What runs beside the API server: the deployment suite's one scheduler with LocalExecutor (the
    default), or benchmarks/production.py's CeleryExecutor with several schedulers and `airflow celery
    worker` processes on one metadata database."""

    executor: str = "LocalExecutor"
    schedulers: int = 1
    workers: int = 0
    worker_concurrency: int = 4
    dags_folder: Path = HERE / "dags"
    dag_ids: tuple = DAG_IDS
    broker_url: str | None = None
    venv_extra: str | None = None  # tests/airflow/airflow_venv.py EXTRAS
    env: dict = field(default_factory=dict)

    def components(self, major: int) -> tuple:
        base = COMPONENTS_BY_MAJOR[major]
        if self.executor == "CeleryExecutor" and "triggerer" not in base:
            base += ("triggerer",)  # the production workload defers on 2.x too
        extra = tuple(f"scheduler-{i}" for i in range(2, self.schedulers + 1))
        return base + extra + tuple(f"worker-{i}" for i in range(1, self.workers + 1))


def is_scheduler(name: str) -> bool:
    return name == "scheduler" or name.startswith("scheduler-")


# Backend ids served by MySQL or MariaDB (tests/conftest.py).
MYSQL_SERVERS = ("mysql", "mysql9")


def say(message: str) -> None:
    # pytest captures sys.stderr; CI logs need the real one to show progress.
    print(time.strftime("%H:%M:%S ") + message, file=sys.__stderr__, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout: float, interval: float = 1.0):
    """Polls `check()` until it returns something truthy; raises DeploymentError at the deadline."""
    deadline = time.monotonic() + timeout
    last_error = None
    while True:
        try:
            value = check()
            if value:
                return value
        except DeploymentError:
            raise
        except Exception as exc:  # a server still starting refuses connections; keep the last reason
            last_error = exc
        if time.monotonic() > deadline:
            raise DeploymentError(f"timed out after {timeout:.0f} s waiting for {what}" + (f" (last error: {last_error!r})" if last_error else ""))
        time.sleep(interval)


def utc(value):
    """Airflow stores UTC; MySQL hands it back naive, PostgreSQL aware."""
    if value is None:
        return None
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class Rest:
    """The public REST API: /api/v2 with a bearer token from the simple auth manager (Airflow 3),
    /api/v1 with basic auth of a user made by `airflow users create` (Airflow 2). `api` is the
    prefix the cases put before their paths."""

    def __init__(self, base: str, major: int = 3, basic: str | None = None):
        self.base, self.token, self.major = base, None, major
        self.api = f"/api/v{1 if major == 2 else 2}"
        self.basic = basic

    def call(self, method: str, path: str, body=None, timeout: float = 60) -> tuple[int, object]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        elif self.basic:
            headers["Authorization"] = f"Basic {self.basic}"
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")[:2000]

    def login(self):
        if self.major == 2:
            return  # basic auth: every call carries the user's credentials
        status, body = self.call("GET", "/auth/token")
        if status not in (200, 201) or not isinstance(body, dict) or "access_token" not in body:
            raise DeploymentError(f"GET /auth/token answered {status}: {body}")
        self.token = body["access_token"]


class Deployment:
    """One Airflow version on one backend, every component running, until `close()`."""

    def __init__(self, version: str, backend: str, admin_url: str, workdir: Path, profile: Profile = Profile()):
        self.version, self.backend, self.workdir, self.profile = version, backend, workdir, profile
        self.major = int(version.split(".")[0])
        self.components = profile.components(self.major)
        self.schedulers = tuple(c for c in self.components if is_scheduler(c))
        self.dag_ids = profile.dag_ids
        self.tag = f"[deploy {version} {backend}]"
        self.admin_url = admin_url
        self.home = workdir / "home"
        self.markers = workdir / "markers"
        self.procs: dict[str, subprocess.Popen] = {}
        self.restarts: list[dict] = []
        self._scratch = contextlib.ExitStack()
        self.engine = None
        self.port = None
        self.rest = None
        self.deadline = None  # monotonic: set per variant, caps every wait of its cases

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timings: dict, prepare=None):
        """`prepare(self)`, if given, runs on the migrated database before any component starts."""
        t0 = time.monotonic()
        self.venv = airflow_venv.ensure(self.version, say=say, extra=self.profile.venv_extra)
        self.python = str(airflow_venv.python_of(self.venv))
        self.home.mkdir(parents=True, exist_ok=True)
        self.markers.mkdir(parents=True, exist_ok=True)
        self.url = self._scratch.enter_context(scratch_database(self.admin_url, "ti_guard_deploy"))
        self.engine = make_engine(self.url)
        driver = "postgresql+psycopg2" if self.backend == "postgresql" else "mysql+pymysql"
        airflow_url = sa.engine.make_url(self.url).set(drivername=driver).render_as_string(hide_password=False)
        self.port = free_port()
        base = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": airflow_url,
            "AIRFLOW__CORE__EXECUTOR": self.profile.executor,
            "AIRFLOW__CORE__PARALLELISM": "12",
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.profile.dags_folder),
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{base}/execution/",
            "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__API__BASE_URL": base,
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__WORKERS": "1",
            # Every component must sign and check the same JWTs (workers -> execution API).
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
            "AIRFLOW__API__SECRET_KEY": secrets.token_hex(32),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "60",
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            # The scheduler's asset-orphanage job runs every parsing_cleanup_interval (60 s); on MariaDB
            # 10.11 its DELETE ... WHERE EXISTS (CTE) is a syntax error (1064) that ends the scheduler
            # loop, guard or not (3.3.2). Keep it out of the run on every backend alike
            # (TI_GUARD_DEPLOY_CLEANUP_INTERVAL=5 brings it back, to see which servers it breaks).
            "AIRFLOW__SCHEDULER__PARSING_CLEANUP_INTERVAL": os.environ.get("TI_GUARD_DEPLOY_CLEANUP_INTERVAL", "86400"),
            "TI_GUARD_DEPLOY_MARKERS": str(self.markers),
            "PYTHONUNBUFFERED": "1",
            **self.profile.env,
        }
        if self.profile.executor == "CeleryExecutor":
            self.env.update({
                "AIRFLOW__CELERY__BROKER_URL": self.profile.broker_url,
                # Celery's results in the metadata database, as the deployments keep them.
                "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + airflow_url,
                "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(self.profile.worker_concurrency),
            })
        if self.backend in MYSQL_SERVERS:
            # Who wrote a row (production.py's observer trigger reads @tg_writer); PostgreSQL takes PGAPPNAME.
            self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE / "writer"), os.environ.get("PYTHONPATH")]))
            self.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS"] = "ti_guard_writer.CONNECT_ARGS"
        if self.major == 2:  # the FAB auth manager (Airflow 2's default) brings `airflow users` and basic auth
            for key in ("AIRFLOW__CORE__AUTH_MANAGER", "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS"):
                self.env.pop(key)
            self.env.update({  # the scheduler's own DAG parsing, the webserver, REST v1 with basic auth
                "AIRFLOW__SCHEDULER__DAG_DIR_LIST_INTERVAL": "5",
                "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "60",
                "AIRFLOW__SCHEDULER__PARSING_PROCESSES": "1",
                "AIRFLOW__API__AUTH_BACKENDS": "airflow.api.auth.backend.basic_auth",
                "AIRFLOW__WEBSERVER__SECRET_KEY": secrets.token_hex(32),
                "AIRFLOW__WEBSERVER__WORKERS": "1",
                "AIRFLOW__WEBSERVER__WEB_SERVER_HOST": "127.0.0.1",
                "AIRFLOW__WEBSERVER__WEB_SERVER_PORT": str(self.port),
                "AIRFLOW__WEBSERVER__BASE_URL": base,
            })
        say(f"{self.tag} airflow db migrate ({self.url.rsplit('/', 1)[-1].split('?')[0]})")
        rc = self.airflow_cli("db", "migrate", timeout=900)
        if rc != 0:
            raise DeploymentError(f"airflow db migrate exited {rc}: see {self.workdir / 'cli.log'}")
        basic = None
        if self.major == 2:
            user, password = "ti_guard", secrets.token_hex(12)
            rc = self.airflow_cli("users", "create", "--username", user, "--password", password, "--role", "Admin",
                                  "--email", "ti_guard@example.invalid", "--firstname", "ti", "--lastname", "guard")
            if rc != 0:
                raise DeploymentError(f"airflow users create exited {rc}: see {self.workdir / 'cli.log'}")
            basic = base64.b64encode(f"{user}:{password}".encode()).decode()
        if prepare is not None:
            prepare(self)
        timings["migrate"] = round(time.monotonic() - t0, 1)
        t1 = time.monotonic()
        for name in self.components:
            self._spawn(name)
        self.rest = Rest(base, self.major, basic)
        wait_for(f"the {self.components[0]} to answer {self.rest.api}/version", self._api_up, timeout=240, interval=2)
        self.rest.login()
        timings["api_server_ready"] = round(time.monotonic() - t1, 1)
        wait_for("a scheduler heartbeat", lambda: self._check_alive() or self.heartbeats().get("SchedulerJob"), timeout=240, interval=2)
        timings["scheduler_ready"] = round(time.monotonic() - t1, 1)
        wait_for(f"the {'scheduler' if self.major == 2 else 'dag-processor'} to parse {', '.join(self.dag_ids)}",
                 self._dags_parsed, timeout=300, interval=3)
        for dag_id in self.dag_ids:  # belt and braces: paused_at_creation is off, unpause anyway
            mask = "?update_mask=is_paused" if self.major == 2 else ""  # v1 wants the mask, v2 as before
            self.rest.call("PATCH", f"{self.rest.api}/dags/{dag_id}{mask}", {"is_paused": False})
        timings["dags_parsed"] = round(time.monotonic() - t1, 1)
        self.server = self.server_version()
        say(f"{self.tag} up: api-server on :{self.port}, {timings}")

    def _spawn(self, name: str):
        args = {"api-server": ["api-server", "--port", str(self.port), "--host", "127.0.0.1"],
                "webserver": ["webserver", "--port", str(self.port), "--hostname", "127.0.0.1"]}.get(name, [name])
        if is_scheduler(name):
            args = ["scheduler"]
        elif name.startswith("worker-"):  # several on one host: own celery hostnames, no log server (one port)
            args = ["celery", "worker", "--celery-hostname", f"{name}@%h", "--skip-serve-logs",
                    "--concurrency", str(self.profile.worker_concurrency)]
        log = open(self.log_path(name), "ab")
        log.write(f"\n===== {time.strftime('%H:%M:%S')} airflow {' '.join(args)}\n".encode())
        log.flush()
        # A process group of its own: stop() signals the component and every child it forked.
        self.procs[name] = subprocess.Popen(
            [self.python, "-m", "airflow", *args], env={**self.env, "TI_GUARD_WRITER": name, "PGAPPNAME": name}, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, cwd=self.home, start_new_session=True,
        )
        log.close()

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def airflow_cli(self, *args, timeout: float = 300) -> int:
        with open(self.workdir / "cli.log", "ab") as log:
            log.write(f"\n$ airflow {' '.join(args)}\n".encode())
            log.flush()
            try:
                return subprocess.run([self.python, "-m", "airflow", *args], env=self.env, stdout=log, stderr=log,
                                      timeout=timeout, cwd=self.home).returncode
            except subprocess.TimeoutExpired:
                raise DeploymentError(f"airflow {' '.join(args)} did not finish in {timeout} s") from None

    def _api_up(self):
        self._check_alive()
        status, body = self.rest.call("GET", f"{self.rest.api}/version", timeout=10)
        return status == 200 and body

    def _check_alive(self):
        dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
        if dead:
            raise DeploymentError(f"component(s) exited while starting: {dead}; logs in {self.workdir}")

    def _dags_parsed(self):
        self._check_alive()
        return all(self.rest.call("GET", f"{self.rest.api}/dags/{d}", timeout=20)[0] == 200 for d in self.dag_ids)

    def exited(self) -> dict:
        """Components that are no longer running: name -> exit code."""
        return {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}

    def restart_dead(self, why: str) -> dict:
        """Starts again any component that exited (recorded), so one variant's crash does not spill into the next."""
        dead = self.exited()
        for name, rc in dead.items():
            say(f"{self.tag} {name} had exited ({rc}); restarting it ({why})")
            self.restarts.append({"component": name, "returncode": rc, "when": why})
            self._spawn(name)
        if self.components[0] in dead:
            wait_for(f"the restarted {self.components[0]}", self._api_up, timeout=240, interval=2)
            self.rest.login()
        if any(is_scheduler(name) for name in dead):
            self._wait_new_scheduler_beat()
        return dead

    def _wait_new_scheduler_beat(self):
        before = self.heartbeats().get("SchedulerJob")
        wait_for("the restarted scheduler's heartbeat",
                 lambda: (self.heartbeats().get("SchedulerJob") or before) != before, timeout=240, interval=2)

    def with_scheduler_stopped(self, work):
        """Stop every scheduler (SIGTERM, as a supervisor would), run `work`, start them again and wait
        for a new heartbeat."""
        for name in self.schedulers:
            proc = self.procs[name]
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for name in self.schedulers:
            proc = self.procs[name]
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=60)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        try:
            return work()
        finally:
            for name in self.schedulers:
                self._spawn(name)
            self._wait_new_scheduler_beat()

    def stop(self, grace: float = 30):
        """SIGTERM to every component's process group, SIGKILL to whatever is left after `grace` s."""
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in self.procs.values():
            # The group may outlive its leader (task processes): kill the group whatever the leader did.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)

    def close(self):
        try:
            self.stop()
        finally:
            if self.engine is not None:
                self.engine.dispose()
            self._scratch.close()  # drops the scratch database (WITH (FORCE) on PostgreSQL)

    # -- the guard ---------------------------------------------------------------------------

    def guard(self, variant: str) -> dict:
        """`ti-guard uninstall` for none, `ti-guard install --mode X --rules all` for X, and for
        X-RULE `--rules all,-RULE` (X with that rule switched off); then `ti-guard status`."""
        mode, _, off = variant.partition("-")
        rules = f"all,-{off}" if off else "all"
        args = ["uninstall", "--url", self.url] if variant == "none" else ["install", "--url", self.url, "--mode", mode, "--rules", rules]
        done = self._ti_guard(*args)
        status = self._ti_guard("status", "--url", self.url)
        return {"command": f"ti-guard {args[0]}" + ("" if variant == "none" else f" --mode {mode} --rules {rules}"),
                "rc": done.returncode, "output": (done.stdout + done.stderr).strip()[-2000:],
                "status_rc": status.returncode, "status": (status.stdout + status.stderr).strip()[-2000:]}

    def switch_guard(self, variant: str) -> dict:
        """`guard(variant)` on the live deployment, as the runbook says for the backend."""
        if self.backend in MYSQL_SERVERS:
            # MySQL's CREATE/DROP TRIGGER upgrade a metadata lock on task_instance; a scheduler
            # transaction that read the table and then wants to write it deadlocks with that
            # upgrade and loses (error 1213, the scheduler exits: seen in CI on MySQL 9.7). The
            # runbook's MySQL procedure, followed here: stop the schedulers for the switch.
            return self.with_scheduler_stopped(lambda: self.guard(variant))
        return self.guard(variant)

    def _ti_guard(self, *args):
        try:
            return subprocess.run([str(PROJECT_BIN / "ti-guard"), *args], capture_output=True, text=True, cwd=REPO, timeout=180)
        except subprocess.TimeoutExpired:
            raise DeploymentError(f"ti-guard {args[0]} did not finish in 180 s") from None

    # -- reading the database ----------------------------------------------------------------

    def server_version(self) -> str:
        with self.engine.connect() as conn:
            query = "SHOW server_version" if self.backend == "postgresql" else "SELECT VERSION()"
            return f"{self.backend} {conn.exec_driver_sql(query).scalar()}"

    def heartbeats(self) -> dict:
        """job_type -> the newest latest_heartbeat among running jobs (SchedulerJob, TriggererJob, DagProcessorJob)."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT job_type, MAX(latest_heartbeat) FROM job WHERE state = 'running' GROUP BY job_type")).all()
        return {job_type: utc(beat) for job_type, beat in rows}

    def refusals(self) -> dict:
        """'rule action' -> writes the guard's record counted so far (empty without the guard's record)."""
        try:
            with self.engine.connect() as conn:
                rows = conn.execute(sa.text("SELECT rule, action, SUM(refusals) FROM ti_guard_refusal_counts GROUP BY rule, action")).all()
        except sa.exc.DBAPIError:
            return {}
        return {f"{rule} {action}": int(n) for rule, action, n in rows}

    def run_state(self, dag_id: str, run_id: str):
        with self.engine.connect() as conn:
            return conn.execute(sa.text("SELECT state FROM dag_run WHERE dag_id = :d AND run_id = :r"), {"d": dag_id, "r": run_id}).scalar()

    def tis(self, dag_id: str, run_id: str) -> dict:
        """task_id -> {state, try_number, start_date, end_date, seconds} as stored."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.text(
                "SELECT task_id, map_index, state, try_number, start_date, end_date FROM task_instance "
                "WHERE dag_id = :d AND run_id = :r ORDER BY task_id, map_index"), {"d": dag_id, "r": run_id}).all()
        out = {}
        for task_id, map_index, state, tries, start, end in rows:
            start, end = utc(start), utc(end)
            out[task_id if map_index < 0 else f"{task_id}[{map_index}]"] = {
                "state": state, "try_number": tries,
                "start_date": start.isoformat() if start else None, "end_date": end.isoformat() if end else None,
                "seconds": round((end - start).total_seconds(), 1) if start and end else None,
            }
        return out

    def ti_states(self, dag_id: str, run_id: str) -> dict:
        return {t: v["state"] for t, v in self.tis(dag_id, run_id).items()}

    # -- REST helpers --------------------------------------------------------------------------

    def trigger(self, dag_id: str, run_id: str) -> dict:
        body = {"dag_run_id": run_id} if self.major == 2 else {"dag_run_id": run_id, "logical_date": None}
        status, body = self.rest.call("POST", f"{self.rest.api}/dags/{dag_id}/dagRuns", body)
        if status not in (200, 201):
            raise DeploymentError(f"triggering {dag_id} ({run_id}) answered {status}: {body}")
        return {"status": status}

    def wait(self, what: str, check, timeout: float, interval: float = 1.0):
        """wait_for within the variant's deadline; gives up at once when the scheduler has exited
        (nothing would move any more: the variant's failure is that exit, not a long timeout)."""
        if self.deadline is not None:
            timeout = max(0.0, min(timeout, self.deadline - time.monotonic()))

        def guarded():
            if self.schedulers and all(self.procs.get(n) is not None and self.procs[n].poll() is not None for n in self.schedulers):
                raise DeploymentError(f"gave up waiting for {what}: the scheduler exited ({self.procs['scheduler'].returncode})")
            return check()
        return wait_for(what, guarded, timeout=timeout, interval=interval)

    def wait_tis(self, dag_id: str, run_id: str, what: str, predicate, timeout: float):
        """Waits until predicate(ti_states) holds; returns the states."""
        def check():
            states = self.ti_states(dag_id, run_id)
            return states if predicate(states) else None
        return self.wait(f"{dag_id} {run_id}: {what}", check, timeout=timeout, interval=1)

    # -- logs ----------------------------------------------------------------------------------

    def log_offsets(self) -> dict:
        return {name: self.log_path(name).stat().st_size if self.log_path(name).exists() else 0 for name in self.components}

    def new_log_lines(self, offsets: dict):
        """(component, its log's lines written since `offsets`) for each component that has a log."""
        for name in self.components:
            path = self.log_path(name)
            if path.exists():
                with open(path, "rb") as f:
                    f.seek(offsets.get(name, 0))
                    yield name, f.read().decode(errors="replace").splitlines()

    def new_bad_lines(self, offsets: dict) -> dict:
        """component -> the lines matching BAD_LOG_LINES written since `offsets`, each with the line that follows."""
        out = {}
        for name, lines in self.new_log_lines(offsets):
            hits = [" | ".join(lines[i:i + 1] + _last_line_of_traceback(lines, i)) for i, line in enumerate(lines) if BAD_LOG_LINES.search(line)]
            # A worker whose execution API call was answered with an error logs a traceback in the
            # scheduler's log (LocalExecutor workers are its children; Celery's in their worker's): a 409 when Airflow stopped its
            # task on purpose (run timeout, a REST mark, a skip; the guard never moves a state, so
            # it never causes one). An error the server itself hit is a traceback in the API
            # server's log, which is checked.
            hits = [h for h in hits if not ((is_scheduler(name) or name.startswith("worker-")) and h.endswith("ServerResponseError: Server returned error")
                                            or "'reason': 'invalid_state'" in h)]
            if hits:
                out[name] = hits[:20]
        return out

    def task_log_tracebacks(self, run_ids) -> dict:
        """For information: task logs (under $AIRFLOW_HOME/logs) of these runs that contain a traceback."""
        out = {}
        logs = self.home / "logs"
        if not logs.exists():
            return out
        for path in logs.rglob("*"):
            if not path.is_file() or not any(f"run_id={r}" in str(path) for r in run_ids):
                continue
            text = path.read_text(errors="replace")
            if "Traceback" in text or '"exc_info"' in text or '"error_detail"' in text:
                out[str(path.relative_to(logs))] = _error_summary(text)
        return out


EXCEPTION_LINE = re.compile(r"^[\s|]*([A-Za-z_][\w.]*(?:Error|Exception|Violation|Exit|Interrupt)\b.*)")


def _last_line_of_traceback(lines, i):
    """The exception a traceback starting at line i ends with (the last `SomeError: ...` before the
    next log record), so the report names the error, not just "Traceback"."""
    found = None
    for line in lines[i + 1:i + 300]:
        if re.match(r"^\d{4}-\d\d-\d\d[ T]", line):  # the next log record
            break
        match = EXCEPTION_LINE.match(line)
        if match and not line.lstrip(" |").startswith(("File ", "raise ", "+")):
            found = match.group(1)
        elif found and line.startswith("Server error detail:"):
            found += " " + line.strip()
    return [found[:600]] if found else []


def _error_summary(text: str) -> str:
    """The last error a task log names: task logs are JSON lines in 3.x (error_detail), plain text otherwise."""
    for line in reversed(text.splitlines()):
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if not isinstance(entry, dict):
            if "Error" in line or "Exception" in line:
                return line[:300]
            continue
        for detail in entry.get("error_detail") or []:
            return f"{entry.get('event')}: {detail.get('exc_type')}: {str(detail.get('exc_value'))[:200]}"
        if entry.get("level") == "error":
            return str(entry.get("event"))[:300]
    return ""


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


# == The cases ============================================================================
# Each triggers its DAG runs on the running deployment and drives them; it returns what it did and
# saw (REST calls with status and body, states seen while waiting, marker files). The final states
# of its runs are read once the whole variant is quiet. A case that times out raises; the caller
# records the error and the variant goes on.

ACTIVE = {"running", "queued", "scheduled", "deferred", "up_for_reschedule", "up_for_retry", "restarting", None}
RUN_TIMEOUT = 300


def _call(dep: Deployment, name: str, method: str, path: str, body=None, watch=None) -> dict:
    """One REST call, recorded with the TI states of `watch` (dag_id, run_id) just before and just after it."""
    before = dep.ti_states(*watch) if watch else None
    started = time.monotonic()
    status, answer = dep.rest.call(method, path, body)
    after = dep.ti_states(*watch) if watch else None
    text = answer if isinstance(answer, str) else _short(answer)
    return {"name": name, "method": method, "path": path, "body": body, "status": status, "answer": text,
            "seconds": round(time.monotonic() - started, 2), "states_before": before, "states_after": after}


def _short(answer) -> object:
    """Answers can be long (whole TI collections); keep the parts that say what happened."""
    if isinstance(answer, dict) and "task_instances" in answer:
        return {"task_instances": [{k: ti.get(k) for k in ("task_id", "state", "run_id")} for ti in answer["task_instances"]],
                "total_entries": answer.get("total_entries")}
    if isinstance(answer, dict) and "dag_run_id" in answer:
        return {k: answer.get(k) for k in ("dag_run_id", "state")}
    return answer


def _watch(dep: Deployment, dag_id: str, run_id: str, timeout: float = RUN_TIMEOUT) -> dict:
    """Polls until the run is finished, remembering every state each TI was seen in (in order)."""
    seen: dict[str, list] = {}

    def finished():
        for task_id, state in dep.ti_states(dag_id, run_id).items():
            if not seen.get(task_id) or seen[task_id][-1] != state:
                seen.setdefault(task_id, []).append(state)
        return dep.run_state(dag_id, run_id) in FINISHED_RUN

    try:
        dep.wait(f"{dag_id} {run_id} to finish", finished, timeout=timeout, interval=1)
    except DeploymentError as exc:
        raise DeploymentError(f"{exc}; TI states seen: {seen}") from None
    return {"seen": seen, "run_finished_as": dep.run_state(dag_id, run_id)}


def timeout(dep: Deployment, rid: str, out: dict):
    """dagrun_timeout 20 s over a task sleeping 60 s: the scheduler skips the running TI and fails the run."""
    run = out["runs"]["timeout"] = ("deploy_timeout", f"{rid}_timeout")
    dep.trigger(*run)
    out["watch"] = _watch(dep, *run)


def rest_marks(dep: Deployment, rid: str, out: dict):
    """REST "mark as" on running and finished TIs (run `marks`); clear a running TI, then mark the run failed (run `runops`)."""
    dag = "deploy_rest_marks"
    runs = out["runs"]
    runs.update(marks=(dag, f"{rid}_marks"), runops=(dag, f"{rid}_runops"))
    for run in runs.values():
        dep.trigger(*run)
    longs = ("long_skip", "long_fail", "long_success")
    calls = out["calls"] = []

    marks = runs["marks"][1]
    dep.wait_tis(dag, marks, "the long tasks running and quick done",
                 lambda s: all(s.get(t) == "running" for t in longs) and s.get("quick") == "success", timeout=240)
    for task_id, state in (("long_skip", "skipped"), ("long_fail", "failed"), ("long_success", "success"), ("quick", "skipped")):
        calls.append(_call(dep, f"mark {task_id} {state}", "PATCH", f"{dep.rest.api}/dags/{dag}/dagRuns/{marks}/taskInstances/{task_id}",
                           {"new_state": state, **({"dry_run": False} if dep.major == 2 else {})}, watch=runs["marks"]))

    runops = runs["runops"][1]
    dep.wait_tis(dag, runops, "the long tasks running", lambda s: all(s.get(t) == "running" for t in longs), timeout=240)
    if dep.major == 2:
        # Airflow 2.11.2: a running TI cleared over REST v1 is never run again, and whether its attempt
        # then ends success or failed depends on the scheduler's zombie detection catching it (one of three
        # variants failed, with and without writes of the guard's: its record showed none on that run).
        out["clear"] = "not driven on Airflow 2: its outcome is the zombie detector's timing, guard or not"
    else:
        _clear_running(dep, dag, runops, runs, calls, out)
    calls.append(_call(dep, "mark run failed", "PATCH", f"{dep.rest.api}/dags/{dag}/dagRuns/{runops}", {"state": "failed"},
                       watch=runs["runops"]))
    out["watch"] = {label: _watch(dep, *run) for label, run in runs.items()}


def _clear_running(dep: Deployment, dag: str, runops: str, runs: dict, calls: list, out: dict):
    tries = dep.tis(dag, runops)["long_skip"]["try_number"]
    calls.append(_call(dep, "clear running long_skip", "POST", f"{dep.rest.api}/dags/{dag}/clearTaskInstances",
                       {"dry_run": False, "only_failed": False, "task_ids": ["long_skip"], "dag_run_id": runops},
                       watch=runs["runops"]))
    try:
        dep.wait_tis(dag, runops, "the cleared long_skip running again",
                     lambda s: s.get("long_skip") == "running" and dep.tis(dag, runops)["long_skip"]["try_number"] > tries, timeout=120)
        out["cleared_task_ran_again"] = True
    except DeploymentError as exc:  # recorded: what clearing did is the measurement
        out["cleared_task_ran_again"] = False
        out["clear_wait"] = str(exc)


def fail_fast(dep: Deployment, rid: str, out: dict):
    """fail_fast DAG: one task fails after ~5 s, Airflow stops its running sibling."""
    run = out["runs"]["fail_fast"] = ("deploy_fail_fast", f"{rid}_fail_fast")
    dep.trigger(*run)
    out["watch"] = _watch(dep, *run)


def deferrable(dep: Deployment, rid: str, out: dict):
    """A task deferred to the triggerer that skips itself on resume; a reschedule sensor that soft-fails."""
    run = out["runs"]["deferrable"] = ("deploy_deferrable", f"{rid}_deferrable")
    dep.trigger(*run)
    out["watch"] = _watch(dep, *run)


def race(dep: Deployment, rid: str, out: dict):
    """The seed's race: `join` (one_success) is running when the slow branch decides against it."""
    run = out["runs"]["race"] = ("deploy_race", f"{rid}_race")
    dep.trigger(*run)
    try:
        out["watch"] = _watch(dep, *run)
        # The run can end while join still runs (seen with the guard: the scheduler fails the run as
        # deadlocked); join's markers mean something only once join itself is done.
        dep.wait_tis(*run, "join to finish", lambda s: s.get("join") not in ACTIVE, timeout=120)
    finally:
        run_id = run[1]
        decided = dep.markers / f"{run_id}.branch.decided"
        # The run's callback runs after the run ends, in another component (3.x: the dag-processor).
        callback = dep.markers / f"{run_id}.run_callback"
        deadline = time.monotonic() + 30
        while not callback.exists() and time.monotonic() < deadline:
            time.sleep(1)
        out["markers"] = {
            "join_started": (dep.markers / f"{run_id}.join.started").exists(),
            "join_finished": (dep.markers / f"{run_id}.join.finished").exists(),
            "branch_decided": decided.read_text() if decided.exists() else None,
            "run_callback": callback.read_text() if callback.exists() else None,
        }


# The stale scheduler of `schedule_tis`, run with the Airflow venv's python and the deployment's env
# (AIRFLOW_HOME, sql_alchemy_conn): it reads the DagRun and the TI with an ORM session, attaches the
# task as the scheduler does (`DBDagBag.get_dag_for_run`; 2.x `DagBag(read_dags_from_db=True)`; `dag.get_task`), sets the TI's in-memory
# state to what a stale read saw (NULL, without dirtying the object: nothing else is flushed), calls
# the real `DagRun.schedule_tis`, reads the row in the same transaction (what the UPDATE left: no other
# writer can move it while the row lock is held) and commits; then reads the row again on a fresh
# session (by then the scheduler may have moved it on). Prints one `RESULT {json}` line; an exception
# (from schedule_tis or the commit) is recorded there, not raised.
STALE_SCHEDULER = r"""
import json, sys, traceback
dag_id, run_id, task_id = sys.argv[1:4]
out = {}
try:
    from sqlalchemy import select
    from sqlalchemy.orm.attributes import set_committed_value
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance as TI
    from airflow.utils.session import create_session
    where = (TI.dag_id == dag_id, TI.run_id == run_id, TI.task_id == task_id, TI.map_index == -1)
    with create_session() as session:  # commits when the block ends
        dag_run = session.scalars(select(DagRun).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id)).one()
        ti = session.scalars(select(TI).where(*where)).one()
        out["read"] = {"state": ti.state, "try_number": ti.try_number}
        try:
            from airflow.models.dagbag import DBDagBag
            dag_run.dag = DBDagBag().get_dag_for_run(dag_run=dag_run, session=session)
        except ImportError:  # Airflow 2: the scheduler's serialized DAG
            from airflow.models.dagbag import DagBag
            dag_run.dag = DagBag(read_dags_from_db=True).get_dag(dag_id, session=session)
        ti.task = dag_run.dag.get_task(task_id)
        set_committed_value(ti, "state", None)
        out["returned"] = dag_run.schedule_tis([ti], session=session)
        state, tries = session.execute(select(TI.state, TI.try_number).where(*where)).one()
        out["in_transaction"] = {"state": state, "try_number": tries}
    out["committed"] = True
    with create_session() as session:
        state, tries = session.execute(select(TI.state, TI.try_number).where(*where)).one()
        out["after_commit"] = {"state": state, "try_number": tries}
except Exception as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"[:1000]
    out["traceback"] = traceback.format_exc()[-3000:]
print("RESULT " + json.dumps(out, default=str), flush=True)
"""


def _stale_schedule(dep: Deployment, dag_id: str, run_id: str, task_id: str) -> dict:
    started = time.monotonic()
    try:
        done = subprocess.run([dep.python, "-c", STALE_SCHEDULER, dag_id, run_id, task_id], cwd=dep.home,
                              env={**dep.env, "TI_GUARD_WRITER": "stale-scheduler", "PGAPPNAME": "stale-scheduler"},
                              capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        raise DeploymentError("the stale scheduler's schedule_tis did not finish in 240 s") from None
    line = next((text for text in reversed(done.stdout.splitlines()) if text.startswith("RESULT ")), None)
    if line is None:
        raise DeploymentError(f"the stale scheduler exited {done.returncode} without a result: {(done.stdout + done.stderr)[-2000:]}")
    return {**json.loads(line[len("RESULT "):]), "rc": done.returncode, "seconds": round(time.monotonic() - started, 1)}


def _attempt_logs(dep: Deployment, dag_id: str, run_id: str, task_id: str) -> dict:
    """attempt number -> whether its task log says the server told it to stop (the 409/404 on a heartbeat)."""
    out = {}
    for path in sorted((dep.home / "logs").glob(f"dag_id={dag_id}/run_id={run_id}/task_id={task_id}/attempt=*.log")):
        text = path.read_text(errors="replace")
        # 3.x: the heartbeat's 409; 2.x: LocalTaskJob's "State of this instance has been externally set to ..."
        told = any(m in text for m in ("shouldn't be running anymore", "409 Conflict", "has been externally set to"))
        out[path.stem.split("=", 1)[1]] = {"told to stop": told}
    return out


def schedule_tis(dep: Deployment, rid: str, out: dict):
    """A stale scheduler's `DagRun.schedule_tis` (the real one, from another process) over the running `sleeps`
    (apache/airflow#60330): before 3.3 its UPDATE has no state check and puts the running TI back to scheduled."""
    dag_id, task_id = "deploy_schedule_tis", "sleeps"
    run = out["runs"]["schedule_tis"] = (dag_id, f"{rid}_schedule_tis")
    starts = dep.markers / f"{run[1]}.{task_id}.starts"
    dep.trigger(*run)
    try:
        dep.wait_tis(*run, "sleeps running and started", lambda s: s.get(task_id) == "running" and starts.exists(), timeout=240)
        out["before"] = {k: dep.tis(*run)[task_id][k] for k in ("state", "try_number")}
        out["stale_write"] = _stale_schedule(dep, *run, task_id)
        say(f"{dep.tag}   stale schedule_tis on running {task_id} ({run[1]}): "
            + json.dumps({k: v for k, v in out["stale_write"].items() if k != "traceback"}))
        out["watch"] = _watch(dep, *run)
        dep.wait_tis(*run, f"{task_id} to finish", lambda s: s.get(task_id) not in ACTIVE, timeout=120)
    finally:
        out["starts"] = starts.read_text().splitlines() if starts.exists() else []
        out["attempt_logs"] = _attempt_logs(dep, *run, task_id)


CASES = {"timeout": timeout, "rest_marks": rest_marks, "fail_fast": fail_fast, "deferrable": deferrable, "race": race,
         "schedule_tis": schedule_tis}


# == One deployment, all its variants =========================================================

VARIANT_TIMEOUT = 360  # every wait of a variant's cases ends by then (a variant takes ~30-70 s when healthy)
QUIET_TIMEOUT = 120  # after the cases: how long TIs of the variant may still be active


def run_deployment(version: str, backend: str, admin_url: str, cases, variants, workdir: Path) -> dict:
    """Starts the components once, runs every variant in turn on them (cases of a variant concurrently),
    and returns plain data for the tests and the docs/deployments.md table. Never raises: errors are recorded."""
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    started = time.monotonic()
    result = {"version": version, "backend": backend, "cases": list(cases), "workdir": str(workdir),
              "timings": {}, "variants": {}, "restarts": []}
    dep = Deployment(version, backend, admin_url, workdir)
    try:
        dep.start(result["timings"])
        result["server"] = dep.server
        result["api_version"] = dep.rest.call("GET", f"{dep.rest.api}/version")[1]
        for variant in variants:
            t0 = time.monotonic()
            out = result["variants"][variant] = {"restarted_before": dep.restart_dead(f"before variant {variant}")}
            out["guard"] = dep.switch_guard(variant)
            offsets = dep.log_offsets()
            beats_before = dep.heartbeats()
            recorded_before = dep.refusals()
            rid = f"tg_{variant}_{uuid.uuid4().hex[:6]}"
            dep.deadline = time.monotonic() + VARIANT_TIMEOUT
            say(f"{dep.tag} variant {variant}: {out['guard']['command']} -> rc {out['guard']['rc']}; cases {', '.join(cases)} ({rid})")
            with ThreadPoolExecutor(max_workers=len(cases)) as pool:
                futures = {name: pool.submit(_run_case, dep, name, rid) for name in cases}
                out["cases"] = {name: f.result() for name, f in futures.items()}
            all_runs = [run for case in out["cases"].values() for run in case.get("runs", {}).values()]
            dep.deadline += QUIET_TIMEOUT  # the quiet wait has time of its own even after a case used up the deadline
            out["quiet"] = _wait_quiet(dep, all_runs)
            dep.deadline = None
            for case in out["cases"].values():
                case["final"] = {label: {"run": dep.run_state(*run), "tis": dep.tis(*run)} for label, run in case.get("runs", {}).items()}
            out["exited"] = dep.exited()
            # What the guard kept or refused during the variant, from its own record (shown, not asserted).
            out["recorded"] = {k: n - recorded_before.get(k, 0) for k, n in dep.refusals().items() if n != recorded_before.get(k, 0)}
            beats_after = dep.heartbeats()
            now = now_utc()
            sched_before, sched_after = beats_before.get("SchedulerJob"), beats_after.get("SchedulerJob")
            out["scheduler"] = {
                "heartbeat_before": sched_before.isoformat() if sched_before else None,
                "heartbeat_after": sched_after.isoformat() if sched_after else None,
                "advanced": bool(sched_before and sched_after and sched_after > sched_before),
                "age_at_end": round((now - sched_after).total_seconds(), 1) if sched_after else None,
            }
            out["heartbeats_at_end"] = {k: round((now - v).total_seconds(), 1) for k, v in beats_after.items() if v}
            out["bad_log_lines"] = dep.new_bad_lines(offsets)
            out["task_log_errors"] = dep.task_log_tracebacks([run_id for _, run_id in all_runs])
            out["seconds"] = round(time.monotonic() - t0, 1)
            result["timings"][f"variant {variant}"] = out["seconds"]
            say(f"{dep.tag} variant {variant} done in {out['seconds']} s: exited {out['exited'] or 'none'}, "
                f"scheduler {out['scheduler']}, bad log lines in {sorted(out['bad_log_lines']) or 'none'}")
            for name, case in out["cases"].items():
                say(f"{dep.tag}   {variant} {name}: " + ("ERROR " + case["error"] if "error" in case else "")
                    + "; ".join(f"{label} {f['run']} {({t: v['state'] for t, v in f['tis'].items()})}" for label, f in case["final"].items()))
    except Exception as exc:
        import traceback
        result["error"] = f"{exc.__class__.__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
        say(f"{dep.tag} ERROR {result['error']} (logs in {workdir})")
    finally:
        t0 = time.monotonic()
        try:
            dep.close()
        except Exception as exc:
            result.setdefault("error", f"stopping the deployment failed: {exc!r}")
        result["timings"]["stop"] = round(time.monotonic() - t0, 1)
        result["restarts"] = dep.restarts
        result["seconds"] = round(time.monotonic() - started, 1)
        say(f"{dep.tag} done in {result['seconds']} s {result['timings']}")
    return result


def _run_case(dep: Deployment, name: str, rid: str) -> dict:
    t0 = time.monotonic()
    out = {"runs": {}}
    try:
        CASES[name](dep, rid, out)
    except Exception as exc:  # recorded and asserted on by the tests; the variant goes on
        out["error"] = f"{exc.__class__.__name__}: {exc}"
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


def _wait_quiet(dep: Deployment, runs) -> dict:
    """Waits until no TI of these runs is still active (the final states are then final)."""
    def active():
        left = {f"{run_id}.{t}": s for dag_id, run_id in runs for t, s in dep.ti_states(dag_id, run_id).items() if s in ACTIVE}
        return left
    try:
        dep.wait("the variant's task instances to finish", lambda: not active(), timeout=QUIET_TIMEOUT, interval=2)
        return {"quiet": True}
    except DeploymentError:
        return {"quiet": False, "still_active": active()}
