"""The production benchmark (issue 19): the guard under two schedulers, Celery workers and sustained load.

One deployment (deployment.py's `Deployment` with a CeleryExecutor `Profile`: api-server,
dag-processor, triggerer, two schedulers, two `airflow celery worker` processes, Redis as the broker
on a database number of its own, results in the metadata database) runs the variants in turn
(none, ignore, none, ignore, raise, audit, ...): each switches the guard, keeps runs of every DAG of
dags_production/ going through the REST API for a fixed time (a closed loop: each DAG has a number of
runs kept active), then stops triggering and lets its runs finish. Then it reads, from the components'
logs and the database:

- kills: attempts a worker was running that the server told to stop (3.x: the heartbeat's 409 and
  its `current_state`; 2.x: LocalTaskJob's "externally set to"), each with the write that did it, read
  from an observer trigger (AFTER UPDATE, the same in every variant) that logs every state change
  with the writing component (PostgreSQL application_name; MySQL @tg_writer: writer/ti_guard_writer.py)
  and classified by its signature;
- the guard's record (`ti-guard report --format json`, and the counts per rule since the switch);
- outcomes: run states per DAG, final TI states per task;
- component exits, new tracebacks, deadlock and lock-wait errors in any component's log (and
  PostgreSQL's own deadlock counter);
- task instances finished per minute, and the scheduling delay of the fan-out and chain DAGs (from the
  last upstream's end, or the run's queued_at for a first task, to the task's start);
- CPU time per task instance finished, of the database server and of Airflow's components (each
  process tree, from /proc): where the guard's work lands, and steadier than a closed loop's
  throughput on 2 busy cores.

`run_production` never raises: errors are recorded in the result. benchmarks/production.py runs the
matrix and renders the tables; tests/deploy/test_production.py runs a short version in CI.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import sqlalchemy as sa

from .deployment import MYSQL_SERVERS, PROJECT_BIN, REPO, Deployment, DeploymentError, Profile, _stale_schedule, now_utc, say, utc

HERE = Path(__file__).resolve().parent
# dag_id -> runs kept active at once.
LOAD = {"prod_fanout": 1, "prod_chain": 2, "prod_retry": 1, "prod_sensor": 1, "prod_deferrable": 1, "prod_timeout": 1,
        "prod_branch_race": 2, "prod_short_circuit_race": 1, "prod_mapped_race": 1, "prod_long": 1}
RACE_DAGS = ("prod_branch_race", "prod_short_circuit_race", "prod_mapped_race", "prod_long")
DELAY_DAGS = ("prod_fanout", "prod_chain")
# The routes the guard stops on every backend; set_state_skip only where the backend can tell it apart.
GUARDED_ROUTES = ("racy_skip", "stale_set_state_skip", "stale_schedule")
STALE_EVERY = 30  # s between two stale schedule_tis calls on a running prod_long task (before 3.3 only)
DRAIN_TIMEOUT = 420
FINISHED = ("success", "failed")
ACTIVE_RUN = ("queued", "running")
ERRORS = {
    "deadlock": re.compile(r"deadlock detected|40P01|Deadlock found|\(1213\b"),
    "lock_wait": re.compile(r"Lock wait timeout|\(1205\b|55P03|canceling statement due to lock timeout"),
}
KILLED_3 = re.compile(r"shouldn't be running anymore")
KILLED_2 = re.compile(r"externally set to (\w+)")
CURRENT_STATE = re.compile(r"""current_state['"]?\s*[:=]\s*['"]?(\w+)""")

