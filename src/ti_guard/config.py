"""Where the URL, schema and policy come from: the first source that names one wins.

URL:    --url / -x url=, TI_GUARD_URL, AIRFLOW__DATABASE__SQL_ALCHEMY_CONN (and its _CMD form),
        [database] sql_alchemy_conn (or sql_alchemy_conn_cmd) in $AIRFLOW_HOME/airflow.cfg.
schema: --schema / -x schema=, TI_GUARD_SCHEMA, AIRFLOW__DATABASE__SQL_ALCHEMY_SCHEMA,
        [database] sql_alchemy_schema in airflow.cfg.
mode:   --mode / -x mode=, TI_GUARD_MODE.  protect: --protect / -x protect=, TI_GUARD_PROTECT.
rules:  --rules / -x rules=, TI_GUARD_RULES (policy.parse_rules: all, -set_state_skip, ...).
"""

from __future__ import annotations

import configparser
import os
import shlex
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

import sqlalchemy as sa

from .errors import GuardError
from .policy import Policy

# Drivers Airflow URLs name that are not installed here, and the ones that serve them.
_DRIVERS = {
    "postgresql": "postgresql+psycopg",
    "postgres": "postgresql+psycopg",
    "mysql": "mysql+pymysql",
    "mariadb": "mysql+pymysql",
    "sqlite": "sqlite",
}


@dataclass(frozen=True)
class Settings:
    url: str | None
    policy: Policy
    lock_timeout: float = 2.0
    lock_retries: int = 5
    url_source: str = "--url"  # where the URL came from: a flag, an environment variable, airflow.cfg
    # The policy's fields a flag, -x or an environment variable named: an install over a guard keeps
    # the recorded value of every other one rather than reset it to the default.
    named: frozenset = frozenset()

    def over(self, recorded: Policy | None) -> Policy:
        """The policy to install over a guard that records `recorded`: each of mode, protect and rules
        as named (flag, -x, environment), else as recorded (an install does not reset what it was not
        told), else the default."""
        if recorded is None:
            return self.policy
        return replace(recorded, **{field: getattr(self.policy, field) for field in self.named})

    @property
    def safe_url(self) -> str:
        return redact(self.url) if self.url else "(no URL)"

    @property
    def url_origin(self) -> str:
        """The URL, password masked, and where it came from."""
        return f"{self.safe_url} (from {self.url_source})"


def require_existing(settings: Settings) -> None:
    """Refuse a SQLite URL whose file does not exist: connecting would create an empty one."""
    url = sa.engine.make_url(settings.url)
    path = url.database
    if url.get_backend_name() != "sqlite" or not path or path == ":memory:" or url.query.get("mode") == "memory":
        return
    if not Path(path).exists():
        raise GuardError(
            f"no SQLite database at {path}: the URL {settings.url_origin} names a file that does not exist"
            " (ti-guard never creates one); fix that setting or pass --url with Airflow's database"
        )


def redact(url: str) -> str:
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "(unparseable URL)"


def _cfg_path(env) -> Path:
    return Path(env.get("AIRFLOW_HOME") or Path.home() / "airflow") / "airflow.cfg"


def _airflow_cfg(env) -> configparser.RawConfigParser | None:
    path = _cfg_path(env)
    if not path.is_file():
        return None
    cfg = configparser.RawConfigParser(strict=False)
    try:
        cfg.read(path)
    except configparser.Error as exc:
        raise GuardError(f"cannot read {path}: {exc.message.splitlines()[0]}; fix the file or pass --url") from None
    return cfg


