"""`ti-guard report`: what the guard refused, read from its record (record.py), as text, JSON or
Prometheus's text format (for node_exporter's textfile collector).

Counts come from the daily counts table, which is exact and kept for good; the top DAGs and
tasks and the latest refusals come from the ring of details, which holds the last
RECORD_ROWS refusals, so the report says how far back the details reach.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import asdict, dataclass, field

import sqlalchemy as sa

from . import record
from .errors import GuardError
from .policy import RECORD_ROWS, RULE_NAMES, Policy
from .render import dialect_name

_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
COUNT_KEY = ("rule", "action", "old_state", "new_state")
LATEST = 10
TOP = 10


def parse_since(text: str) -> dt.timedelta:
    match = re.fullmatch(r"\s*(\d+)\s*([smhdw])\s*", text or "")
    if not match or int(match.group(1)) == 0:
        raise GuardError(f"invalid --since {text!r}: give a positive number and a unit, e.g. 30m, 24h, 7d, 2w")
    return dt.timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


@dataclass
class Refusals:
    since: str
    until: str
    status: str
    code: int  # the guard's status code, which report exits with
    mode: str | None  # None: no guard installed
    by_day: list[dict] = field(default_factory=list)
    totals: list[dict] = field(default_factory=list)
    top_dags: list[dict] = field(default_factory=list)
    top_tasks: list[dict] = field(default_factory=list)
    latest: list[dict] = field(default_factory=list)
    details_held: int = 0
    details_capacity: int = RECORD_ROWS
    details_from: str | None = None
    policy: Policy | None = field(default=None, repr=False)  # the guard's, for the JSON envelope; not itself shown


def gather(conn: sa.Connection, policy: Policy, since: dt.timedelta, status) -> Refusals:
    """Read the record; `status` is the guard's status.Report (its code is the report's exit code)."""
    until = _utcnow(conn)
    start = until - since
    out = Refusals(
        since=iso(start), until=iso(until), status=status.word, code=status.code,
        mode=status.policy.mode if status.policy else None, policy=status.policy,
    )
    if any(f.missing for f in record.check(conn, policy) if f.table is not None):
        return out
    details, counts = record.tables(policy)
    n = sa.func.sum(counts.c.refusals).label("refusals")
    key = [counts.c[k] for k in COUNT_KEY]
    rows = conn.execute(sa.select(counts.c.day, *key, n).where(counts.c.day >= start.date()).group_by(counts.c.day, *key).order_by(counts.c.day, *key))
    out.by_day = [{"day": iso(r.day), **{k: r._mapping[k] for k in COUNT_KEY}, "refusals": int(r.refusals)} for r in rows]
    rows = conn.execute(sa.select(*key, n).group_by(*key).order_by(*key))
    out.totals = [{**{k: r._mapping[k] for k in COUNT_KEY}, "refusals": int(r.refusals)} for r in rows]

    held = details.c.seq.is_not(None)
    out.details_held = conn.execute(sa.select(sa.func.count()).where(held)).scalar()
    out.details_from = iso(conn.execute(sa.select(sa.func.min(details.c.refused_at)).where(held)).scalar())
    recent = sa.and_(held, details.c.refused_at >= start)
    hits = sa.func.count().label("refusals")
    for name, columns in (("top_dags", [details.c.dag_id]), ("top_tasks", [details.c.dag_id, details.c.task_id])):
        rows = conn.execute(sa.select(*columns, hits).where(recent).group_by(*columns).order_by(hits.desc(), *columns).limit(TOP))
        setattr(out, name, [dict(r._mapping) for r in rows])
    shown = [c for c in details.c if c.name not in ("slot", "seq")]
    rows = conn.execute(sa.select(*shown).where(recent).order_by(details.c.seq.desc()).limit(LATEST))
    out.latest = [{k: iso(v) for k, v in r._mapping.items()} for r in rows]
    return out


def _utcnow(conn) -> dt.datetime:
    # The server's clock, not this machine's: the record was stamped by the server.
    now = {
        "postgresql": "SELECT statement_timestamp() AT TIME ZONE 'UTC'",
        "mysql": "SELECT UTC_TIMESTAMP(6)",
        "sqlite": "SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')",
    }[dialect_name(conn.dialect.name)]
    value = conn.exec_driver_sql(now).scalar()
    return dt.datetime.fromisoformat(value) if isinstance(value, str) else value


def iso(value):
    """ISO 8601: a datetime with its UTC offset (the record and the server clock are UTC), a date as is."""
    if isinstance(value, dt.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)).isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    return value


def as_dict(report: Refusals) -> dict:
    """The report's own keys of `report --format json` (the CLI puts the common ones first)."""
    out = asdict(report)
    for key in ("policy", "status", "code", "mode"):  # in the envelope
        out.pop(key)
    return out


