"""The production benchmark's DAGs (tests/deploy/production.py, benchmarks/production.py).

Most of the load is ordinary work: a fan-out, chains, a task that fails once and retries, a
reschedule sensor, a deferrable task, a run that hits its dagrun_timeout. Around it, the race shapes
of apache/airflow#63266 with jittered sleeps, so a decision lands on a running downstream at a rate,
not once: a branch and a short-circuit deciding against a `one_success` join that a fast upstream
already started, and the same over a mapped join. `prod_long` is what the benchmark's stale
scheduler (`DagRun.schedule_tis` from another process, apache/airflow#60330) aims at.
"""

from __future__ import annotations

import os
import random
import time
from datetime import datetime, timedelta
from pathlib import Path

try:  # Airflow 3: the standard provider and the task SDK
    from airflow.providers.standard.operators.bash import BashOperator
    from airflow.providers.standard.operators.python import BranchPythonOperator, PythonOperator, ShortCircuitOperator
    from airflow.providers.standard.sensors.python import PythonSensor
    from airflow.providers.standard.triggers.temporal import TimeDeltaTrigger
    from airflow.sdk import DAG, BaseOperator
except ImportError:  # Airflow 2.x: the same classes in the core package
    from airflow.models.baseoperator import BaseOperator
    from airflow.models.dag import DAG
    from airflow.operators.bash import BashOperator
    from airflow.operators.python import BranchPythonOperator, PythonOperator, ShortCircuitOperator
    from airflow.sensors.python import PythonSensor
    from airflow.triggers.temporal import TimeDeltaTrigger

START = datetime(2024, 1, 1)
MARKERS = Path(os.environ.get("TI_GUARD_DEPLOY_MARKERS", "/tmp"))


def _dag(dag_id, **kw):
    return DAG(dag_id, schedule=None, start_date=START, catchup=False, tags=["ti_guard_production"], max_active_runs=4, **kw)


def _sleep(low, high):
    return f"sleep $(awk 'BEGIN {{srand(); printf \"%.1f\", {low} + rand() * {high - low}}}')"


# -- ordinary work --------------------------------------------------------------------------------
with _dag("prod_fanout"):
    start = BashOperator(task_id="start", bash_command="true")
    end = BashOperator(task_id="end", bash_command="true")
    for i in range(22):
        start >> BashOperator(task_id=f"part_{i:02d}", bash_command=_sleep(1, 3)) >> end

with _dag("prod_chain"):
    previous = None
    for i in range(5):
        step = BashOperator(task_id=f"step_{i}", bash_command=_sleep(0.5, 2))
        if previous is not None:
            previous >> step
        previous = step


def _fail_first_try(ti=None, **_):
    if ti.try_number <= 1:
        raise RuntimeError("failing the first try on purpose (the benchmark's retry DAG)")


with _dag("prod_retry"):
    PythonOperator(task_id="flaky", python_callable=_fail_first_try, retries=1, retry_delay=timedelta(seconds=5))


def _second_poke(run_id=None, **_):
    seen = MARKERS / f"{run_id}.sensor.poked"
    if seen.exists():
        return True
    seen.write_text("first poke")
    return False


with _dag("prod_sensor"):
    # 20 s between pokes: closer pokes let a late executor event of the previous poke fail the
    # running one (seen on 3.3.2 without any guard; tests/deploy/dags/deploy_dags.py).
    PythonSensor(task_id="waits", python_callable=_second_poke, mode="reschedule", poke_interval=20, timeout=600)


class DeferThenSucceed(BaseOperator):
    def execute(self, context):
        # 20 s: the deferring attempt's executor event must arrive before the trigger fires
        # (tests/deploy/dags/deploy_dags.py says why).
        self.defer(trigger=TimeDeltaTrigger(timedelta(seconds=20)), method_name="execute_complete")

    def execute_complete(self, context, event=None):
        return "resumed"


with _dag("prod_deferrable"):
    DeferThenSucceed(task_id="defers")

# The scheduler's designed write: the run times out, its running task is skipped and stopped.
with _dag("prod_timeout", dagrun_timeout=timedelta(seconds=15)):
    BashOperator(task_id="sleeps", bash_command="sleep 60")


# -- the race shapes ---------------------------------------------------------------------------------
# The decision comes 4-16 s after the deciding task starts; `join` starts once `fast` (0-2 s) is
# done and a worker takes it: most runs decide while join runs, some before it starts.
def _decide_late(**_):
    time.sleep(random.uniform(4, 16))
    return "other"


def _short_circuit_late(**_):
    time.sleep(random.uniform(4, 16))
    return False


def _race(dag_id, decider, mapped=False):
    with _dag(dag_id):
        fast = BashOperator(task_id="fast", bash_command=_sleep(0, 2))
        if mapped:
            join = BashOperator.partial(task_id="join", trigger_rule="one_success").expand(
                bash_command=["sleep 25", "sleep 26", "sleep 27"])
        else:
            join = BashOperator(task_id="join", bash_command="sleep 25", trigger_rule="one_success")
        fast >> join
        if decider == "branch":
            decide = BranchPythonOperator(task_id="decide", python_callable=_decide_late)
            decide >> [join, BashOperator(task_id="other", bash_command="true")]
        else:
            # ignore_downstream_trigger_rules=True: every downstream task is skipped, join included.
            decide = ShortCircuitOperator(task_id="decide", python_callable=_short_circuit_late, ignore_downstream_trigger_rules=True)
            decide >> join


_race("prod_branch_race", "branch")
_race("prod_short_circuit_race", "short_circuit")
_race("prod_mapped_race", "branch", mapped=True)

with _dag("prod_long"):
    BashOperator(task_id="sleeps", bash_command="sleep 30")
