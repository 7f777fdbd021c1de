"""What sits on task_instance while a workload runs: nothing, the guard, its floor, a naive trigger.

The guard's SQL comes from the real renderer. The floor is derived from that same SQL with the
body emptied (same timing, same event, same `UPDATE OF` columns, same WHEN), so it is the cost of
the trigger mechanism itself and follows any change made to the renderer. The naive trigger is
what most people write first: one row trigger with no column list and no WHEN, testing every
row in its body.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ti_guard import record
from ti_guard.airflow_shape import AIRFLOW_3_COLUMNS
from ti_guard.db import run_sql
from ti_guard.policy import Policy
from ti_guard.render import GuardObject, Quoter, render

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql, sqlite

NONE = "none"
CONTROL = "none again"  # a second no-trigger run: how far two identical setups drift (the noise)


@dataclass
class Variant:
    key: str
    create: list[str] = field(default_factory=list)
    drop: list[str] = field(default_factory=list)
    floor: str | None = None  # key of the floor this variant is judged against
    timing: str = "BEFORE"

    def install(self, engine: sa.Engine) -> None:
        with engine.begin() as conn:
            for sql in self.create:
                run_sql(conn, sql)

    def remove(self, engine: sa.Engine) -> None:
        with engine.begin() as conn:
            for sql in self.drop:
                run_sql(conn, sql)


def _timing(objects: list[GuardObject]) -> str:
    return "AFTER" if any(o.kind == "trigger" and " AFTER UPDATE" in o.create for o in objects) else "BEFORE"


def _swap_timing(objects: list[GuardObject]) -> list[GuardObject]:
    """The same guard with BEFORE and AFTER exchanged (PostgreSQL raise mode only)."""
    swap = {"BEFORE UPDATE": "AFTER UPDATE", "AFTER UPDATE": "BEFORE UPDATE"}
    out = []
    for o in objects:
        if o.kind == "trigger":
            o = GuardObject(o.kind, o.name, re.sub("BEFORE UPDATE|AFTER UPDATE", lambda m: swap[m.group(0)], o.create), o.drop, o.definition)
        out.append(o)
    return out


def _renamed(text: str, names: dict[str, str]) -> str:
    for old, new in names.items():
        text = text.replace(old, new)
    return text


def _empty_bodies(dialect: str, objects: list[GuardObject], suffix: str) -> tuple[list[str], list[str]]:
    """The guard's own CREATE statements with nothing left in the bodies."""
    names = {o.name: f"ti_bench_floor_{suffix}_{i}" for i, o in enumerate(objects)}
    create, drop = [], []
    for o in objects:
        text = _renamed(o.create, names)
        if o.kind == "function":
            text = re.sub(r"\$ti_guard\$.*\$ti_guard\$", "$ti_guard$ BEGIN RETURN NEW; END $ti_guard$", text, flags=re.S)
        elif dialect == "sqlite":
            text = re.sub(r"\nBEGIN\n.*", "\nBEGIN SELECT 1; END", text, flags=re.S)
        elif dialect == "mysql":
            text = re.sub(r"FOR EACH ROW\n.*", "FOR EACH ROW BEGIN END", text, flags=re.S)
        create.append(text)
        drop.insert(0, _renamed(o.drop, names))
    return create, drop


def _naive(dialect: str, q: Quoter, protect: tuple[str, ...]) -> tuple[list[str], list[str]]:
    states = q.in_list(protect)
    same = "IS NOT DISTINCT FROM" if dialect == "postgresql" else "<=>" if dialect == "mysql" else "IS"
    differs = "IS DISTINCT FROM" if dialect == "postgresql" else None
    self_finish = (
        f"OLD.state = 'running' AND NEW.end_date IS NOT NULL AND NEW.start_date {same} OLD.start_date"
        + (f" AND NEW.end_date {differs} NEW.start_date" if differs else f" AND NOT (NEW.end_date {same} NEW.start_date)")
    )
    test = f"NEW.state = 'skipped' AND OLD.state IN ({states}) AND NOT ({self_finish})"
    name = q.ident("ti_bench_naive")
    if dialect == "postgresql":
        fn = q.ident("ti_bench_naive_fn")
        return (
            [
                f"CREATE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $b$\nBEGIN\n    IF {test} THEN\n"
                "        RAISE EXCEPTION 'refused' USING ERRCODE = 'check_violation';\n    END IF;\n    RETURN NEW;\nEND\n$b$",
                f"CREATE TRIGGER {name} BEFORE UPDATE ON {q.table} FOR EACH ROW EXECUTE FUNCTION {fn}()",
            ],
            [f"DROP TRIGGER IF EXISTS {name} ON {q.table}", f"DROP FUNCTION IF EXISTS {fn}()"],
        )
    if dialect == "mysql":
        return (
            [
                f"CREATE TRIGGER {name} BEFORE UPDATE ON {q.table} FOR EACH ROW\nBEGIN\n    IF {test} THEN\n"
                "        SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'refused';\n    END IF;\nEND"
            ],
            [f"DROP TRIGGER IF EXISTS {name}"],
        )
    return (
        [f"CREATE TRIGGER {name} BEFORE UPDATE ON {q.table} FOR EACH ROW\nBEGIN\n    SELECT RAISE(ABORT, 'refused') WHERE {test};\nEND"],
        [f"DROP TRIGGER IF EXISTS {name}"],
    )


_DIALECTS = {"postgresql": postgresql.dialect, "mysql": mysql.dialect, "sqlite": sqlite.dialect}


def variants(dialect: str, alternative_timing: bool = True) -> list[Variant]:
    """Every variant for one backend; each guard names the floor of its own mechanism."""
    policy = Policy.build()
    out = [Variant(NONE), Variant(CONTROL)]
    floors: dict[str, Variant] = {}

    def floor_for(objects: list[GuardObject]) -> str:
        timing = _timing(objects)
        if timing not in floors:
            create, drop = _empty_bodies(dialect, objects, timing.lower())
            floors[timing] = Variant(f"floor {timing}", create, drop, timing=timing)
        return floors[timing].key

    guards = []
    for mode in ("raise", "ignore", "audit"):
        objects = render(dialect, Policy.build(mode=mode), AIRFLOW_3_COLUMNS)
        guards.append((f"guard {mode}", objects))
        if dialect == "postgresql" and mode == "raise" and alternative_timing:
            # Refusing by raising works from either timing; measure the one not shipped too.
            other = _swap_timing(objects)
            guards.append((f"guard raise {_timing(other)}", other))
    # The record the guard writes its refusals to (record.py), made with each guard variant: on
    # SQLite a trigger whose tables are missing fails the statements that fire it.
    made = record.create_statements(_DIALECTS[dialect](), policy)
    dropped = record.drop_statements(_DIALECTS[dialect](), policy)
    for key, objects in guards:
        out.append(Variant(key, made + [o.create for o in objects], [o.drop for o in reversed(objects)] + dropped, floor_for(objects), _timing(objects)))
    out += list(floors.values())
    create, drop = _naive(dialect, Quoter(_DIALECTS[dialect](), policy), policy.protect)
    out.append(Variant("naive", create, drop))
    return out
