"""The production benchmark's short version (production.py): two schedulers and two Celery workers
under sustained load, `none` then the guard on the same live deployment. Correctness only, never a
time: with the guard no attempt is killed by a route it guards, no component fails, no deadlock or
lock-wait error appears that `none` does not also show, and the ordinary DAGs end as under `none`.
`none` itself must show the race (a kill in the race DAGs), or the run proved nothing.

TI_GUARD_PRODUCTION_MATRIX (default 3.3.2-postgresql; e.g. 3.1.8-postgresql,3.3.2-mysql9),
TI_GUARD_PRODUCTION_VARIANTS (default none,ignore; none first), TI_GUARD_PRODUCTION_SECONDS (load
per variant, default 180). The full benchmark with its tables: benchmarks/production.py.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pytest

import conftest as main_conftest

from . import production
from .deployment import say

pytestmark = pytest.mark.deploy

MATRIX = [i.strip() for i in os.environ.get("TI_GUARD_PRODUCTION_MATRIX", "3.3.2-postgresql").split(",") if i.strip()]
VARIANTS = [v.strip() for v in os.environ.get("TI_GUARD_PRODUCTION_VARIANTS", "none,ignore").split(",") if v.strip()]
SECONDS = float(os.environ.get("TI_GUARD_PRODUCTION_SECONDS", "180"))
# Which routes each backend stops (docs/policy.md): set_state_skip needs the statement's column list,
# which PostgreSQL's UPDATE OF gives and MySQL's trigger gets from performance_schema where it is on.
STOPPED = {"postgresql": (*production.GUARDED_ROUTES, "set_state_skip"), "mysql9": (*production.GUARDED_ROUTES, "set_state_skip"),
           "mysql": production.GUARDED_ROUTES}
ORDINARY = list(production.loads("ordinary"))


@pytest.fixture(scope="module", params=MATRIX)
def prod(request):
    version, _, backend = request.param.partition("-")
    if backend not in main_conftest.SERVER_URLS or VARIANTS[:1] != ["none"]:
        raise pytest.UsageError(f"TI_GUARD_PRODUCTION_MATRIX/VARIANTS: cannot run {request.param!r} with {VARIANTS} (none first)")
    main_conftest._admin(main_conftest.SERVER_URLS[backend]).dispose()  # an unreachable server fails here, never a skip
    workdir = Path(tempfile.mkdtemp(prefix=f"ti-guard-production-{request.param}-"))
    with open("/tmp/ti-guard-airflow.lock", "w") as lock:  # one Airflow deployment on the machine at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = production.run_production(version, backend, main_conftest.SERVER_URLS[backend], VARIANTS, SECONDS, workdir)
    result["failed"] = False
    yield result
    if result["failed"]:
        say(f"[production {request.param}] kept the work dir for the failure: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


def _check(prod, ok, message):
    if not ok:
        prod["failed"] = True
        pytest.fail(f"{message} (work dir {prod.get('workdir', '?')})")


def _variant(prod, name):
    return [v for v in prod["variants"] if v["variant"] == name]


def _guarded(prod):
    return [v for v in prod["variants"] if v["variant"] != "none"]


def test_run_completed(prod):
    _check(prod, not prod.get("error"), f"the run did not complete: {prod.get('error')}\n{prod.get('traceback', '')[-3000:]}")
    _check(prod, [v["variant"] for v in prod["variants"]] == VARIANTS, f"variants run: {[v['variant'] for v in prod['variants']]}")
    undrained = {v["variant"]: v.get("drain_error") for v in prod["variants"] if not v["drained"]}
    _check(prod, not undrained, f"runs still active after the drain: {undrained}")
    # The cost figures read every process tree: a tree not found would read as free.
    unread = {f"{v['variant']} #{v['index']}": v["cpu"]["seconds"] for v in prod["variants"] if not all(v["cpu"]["seconds"].values())}
    _check(prod, not unread, f"CPU time not read for the database server or Airflow's components: {unread}")


def test_no_component_failed(prod):
    exited = {f"{v['variant']} #{v['index']}": v["exited"] for v in prod["variants"] if v["exited"]}
    _check(prod, not exited and not prod["restarts"], f"components exited: {exited}; restarts {prod['restarts']}")


def test_none_shows_the_race(prod):
    # The yardstick: without the guard the race DAGs lose attempts to a racy write, or nothing was measured.
    for v in _variant(prod, "none"):
        engineered = [k for k in v["kills"] if k["engineered"]]
        _check(prod, engineered, f"none #{v['index']}: no attempt of the race DAGs was killed: the load did not race "
                                 f"(triggered {dict(v['triggered'])}, outcomes {v['outcomes']['runs']})")


def test_guard_stops_every_guarded_route(prod):
    stopped = STOPPED[prod["backend"]]
    for v in _guarded(prod):
        if v["variant"] == "audit":  # lets every write through by design; its record is checked below
            continue
        leaked = [k for k in v["kills"] if k["route"] in stopped]
        _check(prod, not leaked, f"{v['variant']} #{v['index']}: attempts killed by routes the guard stops: {leaked}")


def test_no_deadlock_or_lock_wait_that_none_lacks(prod):
    seen_without = set()
    for v in _variant(prod, "none"):
        seen_without |= set(v["log_errors"])
        if v["pg_deadlocks"]:
            seen_without.add("pg_deadlocks")
    for v in _guarded(prod):
        kinds = set(v["log_errors"]) | ({"pg_deadlocks"} if v["pg_deadlocks"] else set())
        _check(prod, kinds <= seen_without, f"{v['variant']} #{v['index']}: {sorted(kinds - seen_without)} "
                                            f"that none did not show: {v['log_errors']}, PostgreSQL deadlocks {v['pg_deadlocks']}")


def test_ordinary_dags_end_as_without_guard(prod):
    def states(v):
        return {d: set(v["outcomes"]["runs"].get(d, {})) for d in ORDINARY}

    expected = {}
    for v in _variant(prod, "none"):
        for d, s in states(v).items():
            expected.setdefault(d, set()).update(s)
    for v in _guarded(prod):
        differ = {d: (sorted(s), sorted(expected.get(d, ()))) for d, s in states(v).items() if not s <= expected.get(d, set())}
        _check(prod, not differ, f"{v['variant']} #{v['index']}: run states (guard, none) differ: {differ}")


def test_guard_recorded_what_it_kept(prod):
    # A race the guard stopped is in its record: the kills of none's race DAGs reappear as kept writes.
    for v in _guarded(prod):
        kept = Counter({k: n for k, n in v["recorded"].items()})
        _check(prod, sum(kept.values()) > 0, f"{v['variant']} #{v['index']}: the guard recorded nothing under a load that "
                                             f"races (none killed {[len(n['kills']) for n in _variant(prod, 'none')]})")
