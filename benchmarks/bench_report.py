"""Ratios to the baseline measured in the same round, as Markdown, and the bench block of docs/performance.md.

Every ratio is taken round by round (a variant against the baseline run in that same round),
then summarised as median (min-max) over the rounds, so drift of the machine between rounds
does not show up as a cost.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from bench_variants import CONTROL, NONE
from bench_workloads import BULK, WORKLOADS

from ti_guard import docblock

NAMES = {"postgresql": "PostgreSQL", "mysql": "MariaDB", "mysql9": "MySQL 9.7", "sqlite": "SQLite"}
MECHANISM_TARGET = 1.05
MYSQL_HEARTBEAT_TARGET = 1.05
INSTALL_GROWTH_TARGET = 1.5
INSTALL_SECONDS_TARGET = 1.0


def ratios(timings: dict, a: str, b: str, workload: str) -> list[float]:
    return [x / y for x, y in zip(timings[a][workload], timings[b][workload])]


def summary(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def fmt(values: list[float]) -> str:
    med, lo, hi = summary(values)
    return f"{med:.2f}x ({lo:.2f}-{hi:.2f})"


def _baseline_cell(result: dict, workload: str) -> str:
    med = statistics.median(result["timings"][NONE][workload])
    if workload == "heartbeats":
        ops = result["heartbeat_ops"]
        return f"{ops / med:,.0f} commits/s"
    if result.get("metric", {}).get(workload) == "CPU":
        wall = statistics.median(result["wall"][NONE][workload])
        return f"{med * 1000:,.0f} ms CPU, {wall * 1000:,.0f} ms wall"
    return f"{med * 1000:,.0f} ms"


def backend_table(backend: str, result: dict) -> list[str]:
    keys = [k for k in result["order"] if k != NONE]
    lines = [
        f"**{NAMES[backend]}** ({result['server']}), {result['rows']:,} rows, {result['rounds']} rounds, "
        f"finished {result.get('measured', '?')} by `{result.get('command', '?').strip()}`. "
        "Time relative to no trigger in the same round, median (min-max); lower is better.",
        "",
        "| workload | no trigger (absolute) | " + " | ".join(keys) + " |",
        "|---|---|" + "---|" * len(keys),
    ]
    metric = result.get("metric", {})
    for w in WORKLOADS:
        cells = [fmt(ratios(result["timings"], k, NONE, w)) for k in keys]
        label = f"{w} ({'server CPU time' if metric.get(w) == 'CPU' else 'wall time'})"
        lines.append(f"| {label} | {_baseline_cell(result, w)} | " + " | ".join(cells) + " |")
    return lines


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _noise(timings: dict, workload: str) -> float:
    """How far the no-trigger A/A control strayed from no trigger in this workload (1.10 = 10%)."""
    aa = ratios(timings, CONTROL, NONE, workload)
    return max(max(aa), 1 / min(aa))


def _verdict(timings: dict, medians: dict[str, float], limit: float) -> str:
    """met, missed, or unsettled when every miss is smaller than what two identical runs differ by."""
    misses = {w: m for w, m in medians.items() if m > limit}
    if not misses:
        return _met(True)
    if all(m <= limit * _noise(timings, w) for w, m in misses.items()):
        return "not settled by time: inside the A/A noise (see the counts below)"
    return _met(False)


def _against(result: dict, a: str, b: str, workloads) -> tuple[str, dict[str, float]]:
    parts, medians = [], {}
    for w in workloads:
        medians[w] = summary(ratios(result["timings"], a, b, w))[0]
        parts.append(f"{w} {fmt(ratios(result['timings'], a, b, w))}")
    return "; ".join(parts), medians


def target_rows(backend: str, result: dict) -> list[str]:
    name, t = NAMES[backend], result["timings"]
    rows = []
    guards = [k for k in result["order"] if k.startswith("guard")]
    for g in guards:
        floor = result["floors"][g]
        text, medians = _against(result, g, floor, WORKLOADS)
        rows.append(f"| {name} | {g} within {MECHANISM_TARGET}x of {floor} | {text} | {_verdict(t, medians, MECHANISM_TARGET)} |")
    for g in guards:
        text, medians = _against(result, g, "naive", BULK)
        rows.append(f"| {name} | {g} ahead of naive on bulk writes | {text} | {_verdict(t, medians, 1.0)} |")
    if backend == "postgresql":
        for g in guards:
            text, _ = _against(result, g, NONE, WORKLOADS)
            rows.append(f"| {name} | {g} vs no trigger (reported) | {text} | - |")
        alt = [g for g in guards if g.startswith("guard raise ")]
        if alt:
            text, _ = _against(result, alt[0], "guard raise", WORKLOADS)
            rows.append(f"| {name} | {alt[0]} vs guard raise as shipped ({result['timing']['guard raise']}) | {text} | - |")
    if backend in ("mysql", "mysql9"):
        for g in guards:
            medians = {"heartbeats": summary(ratios(t, g, NONE, "heartbeats"))[0]}
            rows.append(
                f"| {name} | {g} heartbeats within 5% of no trigger | {fmt(ratios(t, g, NONE, 'heartbeats'))} | "
                f"{_verdict(t, medians, MYSQL_HEARTBEAT_TARGET)} |"
            )
    if backend == "sqlite":
        for w in ("heartbeats", "bulk non-state"):
            noise = _noise(t, w)
            for g in guards:
                med = summary(ratios(t, g, NONE, w))[0]
                rows.append(
                    f"| {name} | {g}, {w}, within noise of no trigger (noise: the no-trigger A/A control strays up to "
                    f"{noise:.2f}x) | {fmt(ratios(t, g, NONE, w))} | {_met(med <= noise)} |"
                )
    rows += install_rows(name, result["install"])
    return rows


def install_rows(name: str, install: dict) -> list[str]:
    if not install:
        return []
    sizes = sorted(install, key=int)
    quiet = {s: install[s]["quiet_s"] for s in sizes}
    rows = []
    for s in sizes:
        med, lo, hi = summary(quiet[s])
        rows.append(
            f"| {name} | install at {int(s):,} rows, nothing else writing, under {INSTALL_SECONDS_TARGET:g} s | "
            f"{med:.2f} s ({lo:.2f}-{hi:.2f}) | {_met(med < INSTALL_SECONDS_TARGET)} |"
        )
        runs = install[s]["contended"]
        ok = [r for r in runs if not r["error"]]
        failed = [r["error"] for r in runs if r["error"]]
        text = f"{len(ok)}/{len(runs)} installs succeeded"
        if ok:
            before = statistics.median(r["writer_max_before_s"] for r in ok) * 1000
            during = statistics.median(r["writer_max_during_s"] for r in ok) * 1000
            text += (
                f" in {statistics.median(r['install_s'] for r in ok):.2f} s (median); the writer's slowest commit "
                f"{during:.0f} ms during the install vs {before:.0f} ms in the second before (medians of rounds)"
            )
        if failed:
            text += f"; failed: {failed[0]}"
        rows.append(f"| {name} | install at {int(s):,} rows while a writer commits heartbeats (reported) | {text} | - |")
    if len(sizes) > 1:
        growth = [a / b for a, b in zip(quiet[sizes[-1]], quiet[sizes[0]])]
        rows.append(
            f"| {name} | install at {int(sizes[-1]):,} rows within {INSTALL_GROWTH_TARGET}x of {int(sizes[0]):,} rows | "
            f"{fmt(growth)} | {_met(summary(growth)[0] <= INSTALL_GROWTH_TARGET)} |"
        )
    return rows


def markdown(data: dict) -> str:
    meta = data["meta"]
    out = [
        f"Measured {meta['date']} on {meta['machine']}; {meta['versions']}.",
        f"Heartbeats: {meta['heartbeat']}. Bulk statements run in a transaction "
        "that is rolled back (untimed), so every variant meets the same rows.",
        "",
    ]
    for backend, result in data["backends"].items():
        out += backend_table(backend, result) + [""]
    out += ["| backend | target | measured: median (min-max) of per-round ratios | verdict |", "|---|---|---|---|"]
    for backend, result in data["backends"].items():
        out += target_rows(backend, result)
    return "\n".join(out) + "\n"


PAGE = docblock.DOCS / "performance.md"


def update_docs(latest: Path, notes: Path) -> None:
    docblock.rewrite(PAGE, "bench", latest.read_text() + ("\n" + notes.read_text() if notes.exists() else ""))
