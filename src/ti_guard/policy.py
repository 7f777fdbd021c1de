"""The guard's policy as data: which writes to task_instance.state are refused, and how.

One table of rules, read by every renderer (render/<backend>.py turns each rule into that
backend's SQL) and by the policy tables of docs/policy.md (`python -m ti_guard.policy_doc --docs`). A rule
says which write it stops (new state, old states), what tells that write apart from Airflow's
deliberate writes of the same transition (its *signature*: a fact about the statement that a
backend can or cannot see), whether `raise` mode may fail the statement for it, and which
Airflow writers it is for. WRITERS lists every Airflow writer of those transitions, each with
the rule that catches it or None when it goes through.

Two properties every rule keeps (docs/policy.md, "Policy"):

(a) Airflow's own components never fail because of the guard. A write Airflow makes to one
    task instance through its ORM (`TaskInstance.set_state`, the scheduler's run timeout)
    checks the rowcount, so a rule that may meet such a write never raises and never drops
    the row from the count: it keeps the row as it was and counts it ("kept").
(b) A task instance that a worker runs, or that finished, is not overwritten by a skip decided
    elsewhere, whichever writer carries the decision, as far as the backend can tell the
    writers apart; the scheduler's run timeout and a task's own finish go through.
"""

from __future__ import annotations

import dataclasses
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
# ignore: a refused write leaves the row as it was and is recorded; nothing Airflow does ever
# fails because of the guard (docs/policy.md, "Which mode"). raise: the racy skip routes fail their
# statement. audit: every write goes through and each one the guard would refuse is recorded,
# the first step of a rollout (docs/rollout.md).
MODES = ("ignore", "raise", "audit")
DEFAULT_MODE = "ignore"
# What a rule does to a write it matches: fail the statement, keep the row as it was (and record
# it), or let it through (and record it).
RAISE, KEEP, AUDIT = "raise", "keep", "audit"
DEFAULT_TABLE = "task_instance"
PREFIX = "ti_guard"
SETTINGS_TABLE = "ti_guard_settings"
VERSION_TABLE = "ti_guard_alembic_version"
# The record of refusals (record.py): a ring of details, counts per day kept for good.
RECORD_TABLE = "ti_guard_refusals"
COUNTS_TABLE = "ti_guard_refusal_counts"
RECORD_SEQUENCE = "ti_guard_refusal_seq"
RECORD_ROWS = 10_000
# A writer counts into `seq % COUNT_BUCKETS` of its own rows: one statement refusing many rows
# then updates each counter row at most 1/COUNT_BUCKETS as often (PostgreSQL keeps every version
# a transaction makes of a row, so updating one row N times costs N^2/2 reads).
COUNT_BUCKETS = 1000
# A writer counts in the rows of a lane it holds alone (PostgreSQL: an advisory lock until its
# transaction ends; MySQL: a named lock, held by the session), the first free one from lane 0, so
# no two live transactions ever update the same counter row, and the counters grow with the
# number of writers refusing at the same moment, not with the number of connections ever made: at
# most LANES x COUNT_BUCKETS rows per day, rule, action and states. A writer that finds every lane
# held by others counts in an overflow lane of its own (LANES + its connection id): it never waits.
LANES = 128
# Columns the guard reads; present in Airflow 2.3+ and 3.x.
REQUIRED_COLUMNS = ("dag_id", "task_id", "run_id", "map_index", "state", "start_date", "end_date")

