"""The guard on a real running Airflow: api-server, scheduler (LocalExecutor), dag-processor, triggerer.

One deployment per (Airflow version, backend) is started once (deployment.py) and every variant
runs on it in turn: `none` (`ti-guard uninstall`), `raise`, `ignore` (`ti-guard install --mode`).
In each variant the cases run concurrently (their DAGs in dags/deploy_dags.py). The `none`
variant is the yardstick: every other variant must end every run and task instance as `none`
did, except where EXPECTED below says otherwise; where EXPECTED has an entry for `none` (the race:
the bug reproduced), `none` itself is held to it. Universal properties are asserted per variant:
no component exited, the scheduler kept heartbeating, no new traceback in a component's log.

Matrix: TI_GUARD_DEPLOY_MATRIX=default (CI: 3.3.2 on PostgreSQL, MariaDB and MySQL 9.7 with every
case, 3.1.8 on PostgreSQL with the race and schedule_tis, 2.11.2 on PostgreSQL with the race and
the run timeout), =full (3.3.2, 3.1.8 and 2.11.2 x PostgreSQL, MariaDB and MySQL 9.7, every case of
the version), or an explicit list such as `3.3.2-postgresql:race+timeout,3.1.8-mysql9,2.11.2-postgresql`.
Backend ids as in tests/conftest.py: `mysql` is MariaDB, `mysql9` Oracle MySQL 9.7; an EXPECTED entry
for `mysql` holds for both (the guard's SQL is the same) unless a `mysql9` entry says otherwise.
Airflow 2 runs as `airflow webserver` (REST API v1, basic auth) and `airflow scheduler` (LocalExecutor,
its DAG parsing, LocalTaskJob heartbeats).
TI_GUARD_DEPLOY_VARIANTS (default none,raise,ignore; none must come first; MODE-RULE installs MODE with
that rule switched off, e.g. ignore-set_state_skip). Results go to
TI_GUARD_DEPLOY_RESULTS (default .pytest_cache/ti-guard-deploy.json) for deploy_table.py.
Work dirs (every component's log, task logs, markers) are kept when a check failed and named
in the failure; otherwise deleted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

import conftest as main_conftest

from . import deployment
from .deployment import say

pytestmark = pytest.mark.deploy

# ---------------------------------------------------------------------------------------------
# Expected outcomes, per (version, backend, variant, case): "*" matches anything; the most
# specific matching entry wins (exact version beats "*", then exact backend, then variant).
# A value is {run label: {"@run": run state, task_id: TI state, "@http": {call name: status}}}:
# it overrides what the `none` variant of the same deployment produced (no entry: exactly as
# `none`). RECORD: measured and shown, not asserted.
# ---------------------------------------------------------------------------------------------
RECORD = None
ALL = "*"
# With set_state_skip, `join` keeps running and succeeds; the scheduler's deadlock check
# (`DagRun.update_state`: no unfinished TI has its deps met, and join's NotPreviouslySkippedDep
# fails on every pass) then marks the run failed while join still runs. Measured; docs/policy.md, "Policy".
_RACE_GUARDED = {"race": {"@run": "failed", "fast": "success", "branch": "success", "join": "success", "other": "success"}}
_RACE_UNGUARDED = {"race": {"@run": "success", "fast": "success", "branch": "success", "join": "skipped", "other": "success"}}
EXPECTED = {
    # The scheduler's designed dagrun_timeout write goes through the guard, in every variant.
    (ALL, ALL, ALL, "timeout"): {"timeout": {"@run": "failed", "sleeps": "skipped"}},
    # Both tasks skip themselves (after a deferral; a soft_fail sensor timing out in reschedule mode).
    (ALL, ALL, ALL, "deferrable"): {"deferrable": {"@run": "success", "defer_then_skip": "skipped", "reschedule_soft_fail": "skipped"}},
    # REST "mark as skipped" on a running TI: on PostgreSQL (and MySQL 9.7, below) the guard leaves the
    # row running (the call still answers 200: the ORM sees its 1 row) and the task runs on to success.
    # MariaDB cannot tell that write from a task's own finish: there it goes through, as without the guard.
    (ALL, "postgresql", "raise", "rest_marks"): {"marks": {"long_skip": "success"}},
    (ALL, "postgresql", "ignore", "rest_marks"): {"marks": {"long_skip": "success"}},
    # The seed's race: with the guard, `join` keeps running and succeeds, and so does the run.
    # (First runs, 3.3.2 and 3.1.8 on PostgreSQL, both modes: join success but the run FAILED: the
    # scheduler's set_state(skipped) on the running join is kept out of the row, the scheduler's next
    # pass skips it again in memory and logs "Task deadlock (no runnable tasks); marking run failed".)
    (ALL, "postgresql", "raise", "race"): _RACE_GUARDED,
    (ALL, "postgresql", "ignore", "race"): _RACE_GUARDED,
    # Without the guard the bug reproduced: the racy skip (3.0/3.1, 2.x) or the scheduler's
    # set_state (3.3) skips the running `join`, which is stopped before its end (test_race_was_exercised:
    # join not success <=> its command did not run to the end), and the run ends success. Measured on
    # every version and backend of the matrix (docs/deployments.md, deployment block).
    (ALL, ALL, "none", "race"): _RACE_UNGUARDED,
    # MariaDB on Airflow 3 (performance_schema OFF, its default): the scheduler's set_state(skipped)
    # on the running join has a self-finish's values and the statement cannot be read, so it goes
    # through (docs/policy.md, "What MySQL can see of a statement"): the second writer still kills
    # join, as without the guard (measured on 3.3.2, both modes).
    (ALL, "mysql", "raise", "race"): _RACE_UNGUARDED,
    (ALL, "mysql", "ignore", "race"): _RACE_UNGUARDED,
    # MySQL 9.7 (performance_schema ON, its default): the trigger reads the scheduler's statement, sees
    # no next_method in its SET list and keeps join, as on PostgreSQL; the REST mark of a running task
    # is the same SQL and is kept too.
    (ALL, "mysql9", "raise", "race"): _RACE_GUARDED,
    (ALL, "mysql9", "ignore", "race"): _RACE_GUARDED,
    (ALL, "mysql9", "raise", "rest_marks"): {"marks": {"long_skip": "success"}},
    (ALL, "mysql9", "ignore", "rest_marks"): {"marks": {"long_skip": "success"}},
    # The operator's choice (docs/policy.md, "Switching rules"): ignore with set_state_skip switched off
    # lets the second writer through on every backend, so the race ends as without the guard; the
    # REST mark of a running TI goes through too (no entry: as `none`).
    (ALL, ALL, "ignore-set_state_skip", "race"): _RACE_UNGUARDED,
    # ... but 3.1.8 (PostgreSQL, once, 2026-12-06): racy_skip kept the racy route's write, the scheduler's
    # set_state then skipped join (stopped) AND its deadlock check failed the run (on_failure_callback):
    # the worst of both. One run: recorded, not asserted (docs/policy.md).
    ("3.1.8", ALL, "ignore-set_state_skip", "race"): RECORD,
    # 3.1.8 raise: the branch's racy skip route is refused with an error: the branch task fails and
    # `other` ends upstream_failed (docs/policy.md, "Which mode"). Asserted, with the run.
    ("3.1.8", ALL, "raise", "race"): {"race": {"@run": "failed", "fast": "success", "branch": "failed", "join": "success",
                                               "other": "upstream_failed"}},
    # ... and on MariaDB the second writer (set_state, which MariaDB cannot tell) skips join anyway;
    # MySQL 9.7 keeps it as PostgreSQL does (the FULL matrix; not run for this change).
    ("3.1.8", "mysql", "raise", "race"): {"race": {"@run": "failed", "fast": "success", "branch": "failed", "join": "skipped",
                                                   "other": "upstream_failed"}},
    ("3.1.8", "mysql9", "raise", "race"): {"race": {"@run": "failed", "fast": "success", "branch": "failed", "join": "success",
                                                    "other": "upstream_failed"}},
    # 2.11.2 raise: SkipMixin's racy UPDATE is refused with an error in the branch's own process: the
    # branch fails, `other` ends upstream_failed, and no skipmixin XCom is written, so no second writer.
    ("2.11.2", ALL, "raise", "race"): {"race": {"@run": "failed", "fast": "success", "branch": "failed", "join": "success",
                                                "other": "upstream_failed"}},
    # 2.11.2 on MariaDB: set_state_skip is enforced on Airflow 2 tables (by value), so the REST mark of
    # the running long_skip is kept as on PostgreSQL.
    ("2.11.2", "mysql", "raise", "rest_marks"): {"marks": {"long_skip": "success"}},
    ("2.11.2", "mysql", "ignore", "rest_marks"): {"marks": {"long_skip": "success"}},
    ("2.11.2", "mysql", "ignore", "race"): _RACE_GUARDED,
    # A stale scheduler's schedule_tis over the running `sleeps`: the task ends success in every variant
    # (without the guard on 3.1.8 only after running twice); STALE_SCHEDULE below says how.
    (ALL, ALL, ALL, "schedule_tis"): {"schedule_tis": {"@run": "success", "sleeps": "success"}},
}
# schedule_tis (apache/airflow#60330), per (version, backend, variant, "schedule_tis"), most specific
# entry wins as in EXPECTED: what the stale scheduler's real `DagRun.schedule_tis` call returned (its
# count of rows) and raised, the TI's state read right after its UPDATE (in its transaction, before the
# commit, so the real scheduler cannot have moved it on yet), and at the end the TI's state,
# try_number, how many times the task started, and whether the first attempt's log says the server
# told it to stop (a heartbeat answered 409 because the row was no longer running).
_NOT_OVERWRITTEN = {"returned": 1, "error": None, "state right after": "running", "final state": "success",
                    "try_number": 1, "starts": 1, "first attempt told to stop": False}
STALE_SCHEDULE = {
    # The guard's stale_schedule rule keeps the row in both modes (never raises: it runs in the
    # scheduler loop); the statement still counts the kept row, as upstream's ORM callers expect.
    (ALL, ALL, ALL, "schedule_tis"): _NOT_OVERWRITTEN,
    # 3.1.8 without the guard: the running TI goes back to scheduled with try_number 2, its worker is
    # stopped on its next heartbeat and the task runs a second time.
    ("3.1.8", ALL, "none", "schedule_tis"): {"returned": 1, "error": None, "state right after": "scheduled",
                                            "final state": "success", "try_number": 2, "starts": 2,
                                            "first attempt told to stop": True},
    # 2.11.2 without the guard: the running TI goes back to scheduled with try_number 2 and runs a second
    # time while the first attempt still runs: its LocalTaskJob is not told to stop, its heartbeat fails
    # ("PID of job runner does not match", the second attempt's LocalTaskJob took the row) until it ends.
    ("2.11.2", ALL, "none", "schedule_tis"): {"returned": 1, "error": None, "state right after": "scheduled",
                                             "final state": "success", "try_number": 2, "starts": 2,
                                             "first attempt told to stop": False},
    # 3.3.2's WHERE (state IS NULL OR up_for_retry / up_for_reschedule) matches no row: nothing to keep.
    ("3.3.2", ALL, ALL, "schedule_tis"): {**_NOT_OVERWRITTEN, "returned": 0},
}
# Component-log tracebacks that are the measured cost of a mode, not a failure of the suite:
# (version, backend, variant) -> (component, what each of its lines must match, why). Only lines of
# that component that match are let through (recorded and shown in the docs/deployments.md block); any other
# traceback, in that component or another, fails as everywhere else.
KNOWN_TRACEBACKS = {
    ("3.1.8", ALL, "raise"): ("api-server", re.compile(r"ti_guard: refused|RuntimeError: No response returned\."),
                              "raise mode refuses 3.1.8's racy skip route: the API server answers 500 and logs it"),
}

ALL_CASES = tuple(deployment.CASES)
# Airflow 2 has the run timeout, REST marks (API v1), the race and schedule_tis; fail_fast and the
# deferral cases are Airflow 3's (their writers do not reach a protected row to skip it).
CASES_BY_MAJOR = {3: ALL_CASES, 2: ("timeout", "rest_marks", "race", "schedule_tis")}
VERSIONS = ("3.3.2", "3.1.8", "2.11.2")
BACKENDS = main_conftest.SERVERS
DEFAULT_MATRIX = [("3.3.2", "postgresql", ALL_CASES), ("3.3.2", "mysql", ALL_CASES), ("3.3.2", "mysql9", ALL_CASES),
                  ("3.1.8", "postgresql", ("race", "schedule_tis")), ("2.11.2", "postgresql", ("race", "timeout"))]
FULL_MATRIX = [(v, b, CASES_BY_MAJOR[int(v.split(".")[0])]) for v in VERSIONS for b in BACKENDS]
ADMIN_URLS = main_conftest.SERVER_URLS
RESULTS = Path(os.environ.get("TI_GUARD_DEPLOY_RESULTS", deployment.REPO / ".pytest_cache" / "ti-guard-deploy.json"))
HEARTBEAT_MAX_AGE = 30


def _matrix():
    spec = os.environ.get("TI_GUARD_DEPLOY_MATRIX", "default").strip()
    if spec == "default":
        return DEFAULT_MATRIX
    if spec == "full":
        return FULL_MATRIX
    out = []
    for item in filter(None, (i.strip() for i in spec.split(","))):
        combo, _, cases = item.partition(":")
        version, _, backend = combo.partition("-")
        chosen = tuple(c for c in cases.split("+") if c) if cases else CASES_BY_MAJOR[int(version.split(".")[0])]
        unknown = set(chosen) - set(ALL_CASES)
        if backend not in BACKENDS or unknown:
            raise pytest.UsageError(f"TI_GUARD_DEPLOY_MATRIX: cannot read {item!r} (backends {BACKENDS}, cases {ALL_CASES})")
        out.append((version, backend, chosen))
    return out


MATRIX = _matrix()
VARIANTS = tuple(v.strip() for v in os.environ.get("TI_GUARD_DEPLOY_VARIANTS", "none,raise,ignore").split(",") if v.strip())
assert VARIANTS and VARIANTS[0] == "none", "TI_GUARD_DEPLOY_VARIANTS must start with none (the yardstick)"
CHECKS: list[dict] = []


def expected_for(version, backend, variant, case, table=None):
    """The most specific EXPECTED (or `table`) entry: (found, value). A backend matches exactly,
    then by dialect (`mysql` entries hold for `mysql9`), then ALL."""
    best, found, value = -1, False, None
    dialect = main_conftest.dialect_of(backend)
    for (v, b, var, c), entry in (EXPECTED if table is None else table).items():
        if c != case or v not in (ALL, version) or b not in (ALL, backend, dialect) or var not in (ALL, variant):
            continue
        score = 8 * (v != ALL) + 2 * ((b != ALL) + (b == backend)) + (var != ALL)
        if score > best:
            best, found, value = score, True, entry
    return found, value


@pytest.fixture(scope="session")
def deployments(request):
    """Runs every deployment of the matrix once, one after the other (2 cores: never two at once)."""
    for backend in {b for _, b, _ in MATRIX}:
        main_conftest._admin(ADMIN_URLS[backend]).dispose()  # an unreachable server fails here, never a skip
    results = {}
    with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        for version, backend, cases in MATRIX:
            workdir = Path(tempfile.mkdtemp(prefix=f"ti-guard-deploy-{version}-{backend}-"))
            say(f"[deploy {version} {backend}] work dir {workdir}")
            results[(version, backend)] = deployment.run_deployment(version, backend, ADMIN_URLS[backend], cases, VARIANTS, workdir)
            _write_results(results)
    yield results
    _write_results(results)
    for (version, backend), result in results.items():
        failed = "error" in result or any(not c["ok"] for c in CHECKS if (c["version"], c["backend"]) == (version, backend))
        if failed:
            say(f"[deploy {version} {backend}] kept the work dir with every log: {result['workdir']}")
        else:
            shutil.rmtree(result["workdir"], ignore_errors=True)


def _write_results(results):
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    data = {"variants": list(VARIANTS), "deployments": [{**r, "key": list(k)} for k, r in results.items()], "checks": CHECKS}
    RESULTS.write_text(json.dumps(data, indent=1, default=str))


def check(dep, variant, what, observed, expected, case=None):
    """Records the comparison (for the docs/deployments.md block), then asserts it, naming the kept work dir."""
    ok = observed == expected
    CHECKS.append({"version": dep["version"], "backend": dep["backend"], "variant": variant, "case": case, "check": what,
                   "ok": ok, "observed": observed, "expected": expected})
    assert ok, (f"airflow {dep['version']} {dep['backend']} [{variant}] {case or ''} {what}: observed != expected "
                f"(logs kept in {dep['workdir']})\nobserved: {observed}\nexpected: {expected}")


@pytest.fixture
def dep(deployments, version, backend):
    result = deployments[(version, backend)]
    if "error" in result:
        pytest.fail(f"airflow {version} on {backend}: the deployment did not run through: {result['error']} "
                    f"(logs kept in {result['workdir']})\n{result.get('traceback', '')}", pytrace=False)
    return result


def _variant(dep, variant):
    out = dep["variants"].get(variant)
    if out is None:
        pytest.fail(f"variant {variant} did not run (logs kept in {dep['workdir']})", pytrace=False)
    return out


def _params(with_case=False, only=None):
    rows = []
    for version, backend, cases in MATRIX:
        for variant in VARIANTS:
            for case in (cases if with_case else (None,)):
                if only and case not in only:
                    continue
                rows.append(pytest.param(version, backend, variant, case, id="-".join(filter(None, (version, backend, variant, case)))))
    return pytest.mark.parametrize("version,backend,variant,case", rows)


# --------------------------------------------------------------------------------- per variant

@_params()
def test_guard_applied(dep, variant, case):
    """`ti-guard uninstall` / `install --mode` on the live database exits 0 and `status` agrees (2 missing, 0 current)."""
    guard = _variant(dep, variant)["guard"]
    check(dep, variant, "guard applied", {"rc": guard["rc"], "status": guard["status_rc"]},
          {"rc": 0, "status": 2 if variant == "none" else 0})


@_params()
def test_components_kept_running(dep, variant, case):
    """No component process exited during the variant (nor had to be restarted before it)."""
    out = _variant(dep, variant)
    restarted = {r["component"]: r["returncode"] for r in out["restarted_before"]} if isinstance(out["restarted_before"], list) else out["restarted_before"]
    check(dep, variant, "components running", {"exited": out["exited"], "restarted_before": restarted}, {"exited": {}, "restarted_before": {}})


@_params()
def test_scheduler_heartbeats(dep, variant, case):
    """The scheduler's job row heartbeat advanced during the variant and is recent at its end."""
    sched = _variant(dep, variant)["scheduler"]
    age = sched["age_at_end"]
    check(dep, variant, "scheduler heartbeat", {"advanced": sched["advanced"], "recent": age is not None and age <= HEARTBEAT_MAX_AGE},
          {"advanced": True, "recent": True})


