"""The races of apache/airflow#63266 and #60330 on PostgreSQL and MariaDB: overwrites without the guard, none with it.

Two racy writers beside the workers: the pre-fix skip UPDATE and the pre-3.3
`DagRun.schedule_tis` acting on a stale read. What happened is read from the observer's log
and from the workers' own 409s, never from the guard; see harness.py for the script that runs
the same thing at any size.
"""

from __future__ import annotations

import pytest

from .harness import Result, run_variant, tables

pytestmark = pytest.mark.race


def _accounted(result: Result) -> None:
    """Checks of the harness itself (Result.problems): every write seen once, by the observer and by the writers."""
    print("\n" + tables([result]))
    assert not result.errors, result.errors
    assert result.problems() == []
    # The checks can fail: the workload has self-skips, and each writer targeted rows that commit.
    assert result.self_skips == result.counts["finished skipped"] > 0
    assert result.kills == result.skip_kills + result.schedule_kills
    assert result.skip_kills == result.overwrites["running"]
    assert result.schedule_kills == result.schedule_overwrites["running"]
    assert result.counts["rows targeted by committed schedules"] > 0


def test_without_the_guard_both_writers_overwrite(server_db, baseline_plan):
    result = run_variant(server_db.url, "none", baseline_plan)
    _accounted(result)
    assert result.races == baseline_plan.races and result.schedule_races == baseline_plan.schedule_races
    # The skip writer (apache/airflow#63266).
    assert result.overwritten > 0 and result.overwrites["running"] > 0 and result.skip_kills > 0
    assert result.refused == 0
    # The schedule writer (apache/airflow#60330): running tasks put back to scheduled and killed.
    assert result.schedule_overwritten > 0 and result.schedule_overwrites["running"] > 0 and result.schedule_kills > 0
    assert result.current_states.get("scheduled", 0) > 0
    assert result.schedule_kept == 0 and result.counts["schedule refused"] == 0


@pytest.mark.parametrize("mode", ["raise", "ignore"])
def test_with_the_guard_nothing_is_overwritten(server_db, race_plan, mode):
    result = run_variant(server_db.url, mode, race_plan)
    _accounted(result)
    # `ti-guard report` counts exactly what the guard stopped, as the writers counted it: every
    # skip target it kept (ignore) and every schedule target it kept (both modes; a refused skip
    # statement rolls back, its record with it).
    assert result.record_as(result.expected_record()) == result.expected_record()
    assert result.recorded_by("stale_schedule") == result.schedule_kept > 0
    assert result.recorded_by("racy_skip") == (result.unchanged if mode == "ignore" else 0)
    assert result.races == race_plan.races and result.schedule_races == race_plan.schedule_races
    assert result.kills == 0 and result.current_states == {}
    # The skip writer.
    assert result.overwritten == 0 and result.skip_kills == 0
    # The skips that the policy allows still went through: the guard refuses only what it must.
    assert result.skipped_unprotected > 0
    if mode == "raise":
        assert result.refused > 0 and result.counts["worker refused"] == 0
    else:
        assert result.unchanged > 0 and result.refused == 0
    # The schedule writer: protected rows kept as they were, in both modes; never an error,
    # raise mode included (rule stale_schedule never raises), and every statement counted
    # every row it targeted (a rowcount short of the targets is an error in Result.errors).
    assert result.schedule_overwritten == 0 and result.schedule_kills == 0
    assert result.schedule_kept > 0
    # Rows schedule_tis is meant for (up_for_retry, up_for_reschedule; the stale read was still
    # right about them) were scheduled: the guard keeps only protected rows.
    assert result.scheduled_legitimately > 0
    assert result.counts["schedule refused"] == 0 and not any(k.startswith("schedule error") for k in result.counts)
    assert result.counts["schedule races committed"] == result.schedule_races


def test_audit_lets_every_write_through_and_records_each_overwrite(server_db, baseline_plan):
    """The rollout's first week: the race runs as without the guard, and `ti-guard report`
    counts exactly the overwrites the observer saw, by writer and old state."""
    result = run_variant(server_db.url, "audit", baseline_plan)
    _accounted(result)
    assert result.overwritten > 0 and result.skip_kills > 0 and result.schedule_overwritten > 0 and result.schedule_kills > 0
    assert result.unchanged == 0 and result.schedule_kept == 0 and result.refused == 0
    assert result.record_as(result.expected_record()) == result.expected_record()
    assert result.recorded_by("racy_skip") == result.overwritten and result.recorded_by("stale_schedule") == result.schedule_overwritten
