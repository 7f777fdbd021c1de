"""The policy tables of docs/policy.md, generated from policy.RULES and policy.WRITERS.

    python -m ti_guard.policy_doc          print the block
    python -m ti_guard.policy_doc --docs   rewrite it in docs/policy.md (a test fails while it is stale)
"""

from __future__ import annotations

import sys

from . import docblock
from .policy import COLUMN_SINCE, ENDS_WITHOUT_NEXT_METHOD, RULES, SIGNATURE_NEEDS, SIGNATURES, WRITERS, rule_named
from .render import SUPPORTED, sees

NAMES = {"postgresql": "PostgreSQL", "mysql": "MySQL", "sqlite": "SQLite"}
PAGE = docblock.DOCS / "policy.md"
# Where a backend sees a signature only as the server is configured (docs/policy.md, "What MySQL can see of a statement").
WHERE_SEEN = {("mysql", ENDS_WITHOUT_NEXT_METHOD): "with performance_schema recording the statement, MySQL's default; else goes through, as on MariaDB by default"}


def _name(backend: str, signature: str) -> str:
    caveat = WHERE_SEEN.get((backend, signature))
    return f"{NAMES[backend]} ({caveat})" if caveat else NAMES[backend]


def verdict(rule_name, backend: str, generation: int = 3) -> str:
    if rule_name is None:
        return "goes through"
    rule = rule_named(rule_name).for_generation(generation)
    if rule.signature not in sees(backend):
        return "goes through (cannot be told apart here)"
    verdict = "refused (raise) / kept (ignore)" if rule.may_raise else "kept, every mode"
    caveat = WHERE_SEEN.get((backend, rule.signature))
    return f"{verdict} ({caveat})" if caveat else verdict


def _reads(signature: str) -> str:
    column = SIGNATURE_NEEDS[signature]
    return f"`{column}` ({COLUMN_SINCE[column]})"


def markdown() -> str:
    lines = [
        "Rules (`src/ti_guard/policy.py`; each backend's SQL in `src/ti_guard/render/<backend>.py`; each can be "
        "switched off at install: `--rules`, docs/policy.md):",
        "",
        "| rule | transition | why | told apart by | column it reads (install refuses a table without it) | raise mode | Airflow tables | enforced on |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in RULES:
        olds = "protected states (default running, success, failed)" if r.old_states is None else ", ".join(r.old_states)
        on = ", ".join(_name(b, r.signature) for b in SUPPORTED if r.signature in sees(b))
        if r.signature_on_airflow_2:
            on = f"{on or 'none'} (3.x); " + ", ".join(NAMES[b] for b in SUPPORTED if r.signature_on_airflow_2 in sees(b)) + " (2.x)"
        gens = ", ".join(f"{g}.x" for g in r.airflow)
        raises = "raises" if r.may_raise else "never raises: kept"
        spared = f" (2.x tables: not {', '.join(r.spared_on_airflow_2)})" if r.spared_on_airflow_2 else ""
        told = f"the statement {SIGNATURES[r.signature]}"
        if r.signature_on_airflow_2:
            told = f"3.x: {told}; 2.x: the statement {SIGNATURES[r.signature_on_airflow_2]}"
        reads = _reads(r.signature)
        if r.signature_on_airflow_2:
            reads = f"3.x: {reads}; 2.x: {_reads(r.signature_on_airflow_2)}"
        lines.append(f"| `{r.name}` | {olds}{spared} -> {r.new_state} | {r.why} | {told} | {reads} | {raises} | {gens} | {on} |")
    lines += [
        "",
        "Every Airflow writer of those transitions (read from the 3.3.2, 3.1.8 and 2.11.2/2.10.5 sources):",
        "",
        "| writer | Airflow | transition | what it writes | rule | " + " | ".join(NAMES[b] for b in SUPPORTED) + " | why |",
        "|---|---|---|---|---|" + "---|" * len(SUPPORTED) + "---|",
    ]
    for w in WRITERS:
        generation = 2 if w.versions.startswith("2") else 3
        cells = [verdict(w.rule, b, generation) for b in SUPPORTED]
        lines.append(f"| {w.name} | {w.versions} | {w.transition} | {w.writes} | {w.rule or '-'} | " + " | ".join(cells) + f" | {w.note} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--docs" not in argv:
        sys.stdout.write(markdown())
        return 0
    docblock.rewrite(PAGE, "policy", markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