@_params()
def test_no_new_tracebacks_in_component_logs(dep, variant, case):
    """No `Traceback` / scheduler-loop exception newly written to api-server, scheduler, dag-processor, triggerer logs."""
    bad = _variant(dep, variant)["bad_log_lines"]
    bad, known = known_tracebacks(dep["version"], dep["backend"], variant, bad)
    if known:
        CHECKS.append({"version": dep["version"], "backend": dep["backend"], "variant": variant, "case": None,
                       "check": "known component log lines", "ok": True, "observed": known["lines"],
                       "expected": f"recorded only: {known['why']}"})
    check(dep, variant, "component logs", bad, {})


def known_tracebacks(version, backend, variant, bad: dict) -> tuple[dict, dict]:
    """(the bad log lines left once KNOWN_TRACEBACKS' lines are taken out, {"lines", "why"} of those taken out)."""
    dialect = main_conftest.dialect_of(backend)
    for (v, b, var), (component, pattern, why) in KNOWN_TRACEBACKS.items():
        if v in (ALL, version) and b in (ALL, backend, dialect) and var == variant:
            lines = bad.get(component, [])
            left = {**bad, component: [line for line in lines if not pattern.search(line)]}
            return {c: ls for c, ls in left.items() if ls}, {"lines": [line for line in lines if pattern.search(line)], "why": why}
    return bad, {}


