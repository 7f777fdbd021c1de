"""The DAGs of the deployment suite (tests/deploy): real scheduler, workers, triggerer and REST.

Each DAG is one case of test_deploy.py. Tasks that must be observed from outside write marker
files into $TI_GUARD_DEPLOY_MARKERS (set by deployment.py for every component, and so inherited
by the task processes): `<run_id>.<task_id>.started` / `.finished`.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta
from pathlib import Path

try:  # Airflow 3: the standard provider and the task SDK
    from airflow.providers.standard.operators.bash import BashOperator
    from airflow.providers.standard.operators.python import BranchPythonOperator
    from airflow.providers.standard.sensors.python import PythonSensor
    from airflow.providers.standard.triggers.temporal import TimeDeltaTrigger
    from airflow.sdk import DAG, BaseOperator

    AIRFLOW_2 = False
except ImportError:  # Airflow 2.x: the same classes in the core package
    from airflow.models.baseoperator import BaseOperator
    from airflow.models.dag import DAG
    from airflow.operators.bash import BashOperator
    from airflow.operators.python import BranchPythonOperator
    from airflow.sensors.python import PythonSensor
    from airflow.triggers.temporal import TimeDeltaTrigger

    AIRFLOW_2 = True

try:  # 3.3 moved it to the SDK and deprecates the old name; 3.1 and 2.x have only the old one
    from airflow.sdk.exceptions import AirflowSkipException
except ImportError:
    from airflow.exceptions import AirflowSkipException

START = datetime(2024, 1, 1)
MARKERS = os.environ.get("TI_GUARD_DEPLOY_MARKERS", "/tmp")


def _dag(dag_id, **kw):
    return DAG(dag_id, schedule=None, start_date=START, catchup=False, tags=["ti_guard_deploy"], **kw)


def _marked(task_id, command):
    """`command` between a started and a finished marker file (the finished one only if it ran to its end)."""
    base = f"{MARKERS}/{{{{ run_id }}}}.{task_id}"
    return f"touch '{base}.started' && {command} && touch '{base}.finished'"


# 1. The scheduler's designed dagrun_timeout write: every unfinished TI, the running one included -> skipped.
with _dag("deploy_timeout", dagrun_timeout=timedelta(seconds=20)):
    BashOperator(task_id="sleeps", bash_command=_marked("sleeps", "sleep 60"))


# 2. The REST API's "mark as" (PATCH taskInstances) and "mark run failed" / "clear" on running tasks.
with _dag("deploy_rest_marks"):
    for name in ("long_skip", "long_fail", "long_success"):
        BashOperator(task_id=name, bash_command=_marked(name, "sleep 60"))
    BashOperator(task_id="quick", bash_command="true")


# 3. fail_fast: one task fails, its running sibling is stopped by Airflow.
with _dag("deploy_fail_fast", **{"fail_stop" if AIRFLOW_2 else "fail_fast": True}):
    BashOperator(task_id="fails", bash_command="sleep 5; exit 1")
    BashOperator(task_id="sibling", bash_command=_marked("sibling", "sleep 60"))


# 4. Deferral ending in a skip (the triggerer fires, the task resumes and skips itself), and a
#    reschedule-mode sensor whose soft_fail timeout skips it.
class DeferThenSkip(BaseOperator):
    def execute(self, context):
        # 15 s, not less: the executor's "success" event for the deferring attempt can arrive seconds
        # after the process ends; if the trigger has fired and the TI is queued again by then, the
        # scheduler marks it FAILED ("state changed externally"; seen on 3.3.2 without any guard).
        self.defer(trigger=TimeDeltaTrigger(timedelta(seconds=15)), method_name="execute_complete")

    def execute_complete(self, context, event=None):
        raise AirflowSkipException("resumed from the trigger; skipping on purpose")


with _dag("deploy_deferrable"):
    DeferThenSkip(task_id="defer_then_skip")
    PythonSensor(
        task_id="reschedule_soft_fail", python_callable=lambda: False,
        # One poke, rescheduled once, timed out at the second poke: pokes closer together than the
        # supervisor's few seconds of winding down let a late executor event of the previous poke make
        # the scheduler mark the running poke FAILED (seen on 3.3.2 without any guard).
        mode="reschedule", poke_interval=15, timeout=10, soft_fail=True,
    )


# 5. The seed's race (apache/airflow#63266): `join` (one_success) is already running when the slow
#    branch decides not to follow it. The branch waits for join's started marker instead of a fixed
#    sleep, so the race happens however slowly this machine starts tasks.
def _decide_late(run_id, **_):
    started = Path(MARKERS) / f"{run_id}.join.started"
    deadline = time.monotonic() + 90
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(3)
    (Path(MARKERS) / f"{run_id}.branch.decided").write_text("join started" if started.exists() else "join never started")
    return "other"


def _run_callback(outcome):
    """The DAG's run callback: writes which one fired (what an operator's alerting would see)."""
    def callback(context):
        Path(MARKERS, f"{context['dag_run'].run_id}.run_callback").write_text(outcome)
    return callback


with _dag("deploy_race", on_success_callback=_run_callback("success"), on_failure_callback=_run_callback("failure")):
    fast = BashOperator(task_id="fast", bash_command="sleep 1")
    join = BashOperator(task_id="join", bash_command=_marked("join", "sleep 40"), trigger_rule="one_success")
    branch = BranchPythonOperator(task_id="branch", python_callable=_decide_late)
    other = BashOperator(task_id="other", bash_command="true")
    fast >> join
    branch >> [join, other]


# 6. A stale scheduler's `DagRun.schedule_tis` over a running task (apache/airflow#60330): the case
#    calls the real schedule_tis from outside while `sleeps` runs. Every start of the task appends a
#    line (its try_number) to `<run_id>.sleeps.starts`, so the case counts how often it ran.
with _dag("deploy_schedule_tis"):
    BashOperator(
        task_id="sleeps",
        bash_command=f"echo \"try {{{{ ti.try_number }}}} $(date -u +%T)\" >> '{MARKERS}/{{{{ run_id }}}}.sleeps.starts' && sleep 30",
    )
