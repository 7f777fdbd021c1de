"""The production benchmark: two schedulers, two Celery workers, sustained load, the guard's variants
side by side on one live deployment (tests/deploy/production.py does the work). Not a test.

    .venv/bin/python benchmarks/production.py --matrix 3.3.2-postgresql,3.1.8-postgresql
    .venv/bin/python benchmarks/production.py --matrix 3.3.2-mysql9 --seconds 180 --variants none,ignore,none,ignore,raise,audit
    .venv/bin/python benchmarks/production.py --matrix 3.3.2-postgresql --load ordinary --variants none,ignore,none,ignore
    .venv/bin/python benchmarks/production.py --render      # rewrite docs/production.md's block from the results

Each deployment's result is stored in benchmarks/results/production.json under "<version>-<backend>",
or "<version>-<backend>-ordinary" with --load ordinary (a later run of the same key replaces it);
--render writes the block between the production markers of docs/production.md from that file.
Airflow runs under the machine-wide lock of the suites (/tmp/ti-guard-airflow.lock), so two Airflow
deployments never share the 2 cores of a CI machine.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))

import conftest  # noqa: E402  (the servers' admin URLs, as every suite uses them)
from deploy import production  # noqa: E402

RESULTS = HERE / "results" / "production.json"
PAGE = REPO / "docs" / "production.md"
BLOCK = re.compile(r"(<!-- production:begin[^>]*-->\n).*?(<!-- production:end -->)", re.S)
LOCK = Path("/tmp/ti-guard-airflow.lock")
DEFAULT_VARIANTS = "none,ignore,none,ignore,raise,audit"
BACKEND_NAMES = {"postgresql": "PostgreSQL", "mysql": "MariaDB", "mysql9": "MySQL"}
STATES = ("skipped", "scheduled", "failed")


def log(message: str) -> None:
    print(time.strftime("%H:%M:%S ") + message, file=sys.stderr, flush=True)


def airflow_lock():
    """The machine-wide lock every Airflow run takes (held until the process exits)."""
    handle = open(LOCK, "w")
    log(f"waiting for {LOCK}")
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def machine() -> str:
    cpus = os.cpu_count()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.machine()}, {cpus} cores, {memory:.0f} GiB, Python {platform.python_version()}"


# == rendering ========================================================================================

def pooled(variants, name):
    return [v for v in variants if v["variant"] == name]


def ratio(a, b) -> str:
    return f"{a / b:.2f}" if a and b else "n/a"


def _cpu(kind):
    return lambda v: (v.get("cpu") or {}).get("ms_per_ti", {}).get(kind)


# What each ratio in the pooled line compares, and how a variant's value is read.
COSTS = {
    "throughput": lambda v: v["throughput"]["per_minute"],
    "ordinary DAGs only": lambda v: v["throughput"].get("ordinary_per_minute"),
    "delay p95": lambda v: v["delay"].get("p95"),
    "database CPU per TI": _cpu("database"),
    "Airflow CPU per TI": _cpu("airflow"),
}


def pooled_cost(variants, load: str) -> str:
    """Each variant's mean against none's mean, for every cost measured, beside none's own spread."""
    def mean(runs, pick):
        values = [pick(v) for v in runs if pick(v) is not None]
        return sum(values) / len(values) if values else None

    def spread(runs, pick):
        values = [pick(v) for v in runs if pick(v) is not None]
        return f"{min(values) / max(values):.2f}" if len(values) > 1 else None

    nones = pooled(variants, "none")
    measured = {name: pick for name, pick in COSTS.items()
                if mean(nones, pick) and not (load == "ordinary" and name == "ordinary DAGs only")}  # the same DAGs
    parts = [f"{name}: " + ", ".join(f"{ratio(mean(pooled(variants, v), pick), mean(nones, pick))}" for v in dict.fromkeys(
                 x["variant"] for x in variants) if v != "none") for name, pick in measured.items()]
    order = ", ".join(v for v in dict.fromkeys(x["variant"] for x in variants) if v != "none")
    spreads = [f"{name} {spread(nones, pick)}" for name, pick in measured.items() if spread(nones, pick)]
    noise = f"none against none (lower / higher): {', '.join(spreads)}" if spreads else "one none variant: no spread measured"
    return f"Pooled, each variant's mean against none's mean ({order}): {'; '.join(parts)}. {noise}."