# ------------------------------------------------------------------------------------ per case

@_params(with_case=True)
def test_case_ran(dep, variant, case):
    """The case drove its runs to the end within its deadlines, and the variant's TIs all finished."""
    out = _variant(dep, variant)
    check(dep, variant, "ran to the end", {"error": out["cases"][case].get("error"), "all TIs finished": out["quiet"]["quiet"]},
          {"error": None, "all TIs finished": True}, case=case)


@_params(with_case=True)
def test_final_states(dep, variant, case):
    """Every run and TI of the case ends as in the `none` variant, except where EXPECTED says otherwise."""
    found, entry = expected_for(dep["version"], dep["backend"], variant, case)
    observed = _final(_variant(dep, variant)["cases"][case])
    if found and entry is RECORD:
        CHECKS.append({"version": dep["version"], "backend": dep["backend"], "variant": variant, "case": case,
                       "check": "final states", "ok": True, "observed": observed, "expected": "recorded only"})
        return
    expected = _final(_variant(dep, "none")["cases"][case])
    for label, overrides in (entry or {}).items():
        run = expected.setdefault(label, {"@run": None})
        run.update({k: v for k, v in overrides.items() if k != "@http"})
    check(dep, variant, "final states", observed, expected, case=case)


def _final(case_out):
    return {label: {"@run": f["run"], **{t: v["state"] for t, v in f["tis"].items()}} for label, f in case_out.get("final", {}).items()}


