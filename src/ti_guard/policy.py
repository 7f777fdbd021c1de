"""The guard's policy: which transitions to `skipped` are refused, and how.

One object, read by every renderer. The rule it stands for:

    refuse  NEW.state = 'skipped' AND OLD.state IN protect AND NOT self_finish

where self_finish is the attempt finishing itself: OLD.state = 'running', the statement
leaves start_date alone, and end_date is set (Airflow's `ti_update_state`). The racy skip
writer stamps start_date and end_date with one `now`; that is how the two are told apart.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .errors import GuardError

# Every value Airflow 2.x/3.x writes to task_instance.state.
AIRFLOW_STATES = (
    "removed",
    "scheduled",
    "queued",
    "running",
    "success",
    "restarting",
    "failed",
    "up_for_retry",
    "up_for_reschedule",
    "upstream_failed",
    "skipped",
    "deferred",
    "awaiting_input",
)
DEFAULT_PROTECT = ("running", "success", "failed")
MODES = ("raise", "ignore")
DEFAULT_TABLE = "task_instance"
PREFIX = "ti_guard"
SETTINGS_TABLE = "ti_guard_settings"
VERSION_TABLE = "ti_guard_alembic_version"
# Columns the guard reads; present in Airflow 2.3+ and 3.x.
REQUIRED_COLUMNS = ("dag_id", "task_id", "run_id", "map_index", "state", "start_date", "end_date")


@dataclass(frozen=True)
class Policy:
    protect: tuple[str, ...] = DEFAULT_PROTECT
    mode: str = "raise"
    schema: str | None = None
    table: str = DEFAULT_TABLE

    @classmethod
    def build(cls, protect=None, mode=None, schema=None, table=None) -> "Policy":
        """Validate user input into a Policy; every refusal names the cause and the fix."""
        mode = (mode or "raise").strip().lower()
        if mode not in MODES:
            raise GuardError(f"unknown mode {mode!r}: use 'raise' or 'ignore' (-x mode=, TI_GUARD_MODE, --mode)")
        return cls(
            protect=parse_states(protect),
            mode=mode,
            schema=schema or None,
            table=table or DEFAULT_TABLE,
        )

    @property
    def db_schema(self) -> str | None:
        """The schema to qualify names with; SQLite's 'main' is no qualifier."""
        return None if self.schema in (None, "main") else self.schema

    @property
    def protect_csv(self) -> str:
        return ",".join(self.protect)

    def describe(self) -> str:
        return f"mode={self.mode} protect={self.protect_csv}"


def parse_states(value) -> tuple[str, ...]:
    """Turn 'running,success' (or a sequence) into canonical, validated, ordered states."""
    if value is None or value == "":
        return DEFAULT_PROTECT
    items = value.split(",") if isinstance(value, str) else list(value)
    states = {s.strip().lower() for s in items if s and s.strip()}
    unknown = sorted(s for s in states if s not in AIRFLOW_STATES)
    if unknown:
        raise GuardError(
            f"unknown task state(s) in protect list: {', '.join(map(repr, unknown))}; "
            f"use a comma-separated list of {', '.join(AIRFLOW_STATES)}"
        )
    if "skipped" in states:
        raise GuardError("'skipped' cannot be protected (it is the state the guard refuses to write); remove it from the protect list")
    if not states:
        raise GuardError("the protect list is empty: name at least one state, e.g. running,success,failed")
    return tuple(s for s in AIRFLOW_STATES if s in states)


def short_hash(*parts: str) -> str:
    """Eight hex digits that name a definition; objects carry it in their names."""
    digest = hashlib.sha256("\x00".join(parts).encode()).hexdigest()
    return digest[:8]
