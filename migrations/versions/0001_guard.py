"""Install the guard: BEFORE UPDATE triggers on task_instance that refuse a skip of a started or finished task.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from alembic import op

from ti_guard import installation

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    installation.install(op, op.get_context().opts["ti_guard_policy"])


def downgrade() -> None:
    installation.uninstall(op, op.get_context().opts["ti_guard_policy"])