def as_prometheus(report: Refusals) -> str:
    """Prometheus text exposition format; counters are totals since the guard was installed."""
    lines = [
        "# HELP ti_guard_refusals_total Writes to task_instance the guard kept as they were (action keep) or, in audit mode, "
        "would have refused (action audit), since it was installed.",
        "# TYPE ti_guard_refusals_total counter",
    ]
    lines += [f"ti_guard_refusals_total{_labels({k: t[k] for k in COUNT_KEY})} {t['refusals']}" for t in report.totals]
    lines += [
        "# HELP ti_guard_status The guard's state as ti-guard status exits: 0 installed/current, 1 outdated, 2 missing, 3 unknown.",
        "# TYPE ti_guard_status gauge",
        f"ti_guard_status {report.code}",
        "# HELP ti_guard_mode The mode the guard runs in (1 for the current one).",
        "# TYPE ti_guard_mode gauge",
        *[f"ti_guard_mode{_labels({'mode': m})} {int(m == report.mode)}" for m in ("ignore", "raise", "audit")],
        "# HELP ti_guard_rule The rules switched on at install (1) or off (0).",
        "# TYPE ti_guard_rule gauge",
        *[f"ti_guard_rule{_labels({'rule': r})} {int(bool(report.policy) and r in report.policy.switched_on)}" for r in RULE_NAMES],
        "# HELP ti_guard_record_details Refusal details the record holds (it keeps the latest ones up to its capacity).",
        "# TYPE ti_guard_record_details gauge",
        f"ti_guard_record_details {report.details_held}",
        "# HELP ti_guard_record_capacity Refusal details the record can hold.",
        "# TYPE ti_guard_record_capacity gauge",
        f"ti_guard_record_capacity {report.details_capacity}",
    ]
    return "\n".join(lines) + "\n"


def _labels(values: dict) -> str:
    def escape(v):
        return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in values.items()) + "}"


def as_text(report: Refusals, url: str) -> str:
    policy = f", {report.policy.describe()}" if report.mode else ""
    lines = [f"ti-guard report on {url}: {report.since} to {report.until}; guard {report.status}{policy}"]
    lines.append("")
    lines.append("Refusals by day, rule and old state (exact; action keep: the row was left as it was; audit: let through, would have been kept):")
    lines += _table(report.by_day, ("day", *COUNT_KEY, "refusals")) or ["  none"]
    reach = f"the {report.details_held} latest refusal(s) held since {report.details_from}" if report.details_held else "no refusal held"
    lines.append("")
    lines.append(f"Top DAGs and tasks in that time (from the details: {reach}; the record keeps the latest {report.details_capacity}):")
    lines += _table(report.top_dags, ("dag_id", "refusals")) or ["  none"]
    lines += _table(report.top_tasks, ("dag_id", "task_id", "refusals")) if report.top_tasks else []
    lines.append("")
    lines.append(f"Latest refusals (up to {LATEST}):")
    latest = [
        {**r, "writer": " ".join(str(r[k]) for k in ("writer_user", "writer_address", "writer_application") if r[k]) + (f" pid {r['writer_pid']}" if r["writer_pid"] else "")}
        for r in report.latest
    ]
    lines += _table(latest, ("refused_at", "rule", "action", "old_state", "new_state", "dag_id", "task_id", "run_id", "map_index", "writer")) or ["  none"]
    return "\n".join(lines)


def _table(rows: list[dict], columns) -> list[str]:
    if not rows:
        return []
    cells = [[str(c) for c in columns]] + [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return ["  " + "  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