# Signatures: what a backend must see of a statement to tell the refused write from a
# deliberate one. Each renderer compiles the signatures it can see and names the ones it can't.
STAMPS_START = "stamps_start"
STAMPS_START_AND_DURATION = "stamps_start_and_duration"
ENDS_WITHOUT_NEXT_METHOD = "ends_without_next_method"
BUMPS_TRY_NUMBER = "bumps_try_number"
ENDS_IN_ONE_STATEMENT = "ends_in_one_statement"
SIGNATURES = {
    STAMPS_START: "writes start_date and leaves duration (the racy skip routes stamp start_date = end_date = now "
    "and write nothing else)",
    STAMPS_START_AND_DURATION: "writes start_date and a new duration, or a duration of 0 (`TaskInstance.set_state` on "
    "an ORM copy read before a worker started the row: the copy has no start_date, so set_state stamps one and a "
    "duration of 0; a row whose duration was 0 already cannot be told from a racy route, and is kept, never raised)",
    ENDS_WITHOUT_NEXT_METHOD: "sets end_date, keeps start_date and does not write next_method "
    "(`TaskInstance.set_state`; a task's own finish through Airflow 3's execution API always "
    "writes next_method = NULL)",
    ENDS_IN_ONE_STATEMENT: "sets end_date in the same statement that moves the row to skipped, and keeps start_date "
    "(`TaskInstance.set_state`; Airflow 2's task that skips itself writes the state alone and its end_date in a "
    "later commit, and the run timeout writes no end_date)",
    BUMPS_TRY_NUMBER: "writes try_number (`DagRun.schedule_tis` always does; 3.3's human-in-the-loop "
    "resume, the one deliberate running -> scheduled, does not)",
}
# The column each signature is read from: the one place that decides which rule needs which column
# (render.missing_columns). A table without it cannot have the rule: install refuses, naming the
# column, the rule and the Airflow release that has it, rather than make a trigger that names a
# column the table lacks; switching the rule off drops the requirement.
SIGNATURE_NEEDS = {
    STAMPS_START: "start_date",
    STAMPS_START_AND_DURATION: "duration",
    ENDS_WITHOUT_NEXT_METHOD: "next_method",
    ENDS_IN_ONE_STATEMENT: "end_date",
    BUMPS_TRY_NUMBER: "try_number",
}
# Since when Airflow's task_instance has each of those columns (its migrations: next_method came with
# deferrable operators in 2.2.0; the others are older than the 2.3 the guard needs anyway).
COLUMN_SINCE = {
    "start_date": "every Airflow release has it",
    "end_date": "every Airflow release has it",
    "try_number": "every Airflow release has it",
    "next_method": "Airflow 2.2.0 and later have it",
    "duration": "every Airflow release has it",
}


@dataclass(frozen=True)
class Rule:
    name: str
    new_state: str
    old_states: tuple[str, ...] | None  # None: the policy's protect list
    signature: str
    may_raise: bool  # False: kept in every mode, because an ORM caller (the scheduler) meets it
    why: str
    # The columns its writers write: what a kept row gets back where the backend cannot simply
    # keep the old row (MySQL sets NEW.c = OLD.c; each such column costs every updated row).
    writes: tuple[str, ...]
    # Airflow generations (told by the table's columns) the rule is installed for.
    airflow: tuple[int, ...] = (2, 3)
    # Old states a deliberate Airflow 2 writer moves with the same signature: left out on 2.x tables.
    spared_on_airflow_2: tuple[str, ...] = ()
    # The signature on Airflow 2 tables, where the writers it must tell apart write other columns.
    signature_on_airflow_2: str | None = None

    def for_generation(self, generation: int) -> "Rule":
        """The rule as installed on that generation's table (its signature there)."""
        if generation == 2 and self.signature_on_airflow_2:
            return dataclasses.replace(self, signature=self.signature_on_airflow_2)
        return self

    def olds(self, protect: tuple[str, ...], generation: int = 3) -> tuple[str, ...]:
        olds = protect if self.old_states is None else tuple(s for s in self.old_states if s in protect)
        spared = self.spared_on_airflow_2 if generation == 2 else ()
        return tuple(s for s in olds if s not in spared)