@_params(with_case=True, only=("rest_marks",))
def test_rest_calls_answer_as_without_guard(dep, variant, case):
    """Each REST call (mark TI skipped/failed/success, mark finished TI skipped, clear, mark run failed) answers as without the guard."""
    found, entry = expected_for(dep["version"], dep["backend"], variant, case)
    if found and entry is RECORD:
        return
    calls = lambda v: {c["name"]: c["status"] for c in _variant(dep, v)["cases"][case].get("calls", [])}  # noqa: E731
    expected = calls("none")
    for overrides in (entry or {}).values():
        expected.update(overrides.get("@http", {}))
    check(dep, variant, "REST answers", calls(variant), expected, case=case)


@_params(with_case=True, only=("race",))
def test_race_was_exercised(dep, variant, case):
    """The branch decided while `join` was running (else the case tests nothing), and join's state tells
    whether its command ran to the end (success <=> the finished marker exists)."""
    out = _variant(dep, variant)["cases"][case]
    markers = out.get("markers", {})
    join = out.get("final", {}).get("race", {}).get("tis", {}).get("join", {})
    check(dep, variant, "race exercised",
          {"branch decided": markers.get("branch_decided"), "join success == join ran to its end": (join.get("state") == "success") == markers.get("join_finished")},
          {"branch decided": "join started", "join success == join ran to its end": True}, case=case)


@_params(with_case=True, only=("schedule_tis",))
def test_schedule_tis_stale_write(dep, variant, case):
    """The stale scheduler's `DagRun.schedule_tis` over the running task: what the call returned, the row
    right after it, and how often the task ran (STALE_SCHEDULE)."""
    out = _variant(dep, variant)["cases"][case]
    write = out.get("stale_write", {})
    ti = out.get("final", {}).get("schedule_tis", {}).get("tis", {}).get("sleeps", {})
    observed = {"returned": write.get("returned"), "error": write.get("error"),
                "state right after": write.get("in_transaction", {}).get("state"), "final state": ti.get("state"),
                "try_number": ti.get("try_number"), "starts": len(out.get("starts", [])),
                "first attempt told to stop": out.get("attempt_logs", {}).get("1", {}).get("told to stop")}
    _, expected = expected_for(dep["version"], dep["backend"], variant, case, table=STALE_SCHEDULE)
    check(dep, variant, "stale schedule_tis", observed, expected, case=case)
