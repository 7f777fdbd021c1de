"""One-line errors that name the cause and the fix, and the translation of driver errors into them."""

from __future__ import annotations

import re


class GuardError(Exception):
    """An error meant for a person: str(e) is one line with the cause and what to do."""

    exit_code = 2


class LockTimeout(GuardError):
    pass


# MySQL 8+ turns binary logging on by default (MariaDB does not): CREATE TRIGGER then needs SUPER
# or this variable. SET GLOBAL lasts until the server restarts; the config file (or MySQL's SET PERSIST) keeps it.
BINLOG_ADVICE = (
    "as an administrator run SET GLOBAL log_bin_trust_function_creators = 1 (and set it in the server's"
    " config file, or SET PERSIST on MySQL, to keep it), or install as an account with SUPER"
)

# PostgreSQL SQLSTATEs and MySQL/MariaDB error numbers we explain.
_PG_HINTS = {
    "55P03": "could not lock {table} within the lock timeout: a long transaction holds it; retry later or raise --lock-timeout",
    "42501": "the database user lacks a privilege: {detail}; run as the owner of {table} (or grant TRIGGER on it and CREATE on its schema)",
    "3F000": "the database user lacks a privilege: it cannot create in the schema ({detail}); grant CREATE on the schema of {table} and TRIGGER on {table}, or run as its owner",
    "3D000": "the database does not exist: {detail}; check the database name in the URL",
    "28P01": "password authentication failed: {detail}; check the user and password in the URL",
    "28000": "the server refused the login: {detail}; check the user in the URL and pg_hba.conf",
    "25006": "the connection is read-only: {detail}; connect to the primary, not a replica",
}
_MYSQL_HINTS = {
    1205: "could not lock {table} within the lock timeout: a long transaction holds it; retry later or raise --lock-timeout",
    1044: "the database user lacks a privilege: {detail}; grant TRIGGER on the table (and CREATE for the settings table)",
    1142: "the database user lacks a privilege: {detail}; grant TRIGGER on the table (and CREATE for the settings table)",
    1227: "the database user lacks a privilege: {detail}; the user needs TRIGGER (and SUPER or log_bin_trust_function_creators=1 when binary logging is on)",
    1419: "binary logging is on and the user has no SUPER, so it cannot create triggers (error 1419); " + BINLOG_ADVICE,
    1045: "access denied: {detail}; check the user and password in the URL",
    # MariaDB: no such account for this host, or one that logs in through unix_socket only.
    1698: "access denied: {detail}; check the user in the URL (the account may not exist for this host, or may log in through the server's socket only) and its password",
    1049: "the database does not exist: {detail}; check the database name in the URL",
    2003: "cannot reach the MySQL server: {detail}; check host and port in the URL and that the server runs",
    1290: "the server is read-only: {detail}; connect to the primary, not a replica",
    1792: "the transaction is read-only: {detail}; connect to the primary, not a replica",
    1449: "the trigger's DEFINER account no longer exists: {detail}; reinstall the guard as an existing user (ti-guard install)",
}

_LOGIN_REFUSED = (
    (re.compile(r'role "[^"]*" does not exist'), "the server has no such role (user): {detail}; check the user name in the URL"),
    (re.compile(r'database "[^"]*" does not exist'), "the database does not exist: {detail}; check the database name in the URL"),
    (re.compile(r"password authentication failed"), "password authentication failed: {detail}; check the user and password in the URL"),
    (re.compile(r"no pg_hba\.conf entry"), "the server refused the login: {detail}; check the user and database in the URL and pg_hba.conf"),
)


def _first_line(text: str) -> str:
    text = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return re.sub(r"\s+", " ", text)[:300]


def explain(exc: BaseException, table: str = "task_instance") -> GuardError:
    """Turn a DBAPI/SQLAlchemy error into a GuardError with one line of advice."""
    if isinstance(exc, GuardError):
        return exc
    orig = getattr(exc, "orig", None) or exc
    detail = _first_line(orig)
    # MySQL's error number first: PyMySQL errors carry a SQLSTATE too (1045 is 28000, as on PostgreSQL).
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int) and args[0] in _MYSQL_HINTS:
        cls = LockTimeout if args[0] == 1205 else GuardError
        return cls(_MYSQL_HINTS[args[0]].format(table=table, detail=_first_line(args[1] if len(args) > 1 else detail)))
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate in _PG_HINTS:
        cls = LockTimeout if sqlstate == "55P03" else GuardError
        return cls(_PG_HINTS[sqlstate].format(table=table, detail=detail))
    low = detail.lower()
    for pattern, advice in _LOGIN_REFUSED:
        # PostgreSQL refuses these at login, before any SQLSTATE reaches the driver's error.
        if pattern.search(detail):
            return GuardError(advice.format(detail=detail))
    if "connection refused" in low or "could not connect" in low or "connection failed" in low or "can't connect" in low:
        return GuardError(f"cannot connect to the database: {detail}; check host and port in the URL and that the server runs")
    if "database is locked" in low:
        # SQLite answers at once, without its busy wait, when a reader would have to wait to write.
        return LockTimeout(f"could not lock the SQLite database within the lock timeout: {detail}; another connection is writing; retry later or raise --lock-timeout")
    if "unable to open database file" in low:
        return GuardError(f"cannot open the SQLite file: {detail}; check the path in the URL")
    if "readonly" in low.replace("-", "").replace(" ", "") or "read-only" in low:
        return GuardError(f"the database is read-only: {detail}; use a writable database and user")
    return GuardError(f"{type(orig).__name__}: {detail}")
