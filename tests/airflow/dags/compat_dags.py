"""The Airflow flows that write `skipped` (or fail and retry) on purpose; the guard must not change any outcome.

One file holds every scenario so that one DAG-folder parse serves the whole run.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.exceptions import AirflowSkipException

try:  # Airflow 3: the standard provider and the task SDK
    from airflow.providers.standard.operators.empty import EmptyOperator
    from airflow.providers.standard.operators.python import BranchPythonOperator, ShortCircuitOperator
    from airflow.providers.standard.sensors.python import PythonSensor
    from airflow.sdk import DAG, task
except ImportError:  # Airflow 2.x: the same operators in the core package
    from airflow.decorators import task
    from airflow.models.dag import DAG
    from airflow.operators.empty import EmptyOperator
    from airflow.operators.python import BranchPythonOperator, ShortCircuitOperator
    from airflow.sensors.python import PythonSensor

START = datetime(2024, 1, 1)


def _dag(dag_id, **kw):
    return DAG(dag_id, schedule=None, start_date=START, catchup=False, tags=["ti_guard_compat"], **kw)


with _dag("tg_skip_exception"):

    @task
    def skips_itself():
        raise AirflowSkipException("the task decides to skip")

    skips_itself() >> EmptyOperator(task_id="downstream")


with _dag("tg_branch"):
    choose = BranchPythonOperator(task_id="choose", python_callable=lambda: "taken")
    choose >> [EmptyOperator(task_id="taken"), EmptyOperator(task_id="not_taken")]


with _dag("tg_short_circuit"):
    gate = ShortCircuitOperator(task_id="gate", python_callable=lambda: False)
    gate >> EmptyOperator(task_id="after_gate") >> EmptyOperator(task_id="further")


with _dag("tg_sensor_soft_fail"):
    sensor = PythonSensor(
        task_id="never_true", python_callable=lambda: False, timeout=1, poke_interval=0.2, mode="poke", soft_fail=True
    )
    sensor >> EmptyOperator(task_id="after_sensor")


with _dag("tg_mapped_skip"):

    @task
    def odd_ones_skip(x):
        if x % 2:
            raise AirflowSkipException(f"{x} is odd")
        return x

    @task(trigger_rule="none_failed_min_one_success")
    def collect(values):
        return sorted(v for v in values if v is not None)

    collect(odd_ones_skip.expand(x=[0, 1, 2, 3]))


with _dag("tg_trigger_rule_after_skip"):
    pick = BranchPythonOperator(task_id="pick", python_callable=lambda: "left")
    left, right = EmptyOperator(task_id="left"), EmptyOperator(task_id="right")
    join = EmptyOperator(task_id="join", trigger_rule="none_failed_min_one_success")
    pick >> [left, right] >> join


with _dag("tg_fail"):

    @task
    def fails():
        raise RuntimeError("this task fails on purpose")

    fails() >> EmptyOperator(task_id="after_failure")


with _dag("tg_retry"):

    @task(retries=1, retry_delay=timedelta(seconds=1))
    def fails_once(ti=None):
        if ti.try_number < 2:
            raise RuntimeError("first try fails on purpose")

    fails_once() >> EmptyOperator(task_id="after_retry")
