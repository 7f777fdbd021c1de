"""Upgrading off Airflow 2 with the guard in place: 2.10 -> 2.11 -> 3.x, `airflow db migrate` each time.

One metadata DB per backend gets the guard (`ti-guard install`) on Airflow 2.10's schema, then goes
through every `airflow db migrate` of the chain, with the venvs the compat suite caches. After each
migration the guard's triggers are counted from the catalog, and `ti-guard status` must say what
happened with its exit code: 0 when the guard in place is current, 1 when it still guards but was
written for the other Airflow generation (Airflow 3 adds the `id` column, which changes the rules a
table gets), 2 when the migration dropped it (SQLite's batch migrations re-create task_instance).
`ti-guard install` must then make it current (status 0). The same chain runs on a second DB without
the guard: every migration must end as it does there.

TI_GUARD_UPGRADE_CHAIN (default 2.11.2,3.1.8,3.3.2: CI's budget; the compat suite already upgrades
2.10.0 -> 2.11.2 with the guard; the docs' figures are from 2.10.5,2.11.2,3.1.8,3.3.2) and
TI_GUARD_UPGRADE_BACKENDS (default postgresql,sqlite).
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
from ti_guard.policy import airflow_generation

pytestmark = pytest.mark.airflow

CHAIN = tuple(v.strip() for v in os.environ.get("TI_GUARD_UPGRADE_CHAIN", "2.11.2,3.1.8,3.3.2").split(",") if v.strip())
BACKENDS = tuple(b.strip() for b in os.environ.get("TI_GUARD_UPGRADE_BACKENDS", "postgresql,sqlite").split(",") if b.strip())
ADMIN_URLS = {"postgresql": main_conftest.PG_URL, "mysql": main_conftest.MYSQL_URL}
RESULTS = Path(os.environ.get("TI_GUARD_UPGRADE_RESULTS", harness.REPO / ".pytest_cache" / "ti-guard-upgrade.json"))


def _chain(backend: str, guarded: bool, workdir: Path) -> list[dict]:
    """Every step of the chain on one fresh DB: what Airflow's migration did and, when guarded, what status said."""
    db = harness.Database(backend, ADMIN_URLS, workdir, "guarded" if guarded else "plain")
    steps = []
    try:
        for i, version in enumerate(CHAIN):
            airflow = harness.Airflow(harness.airflow_venv.ensure(version, say=harness.say), db, workdir / f"home-{version}")
            harness.say(f"[upgrade {backend} {'guard' if guarded else 'no guard'}] airflow {version} db migrate")
            identity = db.table_identity() if i else None
            step = {"version": version, "migrate_rc": airflow.cli("db", "migrate"), "revision": db.airflow_revision(),
                    "generation": airflow_generation(db.task_instance_columns())}
            # Did this migration re-create task_instance? Observed apart from the triggers (compat_harness).
            step["recreated"] = identity is not None and db.table_identity() != identity
            if guarded:
                if i == 0:
                    step["first_install"] = harness.project_tool("ti-guard", "install", "--url", db.url)[0]
                step["triggers_left"] = db.guard_triggers()
                step["status"] = harness.guard_status(db)
                step["install"] = harness.project_tool("ti-guard", "install", "--url", db.url)[0]
                step["status_repaired"] = harness.guard_status(db)
                step["triggers_after_install"] = db.guard_triggers()
                harness.say(f"[upgrade {backend} guard] {version}: migrate exit {step['migrate_rc']}, Airflow {step['generation']} table, "
                            f"{step['triggers_left']} trigger(s) left, status exit {step['status']['rc']}, install exit {step['install']}, "
                            f"then status exit {step['status_repaired']['rc']}")
            steps.append(step)
    finally:
        db.drop()
    return steps


@pytest.fixture(scope="module")
def chains(request):
    workdir = Path(tempfile.mkdtemp(prefix="ti_guard_upgrade_"))
    with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        for version in CHAIN:  # one install per version before the chains share them
            harness.airflow_venv.ensure(version, say=harness.say)
        jobs = [(b, g) for b in BACKENDS for g in (False, True)]
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            results = dict(zip(jobs, pool.map(lambda job: _chain(job[0], job[1], workdir / f"{job[0]}-{job[1]}"), jobs)))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps([{"backend": b, "guard": g, "steps": steps} for (b, g), steps in results.items()], indent=1, default=str))
    yield results
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_upgrade_off_airflow_2_with_the_guard(chains, backend):
    plain, guarded = chains[(backend, False)], chains[(backend, True)]
    # Without the guard: the chain itself works, and it really crosses from Airflow 2 to 3 tables.
    assert [s["migrate_rc"] for s in plain] == [0] * len(CHAIN)
    assert plain[0]["generation"] == 2
    # With the guard: every migration ends as without it, at the same revision.
    assert [(s["migrate_rc"], s["revision"], s["generation"]) for s in guarded] == [
        (s["migrate_rc"], s["revision"], s["generation"]) for s in plain]
    assert guarded[0]["first_install"] == 0
    previous = guarded[0]["generation"]
    for step in guarded:
        output = step["status"]["output"]
        # The triggers are gone exactly when the migration re-created the table (SQLite's batch mode).
        assert (step["triggers_left"] == 0) == step["recreated"], f"{step['version']}: triggers left {step['triggers_left']}, table re-created: {step['recreated']}"
        if step["triggers_left"] == 0:  # dropped: missing, and status names the batch migration
            expected_rc, says = 2, "batch migrations" in output
        elif step["generation"] != previous:  # still guarding, written for the other generation's columns
            expected_rc, says = 1, "another ti-guard release (or for other columns)" in output
        else:
            expected_rc, says = 0, "match" in output
        assert (step["status"]["rc"], says) == (expected_rc, True), f"{step['version']}: {output}"
        assert (step["install"], step["status_repaired"]["rc"]) == (0, 0), step
        assert step["triggers_after_install"] > 0
        previous = step["generation"]