RULES = (
    Rule(
        name="racy_skip",
        new_state="skipped",
        old_states=None,
        signature=STAMPS_START,
        may_raise=True,
        why="the pre-fix branch / short-circuit skip routes overwrite a task a worker holds or that finished",
        writes=("state", "start_date", "end_date", "updated_at"),
    ),
    Rule(
        name="stale_set_state_skip",
        new_state="skipped",
        old_states=None,
        signature=STAMPS_START_AND_DURATION,
        may_raise=False,
        why="the scheduler's dependency checks skip through `TaskInstance.set_state` on a copy of the row read before "
        "a worker started it (seen under two schedulers and Celery workers): start_date is stamped as by the racy "
        "routes, but the writer is the scheduler's ORM flush, so the row is kept and counted, never raised",
        writes=("state", "start_date", "end_date", "duration", "updated_at"),
    ),
    Rule(
        name="set_state_skip",
        new_state="skipped",
        old_states=("running",),
        signature=ENDS_WITHOUT_NEXT_METHOD,
        may_raise=False,
        why="the scheduler's dependency checks (NotPreviouslySkippedDep, TriggerRuleDep) skip a task "
        "that already runs; they write through the ORM inside the scheduler loop, so the row is kept, never raised",
        writes=("state", "end_date", "duration", "updated_at"),
        # Airflow 2's own finish has no next_method write to tell it by; it writes the skip and its
        # end_date in two statements (taskinstance.py `_run_raw_task`), set_state in one.
        signature_on_airflow_2=ENDS_IN_ONE_STATEMENT,
    ),
    Rule(
        name="stale_schedule",
        new_state="scheduled",
        old_states=("running", "success", "failed"),
        signature=BUMPS_TRY_NUMBER,
        may_raise=False,
        why="`DagRun.schedule_tis` before 3.3 schedules from a stale read without checking the state: a running task "
        "is put back to scheduled and runs again (apache/airflow#60330); it runs in the scheduler loop, so the row is "
        "kept, never raised, which is exactly upstream's 3.3 WHERE fix",
        writes=("state", "try_number", "scheduled_dttm", "updated_at"),
        spared_on_airflow_2=("failed",),
    ),
)


@dataclass(frozen=True)
class Writer:
    """One Airflow code path that writes a guarded transition, and the rule that catches it (or None)."""

    name: str
    versions: str
    transition: str
    writes: str
    rule: str | None
    note: str = ""


