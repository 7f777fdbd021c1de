"""Bad input: a task_instance without a column that a rule to be installed reads (render.missing_columns,
from policy.SIGNATURE_NEEDS: next_method for set_state_skip where the backend tells it by that column,
try_number for stale_schedule). Install, by the CLI and by `alembic upgrade`, says so in one line naming
the column, the rule and the Airflow release that has it, exits non-zero and makes nothing; the rows,
and a guard already in place, stay as they were. Switching the rule off drops the requirement.
(A column dropped under an installed guard: tests/test_dropped_column.py.)
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from conftest import one_line_error, racy_skip_of_a_finished_row
from test_install import alembic, objects, tables
from ti_guard import catalog
from ti_guard.policy import RULE_NAMES, Policy
from ti_guard.render import missing_columns

# (column, the rule that reads it, what install names as the release that has it)
READS = {"try_number": ("stale_schedule", "every Airflow release has it"), "next_method": ("set_state_skip", "Airflow 2.2.0 and later have it")}


def _table_without(db, column: str) -> sa.Table:
    db.table()
    db.sql(f"ALTER TABLE task_instance DROP COLUMN {column}")
    table = sa.Table("task_instance", sa.MetaData(), autoload_with=db.engine)
    with db.engine.begin() as conn:
        conn.execute(table.insert().values(**{k: v for k, v in dict(id="0" * 32, dag_id="d", task_id="t", run_id="r", state="success", try_number=1).items() if k in table.c}))
    return table


def _state(db):
    """Everything install could touch: our objects and tables, the settings, the version, Airflow's rows."""
    with db.engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT dag_id, task_id, run_id, state FROM task_instance ORDER BY task_id").all()
        version = catalog.revision(conn, "ti_guard_alembic_version", None)
        return objects(db), tables(db), catalog.read_settings(conn, Policy()), version, rows


def _without(rule: str) -> str:
    return ",".join(n for n in RULE_NAMES if n != rule)


@pytest.mark.parametrize("column", sorted(READS))
@pytest.mark.parametrize("route", ["cli", "alembic"])
def test_install_refuses_a_table_without_a_rule_column(db, capsys, column, route):
    table = _table_without(db, column)
    rule, since = READS[column]
    needed = [r.name for _, r in missing_columns(db.backend, Policy(), [c.name for c in table.c])]
    before = _state(db)
    assert before[:4] == ({}, set(), None, None)
    line = f"no column {column}, which rule {rule} reads ({since})"
    if route == "cli":
        code = db.cli("install")
        if needed:
            assert code == 2
            one_line_error(capsys, line, f"--rules {_without(rule)}")
    else:
        result = alembic(db, "upgrade", "head", check=False)
        code = result.returncode
        if needed:
            printed = result.stdout + result.stderr
            assert code != 0 and [x for x in printed.splitlines() if line in x], printed
    if not needed:
        # A backend that tells this rule by something else does not read the column: install goes on.
        assert rule == "set_state_skip" and db.backend != "postgresql" and code == 0
        return
    assert _state(db) == before  # nothing made, the rows as they were
    # Without the guard the racy skip overwrites the finished row; with the rule switched off the
    # same install goes through and the guard keeps it.
    assert racy_skip_of_a_finished_row(db.engine, table) == (None, "skipped")
    if route == "cli":
        assert db.cli("install", "--rules", _without(rule)) == 0
    else:
        alembic(db, "-x", f"rules=all,-{rule}", "upgrade", "head")
    assert db.cli("status") == 0
    assert racy_skip_of_a_finished_row(db.engine, table) == (None, "success")


def test_reinstall_with_the_rule_on_leaves_the_guard_in_place(db, capsys):
    """The guard was installed without stale_schedule on a table without try_number: switching it on
    is refused in one line, the guard in place and its settings unchanged, still guarding."""
    table = _table_without(db, "try_number")
    assert db.cli("install", "--mode=raise", "--rules", _without("stale_schedule")) == 0
    before = _state(db)
    capsys.readouterr()
    assert db.cli("install", "--rules=all") == 2
    one_line_error(capsys, "no column try_number, which rule stale_schedule reads")
    assert _state(db) == before
    error, state = racy_skip_of_a_finished_row(db.engine, table)
    assert "ti_guard: refused" in error and state == "success"


def test_doctor_names_the_missing_column_in_one_finding(db, capsys):
    _table_without(db, "try_number")
    capsys.readouterr()
    assert db.cli("doctor") == 2
    out = capsys.readouterr().out
    found = [x for x in out.splitlines() if "no column try_number" in x]
    assert len(found) == 1 and "[FAIL] table: install would refuse" in found[0] and "stale_schedule" in found[0], out
    assert db.cli("doctor", "--rules", _without("stale_schedule")) in (0, 1)  # ready (perhaps with warnings)
    assert "no column try_number" not in capsys.readouterr().out
    assert objects(db) == {} and tables(db) == set()
