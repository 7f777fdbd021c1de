"""Rules switched on or off at install: ti_guard_settings records them (`rules`), the guard is rendered for them.

0001's guard had every rule: upgrading from it records every rule; downgrading to it renders every
rule again and forgets the choice, keeping the mode, the protect list and the record of refusals.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06
"""

from dataclasses import replace

from alembic import context, op

from ti_guard import installation
from ti_guard.migration_env import destination, version_column_as_text
from ti_guard.policy import RULE_NAMES

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _policies():
    """(the policy asked for, the same with every rule: what 0001 renders)."""
    policy = op.get_context().opts["ti_guard_policy"]
    return policy, replace(policy, switched_on=RULE_NAMES)


def upgrade() -> None:
    policy, every = _policies()
    version_column_as_text(op, policy)  # before Alembic's first UPDATE stamp (this revision's)
    if op.get_context().as_sql:
        # From base, 0001 has just printed this release's whole guard, rules column included.
        if context.get_starting_revision_argument() not in (None, "base"):
            installation.add_rules_column(op, policy)
            installation.switch_offline(op, every, policy)
        return
    installation.add_rules_column(op, policy)
    installation.install(op, policy)


def downgrade() -> None:
    policy, every = _policies()
    if destination() is None:
        return  # to base: 0001's downgrade removes the whole guard, the column with its table
    if op.get_context().as_sql:
        installation.switch_offline(op, policy, every)
    else:
        installation.install(op, every)
    installation.drop_rules_column(op, policy)
