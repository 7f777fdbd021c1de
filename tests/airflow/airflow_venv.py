"""A virtualenv of its own for each apache-airflow version, cached between runs.

Airflow pins half of PyPI; none of that may reach the project's environment. The venv is built
in a temporary directory next to the cache and renamed when pip is done, so an interrupted
install is never mistaken for a complete one. Airflow is always started as `bin/python -m
airflow`: console scripts carry the absolute path they were built at, the interpreter does not.

Run directly to warm the cache: `python tests/airflow/airflow_venv.py 3.3.2 3.1.8 3.3.2+celery`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CACHE = Path(os.environ.get("TI_GUARD_AIRFLOW_CACHE", Path.home() / ".cache" / "ti-guard"))
# Airflow 3 opens both a sync and an async engine, so each backend needs both drivers. It also
# imports MySQLdb's converters for any mysql URL, even one served by PyMySQL, so mysqlclient must
# be there (it builds from source: gcc, pkg-config and libmariadb-dev or libmysqlclient-dev).
# Airflow 2.x (SQLAlchemy 1.4, installed without a constraints file) needs neither async driver nor
# mysqlclient; one recipe serves every version anyway (they install beside 2.10.5 and 2.11.2 without
# conflict), so a cached venv never depends on which suite built it.
DRIVERS = ("psycopg2-binary", "asyncpg", "pymysql", "aiomysql", "aiosqlite", "mysqlclient")
# The production benchmark's CeleryExecutor (benchmarks/production.py), in venvs of their own so the
# suites on LocalExecutor never run beside a provider they do not use. celery 5.7 breaks the provider
# (`cannot import name 'retry' from 'celery.backends.database'`: ../shared/airflow-facts.md).
EXTRAS = {"celery": ("apache-airflow-providers-celery", "celery<5.7", "redis")}
COMPLETE = "ti-guard-complete"


def venv_path(version: str, extra: str | None = None) -> Path:
    return CACHE / (f"airflow-{version}" + (f"+{extra}" if extra else ""))


def python_of(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure(version: str, say=print, extra: str | None = None) -> Path:
    """The venv's directory, building it first when the cache has no complete one."""
    final = venv_path(version, extra)
    marker = final / COMPLETE
    if marker.exists() and marker.read_text() == _recipe(version, extra):
        return final
    CACHE.mkdir(parents=True, exist_ok=True)
    building = CACHE / f".{final.name}.building-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    started = time.monotonic()
    say(f"[airflow {version}] creating a virtualenv in {building}")
    subprocess.run([sys.executable, "-m", "venv", str(building)], check=True)
    pip = [str(python_of(building)), "-m", "pip", "install", "--progress-bar", "off", "--disable-pip-version-check"]
    _run_showing(pip + ["--upgrade", "pip"], version, say)
    _run_showing(pip + _recipe(version, extra).split(), version, say)
    (building / COMPLETE).write_text(_recipe(version, extra))
    shutil.rmtree(final, ignore_errors=True)
    building.rename(final)
    say(f"[airflow {version}] ready in {time.monotonic() - started:.0f} s: {final}")
    return final


def _recipe(version: str, extra: str | None = None) -> str:
    """What a complete venv holds; a cache built from another recipe is rebuilt."""
    return " ".join([f"apache-airflow=={version}", *DRIVERS, *EXTRAS.get(extra, ())])


def _run_showing(cmd, version, say):
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail = []
    for line in proc.stdout:
        line = line.rstrip()
        tail = (tail + [line])[-40:]
        # pip's "Collecting"/"Downloading" lines are the heartbeat CI logs need; the rest is noise.
        if line.startswith(("Collecting", "Installing", "Successfully", "ERROR")):
            say(f"[airflow {version}] {line}")
    if proc.wait() != 0:
        raise RuntimeError(f"pip failed for apache-airflow=={version}:\n" + "\n".join(tail))


if __name__ == "__main__":
    for v in sys.argv[1:]:
        print(ensure(v.split("+")[0], say=lambda m: print(m, flush=True), extra=v.partition("+")[2] or None))
