"""Alembic environment for ti-guard: thin on purpose, the logic is in ti_guard.migration_env."""

from ti_guard.migration_env import run

run()