OBSERVER = {
    "postgresql": [
        """CREATE TABLE tg_bench_changes (
             id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp(),
             dag_id varchar(250), run_id varchar(250), task_id varchar(250), map_index integer,
             old_state varchar(20), new_state varchar(20), old_start timestamptz, new_start timestamptz,
             old_end timestamptz, new_end timestamptz, old_try integer, new_try integer, old_duration float, new_duration float,
             writer varchar(64))""",
        """CREATE FUNCTION tg_bench_observe() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
             INSERT INTO tg_bench_changes (dag_id, run_id, task_id, map_index, old_state, new_state, old_start, new_start,
                                           old_end, new_end, old_try, new_try, old_duration, new_duration, writer)
             VALUES (NEW.dag_id, NEW.run_id, NEW.task_id, NEW.map_index, OLD.state, NEW.state, OLD.start_date, NEW.start_date,
                     OLD.end_date, NEW.end_date, OLD.try_number, NEW.try_number, OLD.duration, NEW.duration, current_setting('application_name'));
             RETURN NULL;
           END $$""",
        """CREATE TRIGGER tg_bench_observe AFTER UPDATE ON task_instance FOR EACH ROW
           WHEN (OLD.state IS DISTINCT FROM NEW.state) EXECUTE FUNCTION tg_bench_observe()""",
    ],
    "mysql": [
        """CREATE TABLE tg_bench_changes (
             id BIGINT AUTO_INCREMENT PRIMARY KEY, at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
             dag_id VARCHAR(250), run_id VARCHAR(250), task_id VARCHAR(250), map_index INTEGER,
             old_state VARCHAR(20), new_state VARCHAR(20), old_start DATETIME(6), new_start DATETIME(6),
             old_end DATETIME(6), new_end DATETIME(6), old_try INTEGER, new_try INTEGER, old_duration DOUBLE, new_duration DOUBLE,
             writer VARCHAR(64))""",
        """CREATE TRIGGER tg_bench_observe AFTER UPDATE ON task_instance FOR EACH ROW
           BEGIN
             IF NOT (OLD.state <=> NEW.state) THEN
               INSERT INTO tg_bench_changes (dag_id, run_id, task_id, map_index, old_state, new_state, old_start, new_start,
                                             old_end, new_end, old_try, new_try, old_duration, new_duration, writer)
               VALUES (NEW.dag_id, NEW.run_id, NEW.task_id, NEW.map_index, OLD.state, NEW.state, OLD.start_date, NEW.start_date,
                       OLD.end_date, NEW.end_date, OLD.try_number, NEW.try_number, OLD.duration, NEW.duration, @tg_writer);
             END IF;
           END""",
    ],
}


def profile(broker_db: int) -> Profile:
    return Profile(executor="CeleryExecutor", schedulers=2, workers=2, worker_concurrency=4,
                   dags_folder=HERE / "dags_production", dag_ids=tuple(LOAD), venv_extra="celery",
                   broker_url=f"redis://127.0.0.1:6379/{broker_db}",
                   env={"AIRFLOW__CORE__PARALLELISM": "16", "AIRFLOW__SCHEDULER__MAX_TIS_PER_QUERY": "16"})


def install_observer(dep: Deployment):
    with dep.engine.begin() as conn:
        for statement in OBSERVER["mysql" if dep.backend in MYSQL_SERVERS else "postgresql"]:
            conn.exec_driver_sql(statement)


# == Redis: a database number of our own =====================================================

REDIS = """
import sys, redis
r = redis.Redis(host="127.0.0.1", port=6379, db=int(sys.argv[2]))
if sys.argv[1] == "claim":  # the first empty database from 8 up, marked as ours until released
    for db in range(8, 16):
        r = redis.Redis(host="127.0.0.1", port=6379, db=db)
        if r.set("ti_guard_production_claim", sys.argv[3], nx=True):
            if r.dbsize() == 1:
                print(db); break
            r.delete("ti_guard_production_claim")
    else:
        sys.exit("no empty Redis database among 8-15")
else:
    r.flushdb()
"""