def render_deployment(res: dict) -> list[str]:
    variants = res.get("variants", [])
    names = list(dict.fromkeys(v["variant"] for v in variants))
    guarded = [n for n in names if n != "none"]
    server = res.get("server", "").split(" ", 1)[-1]  # deployment.server_version(): "<backend id> <version>"
    head = (f"#### Airflow {res['version']}, {BACKEND_NAMES.get(res['backend'], res['backend'])} {server}: "
            f"{res['profile']['schedulers']} schedulers, {res['profile']['workers']} Celery workers x {res['profile']['worker_concurrency']}, "
            f"{res['seconds_per_variant']:.0f} s of load per variant ({', '.join(v['variant'] for v in variants)})"
            + ("; ordinary DAGs only, no race DAG: the guard keeps nothing, so the variants differ by the triggers' cost alone"
               if res.get("load") == "ordinary" else ""))
    lines = [head, ""]
    if res.get("error"):
        lines += [f"**The run did not complete:** {res['error']}", ""]
    if not variants:
        return lines
    # Kills: the seed's table, by current_state and by the route that did it.
    routes = sorted({(k["current_state"], k["route"], k["writer"]) for v in variants for k in v["kills"]})
    lines += ["Tasks killed per hour (a worker's attempt told to stop from outside), by the state it was set to and the write that set it:", "",
              "| current_state | route (writer) | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    if not routes:
        lines.append("| (none) | | " + " | ".join("0" for _ in names) + " |")
    for state, route, writer in routes:
        cells = []
        for name in names:
            runs = pooled(variants, name)
            hours = sum(v["window_seconds"] + v.get("drain_seconds", 0) for v in runs) / 3600
            n = sum(1 for v in runs for k in v["kills"] if (k["current_state"], k["route"], k["writer"]) == (state, route, writer))
            cells.append(f"{n / hours:.0f} ({n})" if hours else "n/a")
        lines.append(f"| {state} | {route} ({writer}) | " + " | ".join(cells) + " |")
    lines += ["", "Cost to the scheduler, each variant beside the `none` before it (throughput: task instances finished per minute "
              "while the load ran; delay: a fan-out or chain task's start minus its last upstream's end):", "",
              "| # | variant | TIs/min | vs none | delay p50 (s) | delay p95 (s) | p95 vs none | CPU ms per TI: database, Airflow | components exited | deadlock / lock-wait lines | guard's record |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    last_none = None
    for v in variants:
        tput, delay = v["throughput"]["per_minute"], v["delay"]
        if last_none is None:
            vs = p95 = "baseline"
        else:
            base = last_none["throughput"]["per_minute"]
            vs = ratio(tput, base) + (" (none vs none)" if v["variant"] == "none" else "")
            p95 = ratio(delay.get("p95"), last_none["delay"].get("p95"))
        errors = sum(c["count"] for kind in v["log_errors"].values() for c in kind.values())
        recorded = ", ".join(f"{k} {n}" for k, n in sorted(v["recorded"].items())) or "-"
        cpu = (v.get("cpu") or {}).get("ms_per_ti")
        cpu = f"{cpu['database']}, {cpu['airflow']}" if cpu else "not measured"
        lines.append(f"| {v['index']} | {v['variant']} | {tput} | {vs} | {delay.get('p50', 'n/a')} | {delay.get('p95', 'n/a')} | {p95} | "
                     f"{cpu} | {', '.join(v['exited']) or 'none'} | {errors} | {recorded} |")
        if v["variant"] == "none":
            last_none = v
    lines += ["", pooled_cost(variants, res.get("load", "full"))]
    # Outcomes that differ from none's.
    diffs = []
    nones = pooled(variants, "none")
    for name in guarded:
        for v in pooled(variants, name):
            for dag_id, states in sorted(v["outcomes"]["runs"].items()):
                none_states = Counter()
                for n in nones:
                    none_states.update(n["outcomes"]["runs"].get(dag_id, {}))
                if set(states) != set(none_states):
                    diffs.append(f"{name} #{v['index']}: `{dag_id}` runs {dict(states)} (none: {dict(none_states)})")
    lines += ["", "Run outcomes that differ from `none` (state sets per DAG): " + ("; ".join(diffs) if diffs else "none differ."), ""]
    return lines


def render(results: dict) -> str:
    lines = []
    for key in sorted(results, key=lambda k: (k.split("-")[0] != "3.3.2", k)):
        res = results[key]
        lines += render_deployment(res)
    first = next(iter(results.values()), {})
    lines += [f"Measured on {first.get('machine', '?')}; {first.get('when', '?')}; generated by "
              "`benchmarks/production.py` from benchmarks/results/production.json.", ""]
    return "\n".join(lines)


def write_page(results: dict) -> None:
    text = PAGE.read_text()
    if not BLOCK.search(text):
        sys.exit(f"{PAGE} has no production block: add the production:begin / production:end markers")
    PAGE.write_text(BLOCK.sub(lambda m: m.group(1) + render(results) + m.group(2), text, count=1))
    log(f"{PAGE} rewritten from {RESULTS}")


# == running =========================================================================================

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--matrix", default="3.3.2-postgresql", help="comma-separated <version>-<backend> (postgresql, mysql9, mysql)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--seconds", type=float, default=180, help="load per variant, before its runs drain")
    parser.add_argument("--load", choices=("full", "ordinary"), default="full",
                        help="ordinary: no race DAG, so the guard keeps nothing and the variants differ only by the triggers' cost "
                             "(stored as <version>-<backend>-ordinary)")
    parser.add_argument("--render", action="store_true", help="only rewrite docs/production.md from the stored results")
    args = parser.parse_args(argv)
    # A SIGTERM unwinds like an error: the deployment's components are stopped and its database dropped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if not args.render:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        lock = airflow_lock()
        try:
            for item in filter(None, (i.strip() for i in args.matrix.split(","))):
                version, _, backend = item.partition("-")
                if backend not in conftest.SERVER_URLS:
                    sys.exit(f"--matrix: unknown backend in {item!r}; use one of {', '.join(conftest.SERVER_URLS)}")
                workdir = Path(tempfile.mkdtemp(prefix=f"ti-guard-production-{item}-"))
                log(f"[production {item}] work dir {workdir}")
                res = production.run_production(version, backend, conftest.SERVER_URLS[backend], variants, args.seconds, workdir, args.load)
                res.update(machine=machine(), when=time.strftime("%Y-%m-%d"), workdir=str(workdir))
                # Read again before writing: another run may have stored its pairs meanwhile.
                key = item if args.load == "full" else f"{item}-{args.load}"
                results = {**(json.loads(RESULTS.read_text()) if RESULTS.exists() else {}), key: res}
                RESULTS.write_text(json.dumps(results, indent=1, default=str) + "\n")
                log(f"[production {item}] done in {res['seconds']:.0f} s" + (f": ERROR {res['error']}" if res.get("error") else ""))
        finally:
            lock.close()
    write_page(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