# Read from the sources of apache-airflow 3.3.2, 3.1.8, 2.11.2 and 2.10.5 (file:line references in
# docs/policy.md) and checked on running deployments (tests/deploy).
WRITERS = (
    Writer("task skips itself (`AirflowSkipException`, soft_fail sensor, `@task.skip_if`): execution API `ti_update_state`",
           "3.x", "running -> skipped", "Core: state, end_date, duration, next_method = NULL, next_kwargs = NULL, rendered_map_index, updated_at",
           None, "the task's own finish"),
    Writer("task skips itself: `TaskInstance._run_raw_task` in the task's process",
           "2.x", "running -> skipped", "ORM, two commits: state, updated_at; then end_date, duration, updated_at", None,
           "the task's own finish; its state write looks like the run timeout"),
    Writer("branch / short-circuit skip before the fix: `ti_skip_downstream`, `SkipMixin._set_state_to_skipped`",
           "3.0, 3.1, 2.x", "any -> skipped", "Core, bulk: state, start_date = end_date = now, updated_at", "racy_skip",
           "the seed bug (apache/airflow#63266)"),
    Writer("branch / short-circuit skip, fixed: `ti_skip_downstream` with `state NOT IN (running, success, failed)`",
           "3.3", "NULL, scheduled, queued, ... -> skipped", "Core, bulk: state, start_date = end_date = now, updated_at", None,
           "never reaches a protected row"),
    Writer("scheduler, run reached `dagrun_timeout`: `SchedulerJobRunner._schedule_dag_run`",
           "2.x, 3.x", "every unfinished, running included -> skipped", "ORM: state, updated_at (no end_date)", None,
           "designed behaviour (apache/airflow#30264); the worker is stopped by design"),
    Writer("scheduler, `NotPreviouslySkippedDep` / `TriggerRuleDep` / `MappedTaskUpstreamDep` via `DagRun.update_state` -> "
           "`_are_premature_tis`: `TaskInstance.set_state`",
           "3.x", "running -> skipped", "ORM: state, end_date, duration, updated_at", "set_state_skip",
           "the second writer of the seed's race: upstream's WHERE fix does not cover it"),
    Writer("the same dependency writers on an ORM copy read before a worker started the task: `TaskInstance.set_state` "
           "stamps `start_date or now`", "2.x, 3.x", "running (read as not started) -> skipped",
           "ORM: state, start_date, end_date, duration, updated_at", "stale_set_state_skip",
           "found by the production benchmark (two schedulers, Celery workers: docs/production.md); it looks like the racy "
           "routes but for duration, and the scheduler's flush must count its row: kept, never raised"),
    Writer("the same dependency writers, and an operator's REST / UI mark of a running TI: `TaskInstance.set_state`", "2.x",
           "running -> skipped", "ORM, one statement: state, end_date, duration, updated_at", "set_state_skip",
           "the race's second writer on 2.x; a REST mark of a running TI sends the same SQL and is kept too (mark it failed or success, or use the bypass)"),
    Writer("operator marks a running TI skipped: REST PATCH / UI -> `mark_tasks.set_state` -> `TaskInstance.set_state`",
           "3.x", "running -> skipped", "ORM: state, end_date, duration, updated_at", "set_state_skip",
           "the same SQL as the dependency writers: kept too (mark it failed or success, or use the bypass)"),
    Writer("operator marks a finished TI skipped: REST PATCH / UI -> `TaskInstance.set_state`",
           "2.x, 3.x", "success, failed -> skipped", "ORM: state, updated_at (start_date and end_date already set)", None,
           "a deliberate mark"),
    Writer("operator marks a run failed: `set_dag_run_state_to_failed`",
           "2.x, 3.x", "running -> failed; not started -> skipped", "ORM: `set_state`", None,
           "no protected row becomes skipped"),
    Writer("`fail_fast` / `fail_stop`: `_stop_remaining_tasks`",
           "2.x, 3.x", "running -> failed; not started -> skipped", "ORM: `set_state`, `ti.error`", None,
           "no protected row becomes skipped"),
    Writer("mapped task expanded to zero (`expand_mapped_task`), trigger `TaskSkippedEvent`, a dependency on a task not yet started",
           "2.x, 3.x", "NULL, scheduled, deferred, ... -> skipped", "ORM", None, "not a protected row"),
    Writer("scheduler schedules before the fix: `DagRun.schedule_tis`",
           "3.0, 3.1, 2.x", "read as NULL / up_for_retry / up_for_reschedule, written whatever it is now -> scheduled",
           "Core, bulk: state, try_number (CASE), scheduled_dttm (3.x), updated_at", "stale_schedule",
           "the larger share of the seed's kills (apache/airflow#60330); 3.3 adds the same check to its WHERE"),
    Writer("scheduler schedules, fixed: `DagRun.schedule_tis` with `state IS NULL OR state IN (up_for_retry, up_for_reschedule)`",
           "3.3", "NULL, up_for_retry, up_for_reschedule -> scheduled", "Core, bulk: state, try_number, scheduled_dttm, updated_at",
           None, "never reaches a protected row"),
    Writer("human-in-the-loop task whose response already arrived: `ti_update_state` to awaiting_input",
           "3.3", "running -> scheduled", "ORM flush (next_method, next_kwargs, trigger_id, scheduled_dttm), then Core: state, updated_at",
           None, "deliberate, under a row lock; writes no try_number"),
    Writer("triggerer resumes a deferred task, trigger timeout, trigger failure", "2.x, 3.x", "deferred -> scheduled",
           "ORM / Core: state, next_method, next_kwargs, trigger_id, scheduled_dttm", None, "not a protected row"),
    Writer("stuck in queued: `_reschedule_stuck_task`", "2.x, 3.x", "read as queued -> scheduled",
           "Core: state, queued_dttm, queued_by_job_id, scheduled_dttm, updated_at", None,
           "no try_number: not caught if a worker started the task in between (not observed)"),
    Writer("backfill `--rerun-failed-tasks`", "2.x", "failed -> scheduled", "ORM: state, try_number, updated_at", None,
           "deliberate, with schedule_tis's signature: failed is spared on Airflow 2 tables"),
)


RULE_NAMES = tuple(r.name for r in RULES)
ALL_RULES = "all"


def rule_named(name: str) -> Rule:
    return next(r for r in RULES if r.name == name)