def redis_db(python: str, action: str, db: int = 0) -> int:
    done = subprocess.run([python, "-c", REDIS, action, str(db), uuid.uuid4().hex], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise DeploymentError(f"Redis {action} failed: {(done.stdout + done.stderr).strip()[-500:]}")
    return int(done.stdout.strip() or db)


# == The workload ==================================================================================

class Workload:
    """Keeps `load`'s runs active through the REST API until `stop()`; on Airflow before 3.3, every
    STALE_EVERY s, a stale scheduler's schedule_tis over a running prod_long task."""

    def __init__(self, dep: Deployment, prefix: str, stale: bool, load: dict):
        self.dep, self.prefix, self.stale, self.load = dep, prefix, stale, load
        self.triggered: list[tuple[str, str]] = []
        self.errors: list[str] = []
        self.stale_writes: list[dict] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self):
        self._threads = [threading.Thread(target=self._loop, daemon=True)]
        if self.stale:
            self._threads.append(threading.Thread(target=self._stale_loop, daemon=True))
        for t in self._threads:
            t.start()

    def stop(self):
        self._stop.set()
        for t in self._threads:
            t.join(timeout=300)

    def active(self) -> Counter:
        with self.dep.engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT dag_id, COUNT(*) FROM dag_run WHERE run_id LIKE :p AND state IN ('queued', 'running') "
                                        "GROUP BY dag_id"), {"p": self.prefix + "%"}).all()
        return Counter({d: n for d, n in rows})

    def busy(self) -> int:
        """Runs still active, and task instances still active in finished runs: a run the scheduler
        failed (its deadlock check, beside a kept task) can end while that task still runs."""
        with self.dep.engine.connect() as conn:
            tis = conn.execute(sa.text("SELECT COUNT(*) FROM task_instance WHERE run_id LIKE :p AND state IN "
                                       "('running', 'queued', 'scheduled', 'deferred', 'up_for_retry', 'up_for_reschedule', 'restarting')"),
                               {"p": self.prefix + "%"}).scalar()
        return sum(self.active().values()) + tis

    def _loop(self):
        n = 0
        while not self._stop.is_set():
            try:
                active = self.active()
                for dag_id, cap in self.load.items():
                    for _ in range(cap - active[dag_id]):
                        n += 1
                        run_id = f"{self.prefix}{n:04d}"
                        self.dep.trigger(dag_id, run_id)
                        self.triggered.append((dag_id, run_id))
            except Exception as exc:  # recorded; the loop goes on (a slow API answer is not the end)
                self.errors.append(f"{time.strftime('%H:%M:%S')} {exc!r}"[:500])
            self._stop.wait(2)

    def _stale_loop(self):
        while not self._stop.wait(STALE_EVERY):
            with self.dep.engine.connect() as conn:
                run_id = conn.execute(sa.text("SELECT run_id FROM task_instance WHERE dag_id = 'prod_long' AND task_id = 'sleeps' "
                                              "AND run_id LIKE :p AND state = 'running'"), {"p": self.prefix + "%"}).scalars().first()
            if run_id is None:
                continue
            try:
                result = _stale_schedule(self.dep, "prod_long", run_id, "sleeps")
                self.stale_writes.append({"run_id": run_id, **{k: v for k, v in result.items() if k != "traceback"}})
            except DeploymentError as exc:
                self.errors.append(f"stale schedule_tis: {exc}"[:500])


# == Reading a variant back ========================================================================

def classify(change: dict | None) -> str:
    """The route of the write that moved a running attempt, by what it wrote (docs/policy.md's writers)."""
    if change is None:
        return "unobserved"
    new = change["new_state"]
    if new == "scheduled" and change["new_try"] != change["old_try"]:
        return "stale_schedule"
    if new == "skipped":
        if change["new_start"] != change["old_start"]:
            # set_state on a copy read before the start also writes duration (0); the racy routes never do.
            stale_copy = change.get("new_duration") != change.get("old_duration") or change.get("new_duration") == 0
            return "stale_set_state_skip" if stale_copy else "racy_skip"
        if change["new_end"] is None:
            return "dagrun_timeout"
        return "set_state_skip"
    return f"set_state_{new}"


def task_logs(dep: Deployment, run_ids) -> dict:
    """(dag_id, run_id, task_id, map_index, attempt) -> the text of each attempt's log of these runs."""
    out, wanted = {}, set(run_ids)
    logs = dep.home / "logs"
    if not logs.exists():
        return out
    for path in logs.glob("dag_id=*/run_id=*/task_id=*/**/attempt=*.log"):
        parts = dict(p.split("=", 1) for p in path.relative_to(logs).with_suffix("").parts if "=" in p)
        # attempt=1.log.trigger.4.log is the triggerer's log of a deferral, not an attempt's
        if parts.get("run_id") not in wanted or not parts["attempt"].isdigit():
            continue
        key = (parts["dag_id"], parts["run_id"], parts["task_id"], int(parts.get("map_index", -1)), int(parts["attempt"]))
        out[key] = path.read_text(errors="replace")
    return out


