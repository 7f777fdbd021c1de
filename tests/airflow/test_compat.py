"""Does the guard break anything Airflow does on purpose? Asked of real apache-airflow, per version x backend.

Every combo runs each scenario with no guard, then with the guard in raise and in ignore mode
(compat_harness.py). The no-guard run is the yardstick: the DAG tests compare against it, and
the writer tests assert that without the guard the racy or operator write really lands, so a
guard that did nothing could not pass. Each assertion's outcome is also recorded for the docs/compatibility.md
table (compat_table.py).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import compat_harness as harness
import conftest as main_conftest

pytestmark = pytest.mark.airflow

VERSIONS = tuple(v.strip() for v in os.environ.get("TI_GUARD_AIRFLOW_VERSIONS", "3.3.2,3.1.8,2.11.2").split(",") if v.strip())
# TI_GUARD_AIRFLOW_BACKENDS picks backend ids (default all: postgresql, mysql = MariaDB, mysql9 = MySQL 9.7, sqlite).
BACKENDS = tuple(b.strip() for b in os.environ.get("TI_GUARD_AIRFLOW_BACKENDS", ",".join(main_conftest.BACKENDS)).split(",") if b.strip())
RESULTS = Path(os.environ.get("TI_GUARD_COMPAT_RESULTS", harness.REPO / ".pytest_cache" / "ti-guard-compat.json"))
# The states each DAG is written to produce; a scenario that stopped producing its skip would test nothing.
INTENDED = {
    "tg_skip_exception": ("success", {"skips_itself": "skipped", "downstream": "skipped"}),
    "tg_branch": ("success", {"choose": "success", "taken": "success", "not_taken": "skipped"}),
    "tg_short_circuit": ("success", {"gate": "success", "after_gate": "skipped", "further": "skipped"}),
    "tg_sensor_soft_fail": ("success", {"never_true": "skipped", "after_sensor": "skipped"}),
    "tg_mapped_skip": ("success", {"odd_ones_skip[0]": "success", "odd_ones_skip[1]": "skipped",
                                   "odd_ones_skip[2]": "success", "odd_ones_skip[3]": "skipped", "collect": "success"}),
    "tg_trigger_rule_after_skip": ("success", {"pick": "success", "left": "success", "right": "skipped", "join": "success"}),
    "tg_fail": ("failed", {"fails": "failed", "after_failure": "upstream_failed"}),
    "tg_retry": ("success", {"fails_once": "success", "after_retry": "success"}),
}
COMBOS = [(v, b) for v in VERSIONS for b in BACKENDS]
# Upgrades that Airflow itself cannot make on a backend, guard or not (measured without the guard on
# a fresh database): the migration's exit code is then Airflow's, and the guard must still be in place.
AIRFLOW_UPGRADE_FAILS = {
    ("2.10.5", "mysql"): "2.9.0 -> 2.10.5: Airflow's migration 686269002441 sends a multi-statement PREPARE that "
    "MariaDB 10.11 rejects through PyMySQL (1064), with or without the guard",
}


@pytest.fixture(scope="session")
def combos(request):
    """Runs every version x backend once, in parallel (Airflow waits on sleeps and I/O more than CPU)."""
    # Progress (pip, migrations, variants) must reach the CI log while pytest captures output.
    with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        results = _run_all()
    yield results
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"combos": [{**r, "key": list(k)} for k, r in results.items()], "checks": CHECKS}, indent=1, default=str))


def _run_all():
    admin_urls = {}
    for backend in set(BACKENDS) & set(main_conftest.SERVER_URLS):
        url = main_conftest.SERVER_URLS[backend]
        main_conftest._admin(url).dispose()  # an unreachable server fails here, never a skip
        admin_urls[backend] = url
    with ThreadPoolExecutor() as pool:  # one install per version, before the combos that share it
        list(pool.map(lambda v: harness.airflow_venv.ensure(v, say=harness.say), VERSIONS))
    workdir = Path(tempfile.mkdtemp(prefix="ti_guard_airflow_"))

    def one(combo):
        version, backend = combo
        try:
            return harness.run_combo(version, backend, admin_urls, workdir / f"{version}-{backend}")
        except Exception as exc:  # noqa: BLE001 - reported by every test of that combo
            return {"error": f"{type(exc).__name__}: {exc}"}

    with ThreadPoolExecutor(max_workers=int(os.environ.get("TI_GUARD_AIRFLOW_PARALLEL", len(COMBOS)))) as pool:
        results = dict(zip(COMBOS, pool.map(one, COMBOS)))
    if any("error" in r for r in results.values()):
        harness.say(f"[airflow] Airflow's logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


CHECKS: list[dict] = []


def check(combo, scenario, variant, observed, expected):
    """Records the comparison for the docs/compatibility.md table, then asserts it."""
    CHECKS.append({"version": combo["version"], "backend": combo["backend"], "scenario": scenario, "variant": variant,
                   "ok": observed == expected, "observed": observed, "expected": expected})
    assert observed == expected, f"{scenario} [{variant}]"


@pytest.fixture
def combo(combos, version, backend):
    result = combos[(version, backend)]
    if "error" in result:
        pytest.fail(f"airflow {version} on {backend} did not run: {result['error']}", pytrace=False)
    return result


combo_params = pytest.mark.parametrize("version,backend", COMBOS, ids=[f"{v}-{b}" for v, b in COMBOS])


@combo_params
@pytest.mark.parametrize("dag_id", list(INTENDED))
def test_dag_outcome_unchanged_by_guard(combo, dag_id):
    """Step 4: every task instance and the DAG run end as on the same DB without the guard."""
    baseline = combo["variants"]["none"]["dags"][dag_id]
    run_state, tis = INTENDED[dag_id]
    outcome = lambda run: {"run": run["run_state"], "tis": run["tis"], "tries": run["tries"]}  # noqa: E731
    check(combo, dag_id, "none", {"run": baseline["run_state"], "tis": baseline["tis"]}, {"run": run_state, "tis": tis})
    for variant in ("raise", "ignore"):
        check(combo, dag_id, variant, outcome(combo["variants"][variant]["dags"][dag_id]), outcome(baseline))


@combo_params
def test_operator_marks_finished_task_skipped(combo):
    """Step 5: TaskInstance.set_state(skipped) on a success TI is an operator's deliberate mark: it
    does not write start_date, so no rule matches and it goes through in every mode."""
    runs = combo["variants"]
    for variant in harness.VARIANTS:
        check(combo, "set_state", variant, _mark(runs[variant]["mark_plain"]), {"refused_by_guard": False, "after": "skipped"})


@combo_params
def test_racy_update_under_the_bypass_goes_through(combo):
    """Step 6: the documented bypass (docs/repairs.md), in the writer's own transaction, lets through the very UPDATE the
    guard refuses (raise) or keeps (ignore) without it (test_racy_update_replayed: the control)."""
    runs = combo["variants"]
    for variant in harness.VARIANTS:
        check(combo, "pre-fix UPDATE under bypass", variant, _write(runs[variant]["replay_bypassed"]),
              {"refused": False, "after": {"running": "skipped", "unscheduled": "skipped", "finished": "skipped"}})


def _mark(step):
    return {"refused_by_guard": (step["error"] or "").startswith("ti_guard:"), "after": step["after"]}


@combo_params
def test_racy_update_replayed(combo):
    """Step 6: the pre-fix UPDATE over a running, an unscheduled and a finished row of one run."""
    runs = combo["variants"]
    untouched = {"running": "running", "unscheduled": None, "finished": "success"}
    check(combo, "pre-fix UPDATE", "none", _write(runs["none"]["replay"]), {"refused": False, "after": dict.fromkeys(untouched, "skipped")})
    check(combo, "pre-fix UPDATE", "raise", _write(runs["raise"]["replay"]), {"refused": True, "after": untouched})
    check(combo, "pre-fix UPDATE", "ignore", _write(runs["ignore"]["replay"]), {"refused": False, "after": {**untouched, "unscheduled": "skipped"}})


@combo_params
def test_real_skip_route_on_running_task(combo):
    """Step 6: Airflow's own `ti_skip_downstream` (racy before 3.2) against a running task instance."""
    runs, racy = combo["variants"], combo["route_racy"]
    major_minor = tuple(int(p) for p in combo["version"].split(".")[:2])
    if major_minor < (3, 2) or major_minor >= (3, 3):
        assert racy == (major_minor < (3, 2)), "the installed route's source does not match its release's fix status"
    before = {"after_gate": "running", "further": None, "gate": "success"}
    filtered = {**before, "further": "skipped"}
    expected_none = dict.fromkeys(before, "skipped") if racy else filtered
    check(combo, "skip route", "none", _write(runs["none"]["route_skip"]), {"refused": False, "after": expected_none})
    check(combo, "skip route", "raise", _write(runs["raise"]["route_skip"]), {"refused": racy, "after": before if racy else filtered})
    check(combo, "skip route", "ignore", _write(runs["ignore"]["route_skip"]), {"refused": False, "after": filtered})


