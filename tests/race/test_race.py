"""The race of apache/airflow#63266 on PostgreSQL and MariaDB: overwrites without the guard, none with it.

What happened is read from the observer's log and from the workers' own 409s, never from the
guard; see harness.py for the script that runs the same thing at any size.
"""

from __future__ import annotations

import pytest

from .harness import Result, run_variant, table

pytestmark = pytest.mark.race


def _accounted(result: Result) -> None:
    """Checks of the harness itself: every write is seen once, by the observer and by the writers."""
    print("\n" + table([result]))
    assert not result.errors, result.errors
    # Each committed self-skip is in the log as the worker's running -> skipped, start_date untouched.
    assert result.self_skips == result.counts["finished skipped"] > 0
    # Every running TI the skip writer overwrote was killed at the worker's next heartbeat or finish.
    assert result.kills == result.overwrites["running"]
    # Each targeted row is classified once, by the state it had when the skip wrote it.
    classified = result.overwritten + result.skipped_unprotected + result.already_skipped + result.unchanged
    assert classified == result.counts["rows targeted by committed skips"]
    if result.variant != "ignore":
        # Every row a committed skip targeted is in the log (no statement left a row as it was).
        assert result.unchanged == 0


def test_without_the_guard_the_skip_writer_overwrites(server_db, baseline_plan):
    result = run_variant(server_db.url, "none", baseline_plan)
    _accounted(result)
    assert result.races == baseline_plan.races
    assert result.overwritten > 0 and result.overwrites["running"] > 0 and result.kills > 0
    assert result.refused == 0


@pytest.mark.parametrize("mode", ["raise", "ignore"])
def test_with_the_guard_nothing_is_overwritten(server_db, race_plan, mode):
    result = run_variant(server_db.url, mode, race_plan)
    _accounted(result)
    assert result.races == race_plan.races
    assert result.overwritten == 0 and result.kills == 0
    # The skips that the policy allows still went through: the guard refuses only what it must.
    assert result.skipped_unprotected > 0
    if mode == "raise":
        assert result.refused > 0 and result.counts["worker refused"] == 0
    else:
        assert result.unchanged > 0 and result.refused == 0