def kills(dep: Deployment, run_ids) -> list[dict]:
    """Every attempt told to stop from outside, with the observed write that moved it."""
    found = []
    for (dag_id, run_id, task_id, map_index, attempt), text in task_logs(dep, run_ids).items():
        if dep.major == 2:
            match = KILLED_2.search(text)
            told, state = bool(match), match.group(1) if match else None
        else:
            line = next((ln for ln in text.splitlines() if KILLED_3.search(ln)), None)
            told = line is not None
            match = CURRENT_STATE.search(line or "")
            state = match.group(1) if match else None
        if not told:
            continue
        with dep.engine.connect() as conn:
            # The write that moved this attempt off running: try_number is the attempt's number (2.10+,
            # 3.x); a later attempt's own finish must not be taken for it.
            row = conn.execute(sa.text(
                "SELECT old_state, new_state, old_start, new_start, old_end, new_end, old_try, new_try, old_duration, new_duration, writer "
                "FROM tg_bench_changes "
                "WHERE dag_id = :d AND run_id = :r AND task_id = :t AND map_index = :m AND old_state = 'running' "
                "ORDER BY CASE WHEN old_try = :a THEN 0 ELSE 1 END, id DESC"),
                {"d": dag_id, "r": run_id, "t": task_id, "m": map_index, "a": attempt}).mappings().first()
        change = dict(row) if row else None
        found.append({"dag_id": dag_id, "run_id": run_id, "task_id": task_id, "map_index": map_index, "attempt": attempt,
                      "current_state": state or (change or {}).get("new_state"), "route": classify(change),
                      "writer": (change or {}).get("writer") or "unobserved", "engineered": dag_id in RACE_DAGS,
                      "write": {k: str(v) for k, v in (change or {}).items() if k != "writer"}})
    return found


def outcomes(dep: Deployment, prefix: str) -> dict:
    with dep.engine.connect() as conn:
        runs = conn.execute(sa.text("SELECT dag_id, state, COUNT(*) FROM dag_run WHERE run_id LIKE :p GROUP BY dag_id, state"),
                            {"p": prefix + "%"}).all()
        tis = conn.execute(sa.text("SELECT dag_id, task_id, state, COUNT(*) FROM task_instance WHERE run_id LIKE :p "
                                   "GROUP BY dag_id, task_id, state"), {"p": prefix + "%"}).all()
    out = {"runs": {}, "tis": {}}
    for dag_id, state, n in runs:
        out["runs"].setdefault(dag_id, {})[state or "none"] = n
    for dag_id, task_id, state, n in tis:
        key = f"{dag_id}.{re.sub(r'_[0-9]+$', '_*', task_id)}"  # the fan-out's parts as one line
        out["tis"].setdefault(key, Counter())[state or "none"] += n
    out["tis"] = {k: dict(v) for k, v in sorted(out["tis"].items())}
    return out


def throughput(dep: Deployment, prefix: str, since, until) -> dict:
    """Task instances finished per minute while the load ran; `ordinary_per_minute` leaves out the race
    DAGs, whose kept tasks run to their end where `none` stops them (more work, not a slower scheduler)."""
    with dep.engine.connect() as conn:
        finished = conn.execute(sa.text("SELECT dag_id, end_date FROM task_instance WHERE run_id LIKE :p AND end_date IS NOT NULL "
                                        "AND state IN ('success', 'failed', 'skipped')"), {"p": prefix + "%"}).all()
    inside = [d for d, e in finished if since <= utc(e) <= until]
    ordinary = [d for d in inside if d not in RACE_DAGS]
    minutes = (until - since).total_seconds() / 60
    return {"tis_finished": len(inside), "minutes": round(minutes, 2), "per_minute": round(len(inside) / minutes, 2) if minutes else None,
            "ordinary_per_minute": round(len(ordinary) / minutes, 2) if minutes else None}


def scheduling_delays(dep: Deployment, prefix: str) -> dict:
    """From the moment a task could run (its last upstream's end; a first task: the run's queued_at)
    to its start, for the fan-out and chain DAGs' task instances that ran."""
    delays = []
    for dag_id in DELAY_DAGS:
        status, body = dep.rest.call("GET", f"{dep.rest.api}/dags/{dag_id}/tasks")
        if status != 200:
            raise DeploymentError(f"GET tasks of {dag_id} answered {status}")
        upstream: dict[str, list] = {t["task_id"]: [] for t in body["tasks"]}
        for t in body["tasks"]:
            for down in t.get("downstream_task_ids") or []:
                upstream[down].append(t["task_id"])
        with dep.engine.connect() as conn:
            rows = conn.execute(sa.text(
                "SELECT ti.run_id, ti.task_id, ti.state, ti.start_date, ti.end_date, dr.queued_at FROM task_instance ti "
                "JOIN dag_run dr ON dr.dag_id = ti.dag_id AND dr.run_id = ti.run_id WHERE ti.dag_id = :d AND ti.run_id LIKE :p"),
                {"d": dag_id, "p": prefix + "%"}).all()
        by_run: dict[str, dict] = {}
        for run_id, task_id, state, start, end, queued in rows:
            by_run.setdefault(run_id, {})[task_id] = (state, utc(start), utc(end), utc(queued))
        for tasks in by_run.values():
            for task_id, (state, start, _end, queued) in tasks.items():
                ups = [tasks.get(u) for u in upstream.get(task_id, [])]
                if state != "success" or start is None or any(u is None or u[2] is None for u in ups):
                    continue
                ready = max(u[2] for u in ups) if ups else queued
                if ready is not None:
                    delays.append((start - ready).total_seconds())
    if not delays:
        return {"n": 0}
    delays.sort()
    return {"n": len(delays), "p50": round(statistics.median(delays), 2), "p95": round(delays[min(len(delays) - 1, int(0.95 * len(delays)))], 2)}


