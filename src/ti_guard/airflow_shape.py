"""A `task_instance` table shaped like Airflow's, for the demo, the tests and the benchmarks.

Columns and indexes are those `airflow db migrate` creates in apache-airflow 3.3.2 (read off
a migrated PostgreSQL 15 database); foreign keys to tables the guard never reads are left
out. The 2.x shape keys rows by (dag_id, task_id, run_id, map_index) and has no `id`.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql

from .policy import DEFAULT_TABLE

TS = sa.DateTime(timezone=True).with_variant(mysql.TIMESTAMP(fsp=6), "mysql", "mariadb")
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _s(n):
    return sa.String(n)


def _id(n=250):
    # Airflow keys its ids with utf8mb3_bin on MySQL: utf8mb4 keys of this width exceed InnoDB's limit.
    return sa.String(n).with_variant(mysql.VARCHAR(n, charset="utf8mb3", collation="utf8mb3_bin"), "mysql", "mariadb")


def _3x_columns():
    return [
        sa.Column("id", sa.Uuid(as_uuid=False), primary_key=True),
        sa.Column("task_id", _id(), nullable=False),
        sa.Column("dag_id", _id(), nullable=False),
        sa.Column("run_id", _id(), nullable=False),
        sa.Column("map_index", sa.Integer, nullable=False, server_default=sa.text("-1")),
        sa.Column("start_date", TS),
        sa.Column("end_date", TS),
        sa.Column("duration", sa.Float),
        sa.Column("state", _s(20)),
        sa.Column("try_number", sa.Integer, nullable=False, server_default="0"),
        sa.Column("max_tries", sa.Integer, nullable=False, server_default=sa.text("-1")),
        sa.Column("hostname", _s(1000)),
        sa.Column("unixname", _s(1000)),
        sa.Column("pool", _id(256), nullable=False, server_default="default_pool"),
        sa.Column("pool_slots", sa.Integer, nullable=False, server_default="1"),
        sa.Column("queue", _s(256)),
        sa.Column("priority_weight", sa.Integer),
        sa.Column("operator", _s(1000)),
        sa.Column("custom_operator_name", _s(1000)),
        sa.Column("queued_dttm", TS),
        sa.Column("scheduled_dttm", TS),
        sa.Column("queued_by_job_id", sa.Integer),
        sa.Column("last_heartbeat_at", TS),
        sa.Column("pid", sa.Integer),
        sa.Column("executor", _s(1000)),
        sa.Column("executor_config", sa.LargeBinary),
        sa.Column("updated_at", TS),
        sa.Column("rendered_map_index", _s(250)),
        sa.Column("context_carrier", JSON),
        sa.Column("span_status", _s(250), nullable=False, server_default="not_started"),
        sa.Column("external_executor_id", sa.Text),
        sa.Column("trigger_id", sa.Integer),
        sa.Column("trigger_timeout", TS),
        sa.Column("next_method", _s(1000)),
        sa.Column("next_kwargs", JSON),
        sa.Column("task_display_name", _s(2000)),
        sa.Column("dag_version_id", sa.Uuid(as_uuid=False)),
        sa.Column("retry_delay_override", sa.Float),
        sa.Column("retry_reason", _s(500)),
    ]


def task_instance_table(metadata: sa.MetaData, shape: str = "3.x", schema=None, name=DEFAULT_TABLE) -> sa.Table:
    if shape == "3.x":
        return sa.Table(
            name,
            metadata,
            *_3x_columns(),
            sa.UniqueConstraint("dag_id", "task_id", "run_id", "map_index", name=f"{name}_composite_key"),
            sa.Index("ti_dag_run", "dag_id", "run_id"),
            sa.Index("ti_dag_state", "dag_id", "state"),
            sa.Index("ti_dag_version_id", "dag_version_id"),
            sa.Index("ti_heartbeat", "last_heartbeat_at"),
            sa.Index("ti_pool", "pool", "state", "priority_weight"),
            sa.Index("ti_state", "state"),
            sa.Index("ti_state_lkp", "dag_id", "task_id", "run_id", "state"),
            sa.Index("ti_trigger_id", "trigger_id"),
            schema=schema,
        )
    if shape == "2.x":
        cols = [c for c in _3x_columns() if c.name not in ("id", "dag_version_id", "context_carrier", "span_status", "scheduled_dttm", "last_heartbeat_at", "retry_delay_override", "retry_reason", "task_display_name")]
        for c in cols:
            if c.name in ("dag_id", "task_id", "run_id", "map_index"):
                c.primary_key = True
        cols.append(sa.Column("job_id", sa.Integer))
        return sa.Table(
            name,
            metadata,
            *cols,
            sa.Index("ti_dag_run", "dag_id", "run_id"),
            sa.Index("ti_state", "state"),
            sa.Index("ti_state_lkp", "dag_id", "task_id", "run_id", "state"),
            schema=schema,
        )
    raise ValueError(f"unknown shape {shape!r}")


# The columns the renderers assume when no database is at hand (offline SQL for a DBA): Airflow 3's.
AIRFLOW_3_COLUMNS = tuple(c.name for c in _3x_columns())
