"""Runs inside the Airflow virtualenv (never the project's): DAGs and Airflow's own writers, then reports.

    python runner.py REPLY_FD      (requests as JSON lines on stdin, replies on REPLY_FD)

`dags`: each DAG id is run exactly as `airflow dags test <dag_id>` runs it (Airflow's own CLI
parser and `dag_test` command, which calls `dag.test()`: the task runner and the in-process
execution API, so the guard sees Airflow's own UPDATEs); all in one process because each
`airflow` start costs seconds of imports. `steps`: Airflow's own writers called against the
metadata DB: `TaskInstance.set_state` (optionally wrapped in the caller's bypass statements) and
the execution API's real `ti_skip_downstream` route function. The results are the rows as read
back from the database afterwards, not what the callers believed they wrote.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback


def _states(session, dag_id, run_id):
    from airflow.models import DagRun, TaskInstance as TI
    from sqlalchemy import select

    run = session.scalar(select(DagRun).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id))
    rows = session.execute(
        select(TI.task_id, TI.map_index, TI.state, TI.try_number).where(TI.dag_id == dag_id, TI.run_id == run_id)
    ).all()
    name = lambda t, m: f"{t}[{m}]" if m >= 0 else t  # noqa: E731
    return {
        "run_id": run_id,
        "run_state": run.state if run else None,
        "tis": {name(t, m): s for t, m, s, _ in sorted(rows)},
        "tries": {name(t, m): n for t, m, _, n in sorted(rows)},
    }


def _latest_run_id(session, dag_id):
    from airflow.models import DagRun
    from sqlalchemy import select

    return session.scalar(select(DagRun.run_id).where(DagRun.dag_id == dag_id).order_by(DagRun.id.desc()).limit(1))


def _error(exc):
    """The database's own words, as the caller of Airflow gets them (PyMySQL keeps them in args[1])."""
    orig = getattr(exc, "orig", None) or exc
    args = getattr(orig, "args", ())
    text = str(args[1] if len(args) == 2 and isinstance(args[0], int) else orig).strip()
    return text.splitlines()[0] if text else repr(exc)


def _attempt(write):
    """Runs `write(session)` in one session the way Airflow's callers do: commit, or roll back and raise."""
    from airflow.utils.session import create_session

    try:
        with create_session() as session:
            write(session)
        return None
    except Exception as exc:  # the refusal is the result being measured
        return _error(exc)


def run_dags(dag_ids):
    from airflow.cli.cli_parser import get_parser
    from airflow.utils.session import create_session

    parser = get_parser()
    out = {}
    for dag_id in dag_ids:
        started = time.monotonic()
        args = parser.parse_args(["dags", "test", dag_id])
        try:
            args.func(args)
            exit_note = None
        except SystemExit as exc:  # `dags test` exits when the run failed; the states say the rest
            exit_note = str(exc)
        with create_session() as session:
            out[dag_id] = _states(session, dag_id, _latest_run_id(session, dag_id))
        out[dag_id].update(seconds=round(time.monotonic() - started, 2), exit=exit_note)
        print(f"[runner] {dag_id}: {out[dag_id]['run_state']} {out[dag_id]['tis']}", file=sys.stderr, flush=True)
    return out


def _ti(session, dag_id, run_id, task_id, map_index=-1):
    from airflow.models import TaskInstance as TI
    from sqlalchemy import select

    return session.scalar(
        select(TI).where(TI.dag_id == dag_id, TI.run_id == run_id, TI.task_id == task_id, TI.map_index == map_index)
    )


def set_state(step):
    """`TaskInstance.set_state`, the call behind the UI's and the REST API's "mark as"."""
    from airflow.utils.session import create_session
    from sqlalchemy import text

    with create_session() as session:
        run_id = _latest_run_id(session, step["dag_id"])
        ti = _ti(session, step["dag_id"], run_id, step["task_id"])
        before = ti.state
        # Airflow 2's `dags test` runs a task without the worker's start (`_run_raw_task` alone), so its
        # row finishes with start_date NULL, and set_state would stamp one: a write no deployed TI sees
        # (a worker always starts it). Give the row the start_date a worker would have written.
        filled = ti.start_date is None and ti.end_date is not None
        if filled:
            ti.start_date = ti.end_date

    def mark(session):
        ti = _ti(session, step["dag_id"], run_id, step["task_id"])
        for sql in step.get("before", []):
            session.execute(text(sql))
        ti.set_state(step["state"], session=session)
        for sql in step.get("after", []):
            session.execute(text(sql))

    error = _attempt(mark)
    with create_session() as session:
        after = _ti(session, step["dag_id"], run_id, step["task_id"]).state
    return {"before": before, "error": error, "after": after, "start_date_filled": filled}