def log_errors(dep: Deployment, offsets: dict) -> dict:
    """kind -> component -> matching lines written since `offsets`."""
    out: dict = {}
    for name, lines in dep.new_log_lines(offsets):
        for kind, pattern in ERRORS.items():
            hits = [line[:300] for line in lines if pattern.search(line)]
            if hits:
                out.setdefault(kind, {})[name] = {"count": len(hits), "first": hits[:3]}
    return out


def pg_deadlocks(dep: Deployment):
    if dep.backend != "postgresql":
        return None
    with dep.engine.connect() as conn:
        return conn.execute(sa.text("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")).scalar()


# MariaDB and MySQL 9.7 (tests/servers/mysql97.sh) each run one server process on this machine.
SERVER_PROCESS = {"mysql": "mariadbd", "mysql9": "mysqld"}


def _processes() -> dict[int, tuple[int, str, float]]:
    """pid -> (parent pid, command name, CPU seconds of the process and of the children it reaped)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:  # gone since the scan
            continue
        comm = text[text.index("(") + 1:text.rindex(")")]
        fields = text[text.rindex(")") + 2:].split()
        out[int(entry.name)] = (int(fields[1]), comm, sum(int(f) for f in fields[11:15]) / tick)
    return out


def _tree_cpu(procs: dict, roots) -> float:
    """CPU seconds of the live processes under `roots` and of every child they reaped: a process that
    ended during the window moves from its own count into its parent's, so differences stay exact."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _comm, _cpu) in procs.items():
        children.setdefault(ppid, []).append(pid)
    seen, todo = set(), [r for r in roots if r in procs]
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo += children.get(pid, [])
    return sum(procs[pid][2] for pid in seen)


def cpu_seconds(dep: Deployment) -> dict:
    """CPU seconds so far of the database server (PostgreSQL: the postmaster's tree; MySQL: its one
    process) and of Airflow's components (each one's process tree: Celery's pool, the task processes)."""
    if dep.backend == "postgresql":
        with dep.engine.connect() as conn:  # the postmaster is this connection's parent process
            backend = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar()
            procs = _processes()
        servers = [procs[backend][0]]
    else:
        procs = _processes()
        servers = [pid for pid, (_ppid, comm, _cpu) in procs.items() if comm == SERVER_PROCESS[dep.backend]]
    return {"database": _tree_cpu(procs, servers), "airflow": _tree_cpu(procs, [p.pid for p in dep.procs.values()])}


