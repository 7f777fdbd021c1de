"""How big the race is: CI size by default, more through the environment.

TI_GUARD_RACES: races per guarded variant (default 10000, the CI size);
TI_GUARD_BASELINE_RACES: races without the guard (default 2000: it only has to show overwrites).
"""

from __future__ import annotations

import os

import pytest

from .workload import Plan


@pytest.fixture(scope="session")
def race_plan() -> Plan:
    return Plan(races=int(os.environ.get("TI_GUARD_RACES", "10000")))


@pytest.fixture(scope="session")
def baseline_plan(race_plan) -> Plan:
    return Plan(**{**race_plan.__dict__, "races": int(os.environ.get("TI_GUARD_BASELINE_RACES", "2000"))})