def route_skip(step):
    """The branch's skip writer against a running TI: Airflow 3's execution API `ti_skip_downstream`,
    called as its route function with a real session; on Airflow 2 the operator's own
    `SkipMixin.skip` (which the branch and short-circuit operators call in the task's process)."""
    from airflow.utils import timezone
    from airflow.utils.session import create_session

    with create_session() as session:
        run_id = _latest_run_id(session, step["dag_id"])
        # Put the run back in the moment of the race: a worker has started one task, another has
        # not been scheduled yet (writes the guard lets through: none of them sets skipped).
        for task_id, state in step["prepare"].items():
            ti = _ti(session, step["dag_id"], run_id, task_id)
            ti.state = state
            ti.start_date = timezone.utcnow() if state == "running" else ti.start_date
            ti.end_date = None if state == "running" else ti.end_date
        caller = _ti(session, step["dag_id"], run_id, step["caller"])
        caller_id = getattr(caller, "id", None)  # Airflow 2 rows have no id
    before = _states_of(step, run_id)
    if caller_id is None:
        error = _attempt(lambda session: _skipmixin_skip(step, run_id, session))
    else:
        from airflow.api_fastapi.execution_api.datamodels.taskinstance import TISkippedDownstreamTasksStatePayload
        from airflow.api_fastapi.execution_api.routes.task_instances import ti_skip_downstream

        payload = TISkippedDownstreamTasksStatePayload(tasks=list(step["tasks"]))
        error = _attempt(lambda session: ti_skip_downstream(task_instance_id=caller_id, ti_patch_payload=payload, session=session))
    return {"before": before, "error": error, "after": _states_of(step, run_id)}


def _skipmixin_skip(step, run_id, session):
    """Airflow 2: the caller operator's real `SkipMixin.skip` over the given tasks of its run, as
    `ShortCircuitOperator.execute` calls it (its UPDATE, then its skipmixin XCom)."""
    from airflow.models import DagBag, DagRun
    from airflow.settings import DAGS_FOLDER
    from sqlalchemy import select

    dag = DagBag(DAGS_FOLDER, include_examples=False).get_dag(step["dag_id"])
    dag_run = session.scalar(select(DagRun).where(DagRun.dag_id == step["dag_id"], DagRun.run_id == run_id))
    operator = dag.get_task(step["caller"])
    # `skip` opens and commits a session of its own (2.10, 2.11): the statement the guard meets is its UPDATE.
    operator.skip(dag_run=dag_run, execution_date=dag_run.execution_date, tasks=[dag.get_task(t) for t in step["tasks"]])


def _states_of(step, run_id):
    from airflow.utils.session import create_session

    with create_session() as session:
        return {t: _ti(session, step["dag_id"], run_id, t).state for t in step["tasks"]}


OPS = {"dags": lambda req: run_dags(req["dags"]), "set_state": set_state, "route_skip": route_skip}


def _one_execution_api_app():
    """Build the in-process execution API app once per process, as Airflow 3.2+ does.

    3.3.2 wraps `supervisor.in_process_api_server` in `functools.lru_cache(maxsize=1)`; 3.0/3.1
    build a new FastAPI app for every task (~4 s each here). Same app, same routes, same UPDATEs;
    only the rebuilding is skipped.
    """
    import functools

    try:
        from airflow.sdk.execution_time import supervisor
    except ImportError:  # Airflow 2 runs tasks in-process without an execution API
        return

    if not hasattr(supervisor.in_process_api_server, "cache_info"):
        supervisor.in_process_api_server = functools.lru_cache(maxsize=1)(supervisor.in_process_api_server)


def serve(reply_fd):
    """One request per stdin line, one JSON reply per line on `reply_fd` (Airflow's logs own stdout)."""
    import airflow.cli.cli_parser  # noqa: F401 - pay the import once, before the first request

    _one_execution_api_app()

    with os.fdopen(reply_fd, "w") as reply:
        reply.write(json.dumps({"ready": True}) + "\n")
        reply.flush()
        for line in sys.stdin:
            request = json.loads(line)
            if request["op"] == "quit":
                break
            try:
                answer = OPS[request["op"]](request)
            except Exception:
                answer = {"crash": traceback.format_exc()}
            reply.write(json.dumps(answer, default=str) + "\n")
            reply.flush()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