def airflow_generation(columns) -> int:
    """3 when the table is Airflow 3's (rows keyed by a UUID `id`), else 2. Unknown columns
    (offline SQL for a DBA) are taken as Airflow 3's."""
    return 3 if columns is None or "id" in columns else 2


@dataclass(frozen=True)
class Policy:
    protect: tuple[str, ...] = DEFAULT_PROTECT
    mode: str = DEFAULT_MODE
    schema: str | None = None
    table: str = DEFAULT_TABLE
    # The rules the operator switched on (--rules, -x rules=, TI_GUARD_RULES), in RULES order.
    switched_on: tuple[str, ...] = RULE_NAMES

    @classmethod
    def build(cls, protect=None, mode=None, schema=None, table=None, rules=None) -> "Policy":
        """Validate user input into a Policy; every refusal names the cause and the fix."""
        mode = (mode or DEFAULT_MODE).strip().lower()
        if mode not in MODES:
            raise GuardError(f"unknown mode {mode!r}: use 'ignore', 'raise' or 'audit' (-x mode=, TI_GUARD_MODE, --mode)")
        return cls(
            protect=parse_states(protect),
            mode=mode,
            schema=schema or None,
            table=table or DEFAULT_TABLE,
            switched_on=parse_rules(rules),
        )

    @property
    def db_schema(self) -> str | None:
        """The schema to qualify names with; SQLite's 'main' is no qualifier."""
        return None if self.schema in (None, "main") else self.schema

    @property
    def protect_csv(self) -> str:
        return ",".join(self.protect)

    @property
    def rules_csv(self) -> str:
        return ",".join(self.switched_on)

    def describe(self) -> str:
        return f"mode={self.mode} protect={self.protect_csv} rules={self.rules_csv}"

    def _applicable(self, columns):
        """(rule as installed on this table, its old states) for every rule switched on that applies here."""
        generation = airflow_generation(columns)
        for rule in RULES:
            olds = rule.olds(self.protect, generation)
            if rule.name in self.switched_on and olds and generation in rule.airflow:
                yield rule.for_generation(generation), olds

    def rules(self, columns=None) -> list[tuple[Rule, tuple[str, ...], str]]:
        """(rule, old states, action) for every rule switched on that applies to this table and protect list."""
        return [(rule, olds, self.action(rule)) for rule, olds in self._applicable(columns)]

    def action(self, rule: Rule) -> str:
        if self.mode == "audit":
            return AUDIT
        return RAISE if rule.may_raise and self.mode == "raise" else KEEP


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


def parse_rules(value) -> tuple[str, ...]:
    """Turn 'all,-set_state_skip', 'racy_skip,stale_schedule' or '-set_state_skip' (a sequence too)
    into the rules switched on, in RULES order: the names given (all: every rule; none given: every
    rule), less those named with a leading '-'."""
    if value is None or value == "":
        return RULE_NAMES
    items = [s.strip().lower() for s in (value.split(",") if isinstance(value, str) else value) if s and s.strip()]
    off = {s[1:].strip() for s in items if s.startswith("-")}
    on = {s for s in items if not s.startswith("-")}
    unknown = sorted((on | off) - set(RULE_NAMES) - {ALL_RULES})
    if unknown:
        raise GuardError(
            f"unknown rule(s) {', '.join(map(repr, unknown))}: the rules are {', '.join(RULE_NAMES)} "
            f"(--rules, -x rules=, TI_GUARD_RULES take a comma-separated list; all = every rule, -name switches one off)"
        )
    chosen = set(RULE_NAMES) if not on or ALL_RULES in on else on
    rules = tuple(r for r in RULE_NAMES if r in chosen and r not in off)
    if not rules:
        raise GuardError("no rule left switched on: name at least one of " + ", ".join(RULE_NAMES) + " (to remove the guard, ti-guard uninstall)")
    return rules


def short_hash(*parts: str) -> str:
    """Eight hex digits that name a definition; objects carry it in their names."""
    digest = hashlib.sha256("\x00".join(parts).encode()).hexdigest()
    return digest[:8]