def _write(step):
    return {"refused": (step["error"] or "").startswith("ti_guard:"), "after": step["after"]}


@combo_params
def test_guard_install_leaves_airflow_alone(combo):
    """Step 2/7: `alembic upgrade head` of the guard never moves Airflow's alembic_version."""
    for variant in harness.VARIANTS:
        install = combo["variants"][variant]["install"]
        observed = {"airflow_revision": [install["airflow_revision_before"], install["airflow_revision_after"]],
                    "install_errors": install["errors"], "status": combo["variants"][variant]["status"]["rc"]}
        expected = {"airflow_revision": [combo["head"], combo["head"]], "install_errors": [], "status": 2 if variant == "none" else 0}
        check(combo, "guard install", variant, observed, expected)


@combo_params
def test_airflow_upgrade_with_guard(combo, backend):
    """Step 7: an Airflow upgrade (`airflow db migrate` from the previous minor) with the guard installed.

    Measured, not assumed: whether the migration re-created task_instance is read from the table's
    identity (SQLite's root page, PostgreSQL's oid; MySQL alters in place); the triggers must be gone
    exactly when it was (SQLite's batch migrations), counted from the catalog, and `ti-guard status`
    must agree (2, naming the batch migrations) or say current. The guard is then exercised on
    Airflow's own rows: right after the migration, Airflow's writes go through and, where the triggers
    were kept, the racy skip and the stale schedule_tis are kept; after `ti-guard install`, everywhere.
    """
    up = combo["upgrade"]
    airflow_fails = (combo["version"], backend) in AIRFLOW_UPGRADE_FAILS
    recreated = up["recreated"]
    output = up["status_after"]["output"]
    observed = {"steps": [up["uninstall"], up["downgrade_rc"], up["rc"], up["reinstall"]], "install_errors": up["install"]["errors"],
                "install_moved_airflow": up["install"]["airflow_revision_before"] != up["install"]["airflow_revision_after"],
                "status_before": up["status_before"]["rc"], "at_airflow_head": up["head_after"] == combo["head"],
                "triggers_dropped": up["triggers_left"] == 0, "status_after": up["status_after"]["rc"],
                "says_batch": "batch migrations" in output, "says_columns": "columns changed" in output,
                "status_repaired": up["status_repaired"]["rc"],
                "writes_after_migrate": _upgrade_writes(up["writes_after_migrate"]), "writes_after_repair": _upgrade_writes(up["writes_after_repair"])}
    guarded = {"racy skip": (None, "kept"), "stale schedule_tis": (None, "kept"), "operator mark": (None, "other")}
    expected = {"steps": [0, 0, 1 if airflow_fails else 0, 0], "install_errors": [], "install_moved_airflow": False, "status_before": 0,
                "at_airflow_head": not airflow_fails, "triggers_dropped": recreated, "status_after": 2 if recreated else 0,
                "says_batch": recreated, "says_columns": False, "status_repaired": 0,
                "writes_after_migrate": {**guarded, "racy skip": (None, "skipped"), "stale schedule_tis": (None, "scheduled")} if recreated else guarded,
                "writes_after_repair": guarded}
    check(combo, "upgrade", "ignore", observed, expected)


def _upgrade_writes(out):
    """write -> (error, what became of the row: kept, other (the mark's state), or the state it was left in)."""
    if "error" in out:
        return out["error"]
    name = lambda step: "kept" if step["after"] == out["state"] else "other" if step["after"] == out["other"] else step["after"]  # noqa: E731
    return {write: (out[write]["error"], name(out[write])) for write in ("racy skip", "stale schedule_tis", "operator mark")}