def _run_cmd(cmd: str, source: str) -> str:
    try:
        out = subprocess.run(shlex.split(cmd), capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise GuardError(f"{source} command failed ({exc}); fix the command or pass --url") from None
    return out.strip()


def _from_cfg(cfg, key: str):
    if cfg is not None and cfg.has_option("database", key):
        return cfg.get("database", key).strip() or None
    return None


def resolve_url(explicit: str | None, env=os.environ) -> str:
    return find_url(explicit, env)[0]


def find_url(explicit: str | None, env=os.environ, flag: str = "--url") -> tuple[str, str]:
    """The URL and where it came from (`flag`, an environment variable, airflow.cfg's key)."""
    if explicit:
        return normalize_url(explicit), flag
    for name in ("TI_GUARD_URL", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"):
        if env.get(name):
            return normalize_url(env[name]), name
    name = "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_CMD"
    if env.get(name):
        return normalize_url(_run_cmd(env[name], name)), name
    cfg = _airflow_cfg(env)
    for key in ("sql_alchemy_conn", "sql_alchemy_conn_cmd"):
        value = _from_cfg(cfg, key)
        if value:
            source = f"{_cfg_path(env)} [database] {key}"
            return normalize_url(value if key == "sql_alchemy_conn" else _run_cmd(value, key)), source
    raise GuardError(
        "no database URL: pass --url (or alembic -x url=...), or set TI_GUARD_URL, "
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN, or [database] sql_alchemy_conn in $AIRFLOW_HOME/airflow.cfg"
    )


def normalize_url(raw: str) -> str:
    """Parse a URL and point Airflow's drivers (psycopg2, mysqldb, ...) at psycopg 3 and PyMySQL."""
    try:
        url = sa.engine.make_url(raw.strip())
    except Exception:
        raise GuardError(
            "cannot parse the database URL: expected dialect+driver://user:password@host:port/database "
            "(special characters in the password must be %-encoded)"
        ) from None
    backend = url.drivername.split("+", 1)[0].lower()
    if backend not in _DRIVERS:
        raise GuardError(f"unsupported database {backend!r}: ti-guard supports postgresql, mysql (or mariadb) and sqlite")
    url = url.set(drivername=_DRIVERS[backend])
    return url.render_as_string(hide_password=False)


def resolve(
    url=None,
    schema=None,
    mode=None,
    protect=None,
    table=None,
    rules=None,
    lock_timeout=None,
    lock_retries=None,
    env=os.environ,
    need_url=True,
    flag="--url",
) -> Settings:
    cfg = None
    if schema is None:
        schema = env.get("TI_GUARD_SCHEMA") or env.get("AIRFLOW__DATABASE__SQL_ALCHEMY_SCHEMA")
        if schema is None:
            cfg = _airflow_cfg(env)
            schema = _from_cfg(cfg, "sql_alchemy_schema")
    given = {
        field: value if value is not None else env.get(variable)
        for field, value, variable in (("protect", protect, "TI_GUARD_PROTECT"), ("mode", mode, "TI_GUARD_MODE"), ("switched_on", rules, "TI_GUARD_RULES"))
    }
    policy = Policy.build(
        protect=given["protect"],
        mode=given["mode"],
        schema=schema,
        table=table if table is not None else env.get("TI_GUARD_TABLE"),
        rules=given["switched_on"],
    )
    found, source = find_url(url, env, flag) if need_url or url else (None, "")
    return Settings(
        url=found,
        url_source=source,
        policy=policy,
        named=frozenset(field for field, value in given.items() if value not in (None, "")),
        lock_timeout=_number(lock_timeout if lock_timeout is not None else env.get("TI_GUARD_LOCK_TIMEOUT"), 2.0, "lock timeout", float),
        lock_retries=_number(lock_retries if lock_retries is not None else env.get("TI_GUARD_LOCK_RETRIES"), 5, "lock retries", int),
    )


def _number(value, default, what, kind):
    if value is None or value == "":
        return default
    try:
        number = kind(value)
    except (TypeError, ValueError):
        number = -1
    if number <= 0 or (kind is float and number > 600) or (kind is int and number > 100):
        raise GuardError(f"invalid {what} {value!r}: give a positive number (seconds for the timeout, a count for retries)")
    return number
