"""The built wheel, installed in a fresh virtualenv outside the checkout, run from a directory
of its own: the Alembic route (`ti-guard alembic ...`, the alembic.ini shipped in the package)
and the runbook's rollout (docs/rollout.md) against fresh PostgreSQL and MariaDB databases."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from conftest import MYSQL_URL, PG_URL
from ti_guard import catalog
from ti_guard.airflow_shape import task_instance_table
from ti_guard.db import make_engine, scratch_database
from ti_guard.policy import COUNTS_TABLE, RECORD_TABLE, Policy

ROOT = Path(__file__).resolve().parents[1]
SERVERS = {"postgresql": PG_URL, "mariadb": MYSQL_URL}


@pytest.fixture(scope="session")
def wheel_venv(tmp_path_factory):
    """One wheel build (pip wheel) and one fresh virtualenv per session; yields (bin dir, a work dir)."""
    base = tmp_path_factory.mktemp("wheel")
    dist = base / "dist"
    # From a clean copy: pip builds in the source tree, whose build/ may hold files no longer there.
    source = base / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "tests", "benchmarks"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(source)], check=True, capture_output=True)
    (wheel,) = dist.glob("ti_guard-*.whl")
    subprocess.run([sys.executable, "-m", "venv", str(base / "venv")], check=True)
    subprocess.run([str(base / "venv" / "bin" / "pip"), "install", "-q", str(wheel)], check=True, capture_output=True)
    work = base / "elsewhere"
    work.mkdir()
    return base / "venv" / "bin", work


def run(wheel_venv, *args, expect=0) -> str:
    bin_dir, work = wheel_venv
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TI_GUARD_", "AIRFLOW__", "ALEMBIC_", "PYTHON"))}
    env["AIRFLOW_HOME"] = str(work)  # no airflow.cfg there: every URL comes from the command line
    done = subprocess.run([str(bin_dir / "ti-guard"), *args], capture_output=True, text=True, cwd=work, env=env)
    assert done.returncode == expect, (args, done.returncode, done.stdout, done.stderr)
    return done.stdout


def test_the_wheel_runs_outside_the_checkout(wheel_venv):
    bin_dir, work = wheel_venv
    where = subprocess.run([str(bin_dir / "python"), "-c", "import ti_guard.cli; print(ti_guard.cli.__file__)"], capture_output=True, text=True, cwd=work, check=True).stdout
    assert str(bin_dir.parent) in where and str(ROOT) not in where, where
    assert not (work / "alembic.ini").exists()
    assert "(head)" in run(wheel_venv, "alembic", "heads")
    assert "CREATE TRIGGER" in run(wheel_venv, "alembic", "-x", "dialect=postgresql", "upgrade", "head", "--sql")


@pytest.mark.parametrize("server", SERVERS)
def test_alembic_route_and_rollout_from_the_installed_wheel(wheel_venv, server):
    with scratch_database(SERVERS[server], f"ti_guard_wheel_{uuid.uuid4().hex[:4]}") as url:
        engine = make_engine(url)
        table = task_instance_table(sa.MetaData())
        table.metadata.create_all(engine)
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)")  # Airflow's own
            conn.exec_driver_sql("INSERT INTO alembic_version VALUES ('29ce7909c52b')")
            conn.execute(table.insert().values(id="00000000-0000-0000-0000-000000000001", dag_id="d", task_id="t", run_id="r", state="success", try_number=1))

        def guard():
            with engine.connect() as conn:
                return catalog.read(conn, Policy()), set(sa.inspect(conn).get_table_names())

        x = ["alembic", "-x", f"url={url}"]
        try:
            # The Alembic route: what every Alembic user types, from the packaged alembic.ini.
            assert run(wheel_venv, *x, "current") == ""
            assert "0001 -> 0002 (head)" in run(wheel_venv, *x, "history")
            review = run(wheel_venv, *x, "upgrade", "head", "--sql")
            assert "CREATE TRIGGER" in review and guard()[0] == {}  # printed, not run
            run(wheel_venv, *x, "upgrade", "head")
            assert run(wheel_venv, *x, "current").startswith("0002 (head)") and guard()[0]
            run(wheel_venv, *x, "downgrade", "base")
            assert run(wheel_venv, *x, "current") == "" and guard() == ({}, {"task_instance", "alembic_version"})

            # The runbook: doctor, audit, report, ignore, a repair, uninstall.
            assert run(wheel_venv, "doctor", "--url", url).startswith("READY: ")
            installed = json.loads(run(wheel_venv, "install", "--url", url, "--mode=audit", "--format=json"))
            assert installed["changed"] and installed["mode"] == "audit"
            status = json.loads(run(wheel_venv, "status", "--url", url, "--format=json"))
            assert (status["code"], status["mode"]) == (0, "audit")
            assert "Refusals by day" in run(wheel_venv, "report", "--url", url, "--since=1h")
            run(wheel_venv, "install", "--url", url, "--mode=ignore")
            run(wheel_venv, "set-state", "--url", url, "--dag-id=d", "--task-id=t", "--run-id=r", "--state=skipped")
            with engine.connect() as conn:
                assert conn.execute(sa.select(table.c.state)).scalar() == "skipped"
            # Removal through Alembic, the record kept on request, then by the CLI.
            run(wheel_venv, *x, "-x", "keep_record=1", "downgrade", "base")
            assert guard() == ({}, {"task_instance", "alembic_version", RECORD_TABLE, COUNTS_TABLE})
            assert "ti_guard removed from" in run(wheel_venv, "uninstall", "--url", url)
            assert guard() == ({}, {"task_instance", "alembic_version"})
            assert run(wheel_venv, "status", "--url", url, expect=2).startswith("MISSING")
        finally:
            engine.dispose()
