"""The install itself, through the CLI's own path (alembic upgrade head, then reconcile), timed
while one writer keeps committing heartbeats: how long it takes, and how long it held that writer up.
"""

from __future__ import annotations

import statistics
import threading
import time

from ti_guard import config, lifecycle

from bench_data import BenchDB
from bench_workloads import HeartbeatWriter

QUIET_BEFORE = 1.0  # seconds of writer latency recorded before the install starts
AFTER = 0.3


def _settings(db: BenchDB):
    # Explicit values everywhere, so nothing in the caller's environment changes what is measured.
    return config.resolve(url=db.url, schema="", mode="raise", protect="running,success,failed", table="task_instance")


def quiet_install(db: BenchDB) -> float:
    """Seconds for the install with nothing else writing."""
    settings = _settings(db)
    began = time.perf_counter()
    lifecycle.install(settings)
    elapsed = time.perf_counter() - began
    lifecycle.uninstall(settings)
    return elapsed


def contended_install(db: BenchDB, writer_ids: list) -> dict:
    """The install while one connection keeps committing heartbeats, and what that writer saw."""
    settings = _settings(db)
    writer = HeartbeatWriter(db, writer_ids)
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def loop():
        i = 0
        while not stop.is_set():
            began = time.perf_counter()
            writer.beat(i)
            samples.append((began, time.perf_counter()))
            i += 1

    thread = threading.Thread(target=loop)
    thread.start()
    error = None
    try:
        time.sleep(QUIET_BEFORE)
        began = time.perf_counter()
        try:
            lifecycle.install(settings)
        except Exception as exc:  # noqa: BLE001 - a failed install is a result, reported as such
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        ended = time.perf_counter()
        time.sleep(AFTER)
    finally:
        stop.set()
        thread.join()
        writer.close()
    lifecycle.uninstall(settings)
    before = [e - s for s, e in samples if e < began]
    during = [e - s for s, e in samples if e >= began and s <= ended]
    return {
        "install_s": ended - began,
        "error": error,
        "writer_max_before_s": max(before),
        "writer_median_before_s": statistics.median(before),
        "writer_max_during_s": max(during, default=0.0),
        "writes_during": len(during),
    }