def guard_report(dep: Deployment) -> object:
    done = subprocess.run([str(PROJECT_BIN / "ti-guard"), "report", "--url", dep.url, "--format", "json"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    try:
        return json.loads(done.stdout)
    except ValueError:
        return {"rc": done.returncode, "output": (done.stdout + done.stderr)[-1000:]}


# == One deployment, every variant ===================================================================

def loads(name: str) -> dict:
    """"full": every DAG, the race shapes included. "ordinary": no race DAG and no stale scheduler, so
    the guard keeps nothing and changes no outcome: what is left between variants is what its
    triggers cost (with "full", a kept task runs to its end where `none` stops it: more work)."""
    if name not in ("full", "ordinary"):
        raise ValueError(f"unknown load {name!r}: use full or ordinary")
    return {d: n for d, n in LOAD.items() if name == "full" or d not in RACE_DAGS}


def run_production(version: str, backend: str, admin_url: str, variants, seconds: float, workdir: Path, load: str = "full") -> dict:
    started = time.monotonic()
    result = {"version": version, "backend": backend, "load": load, "variants": [], "seconds_per_variant": seconds, "timings": {}, "restarts": []}
    dep = None
    broker = None
    try:
        import airflow_venv  # tests/airflow, on the path through deployment.py

        python = str(airflow_venv.python_of(airflow_venv.ensure(version, say=say, extra="celery")))
        broker = redis_db(python, "claim")
        prof = profile(broker)
        result["profile"] = {"executor": prof.executor, "schedulers": prof.schedulers, "workers": prof.workers,
                             "worker_concurrency": prof.worker_concurrency, "broker": prof.broker_url, "load": loads(load)}
        dep = Deployment(version, backend, admin_url, workdir, prof)
        dep.start(result["timings"], prepare=install_observer)
        result["server"] = dep.server
        result["components"] = list(dep.components)
        stale = load == "full" and tuple(int(x) for x in version.split(".")[:2]) < (3, 3)
        for index, variant in enumerate(variants, 1):
            result["variants"].append(run_variant(dep, variant, index, seconds, stale, loads(load)))
    except Exception as exc:
        import traceback
        result["error"] = f"{exc.__class__.__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
        say(f"[production {version} {backend}] ERROR {result['error']} (logs in {workdir})")
    finally:
        if dep is not None:
            try:
                dep.close()
            except Exception as exc:
                result.setdefault("error", f"stopping the deployment failed: {exc!r}")
            result["restarts"] = dep.restarts
        if broker is not None:
            try:
                redis_db(python, "flush", broker)
            except DeploymentError as exc:
                result.setdefault("error", str(exc))
        result["seconds"] = round(time.monotonic() - started, 1)
    return result


def run_variant(dep: Deployment, variant: str, index: int, seconds: float, stale: bool, load: dict) -> dict:
    tag = f"[production {dep.version} {dep.backend}]"
    out = {"variant": variant, "index": index, "restarted_before": dep.restart_dead(f"before variant {variant} #{index}")}
    out["guard"] = dep.switch_guard(variant)
    recorded_before = dep.refusals()
    offsets = dep.log_offsets()
    deadlocks_before = pg_deadlocks(dep)
    prefix = f"pb-{variant}{index}-{uuid.uuid4().hex[:6]}-"
    say(f"{tag} variant {variant} #{index}: {out['guard']['command']} -> rc {out['guard']['rc']}; {seconds:.0f} s of load ({prefix})")
    workload = Workload(dep, prefix, stale, load)
    cpu_before = cpu_seconds(dep)
    since = now_utc()
    workload.start()
    time.sleep(seconds)
    until = now_utc()
    cpu = {k: round(n - cpu_before[k], 1) for k, n in cpu_seconds(dep).items()}
    workload.stop()
    drained = time.monotonic()
    try:
        dep.deadline = None
        dep.wait("the variant's runs and task instances to finish", lambda: not workload.busy(), timeout=DRAIN_TIMEOUT, interval=3)
        out["drained"] = True
    except DeploymentError as exc:
        out["drained"] = False
        out["drain_error"] = str(exc)
    out["drain_seconds"] = round(time.monotonic() - drained, 1)
    run_ids = [r for _, r in workload.triggered]
    out["triggered"] = Counter(d for d, _ in workload.triggered)
    out["workload_errors"] = workload.errors[:20]
    out["stale_writes"] = workload.stale_writes
    out["window_seconds"] = round((until - since).total_seconds(), 1)
    out["throughput"] = throughput(dep, prefix, since, until)
    finished = out["throughput"]["tis_finished"]
    out["cpu"] = {"seconds": cpu, "ms_per_ti": {k: round(1000 * n / finished, 1) if finished else None for k, n in cpu.items()}}
    out["delay"] = scheduling_delays(dep, prefix)
    out["outcomes"] = outcomes(dep, prefix)
    out["kills"] = kills(dep, run_ids)
    out["recorded"] = {k: n - recorded_before.get(k, 0) for k, n in dep.refusals().items() if n != recorded_before.get(k, 0)}
    out["report"] = guard_report(dep) if variant != "none" else None
    out["exited"] = dep.exited()
    out["bad_log_lines"] = dep.new_bad_lines(offsets)
    out["log_errors"] = log_errors(dep, offsets)
    after = pg_deadlocks(dep)
    out["pg_deadlocks"] = None if after is None else after - deadlocks_before
    say(f"{tag} variant {variant} #{index}: {out['throughput']}, delay {out['delay']}, CPU ms/TI {out['cpu']['ms_per_ti']}, kills "
        f"{Counter((k['route'], k['current_state']) for k in out['kills'])}, recorded {out['recorded']}, "
        f"exited {out['exited'] or 'none'}, errors {sorted(out['log_errors']) or 'none'}")
    return out
