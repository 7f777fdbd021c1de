-- ti-guard's PostgreSQL install as at commit aa2823e (unreleased, after 0.5.0): stale_set_state_skip's
-- WHEN compared float8 with an integer 0, which bound a planted =(float8, integer) (fixed in 88ed3f2).
BEGIN;

SET lock_timeout = '2000ms';


CREATE TABLE ti_guard_alembic_version (
    version_num VARCHAR(32) NOT NULL, 
    CONSTRAINT ti_guard_alembic_version_pkc PRIMARY KEY (version_num)
);

-- Running upgrade  -> 0001

CREATE TABLE ti_guard_settings (
	id INTEGER NOT NULL, 
	mode VARCHAR(16) NOT NULL, 
	protect VARCHAR(400) NOT NULL, 
	guarded_table VARCHAR(128) NOT NULL, 
	definition VARCHAR(1000) NOT NULL, 
	installed_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	rules VARCHAR(400), 
	PRIMARY KEY (id)
);


CREATE SEQUENCE ti_guard_refusal_seq;


CREATE TABLE ti_guard_refusals (
	slot INTEGER NOT NULL, 
	seq NUMERIC(20, 0), 
	refused_at TIMESTAMP WITHOUT TIME ZONE, 
	rule VARCHAR(64), 
	action VARCHAR(16), 
	old_state VARCHAR(20), 
	new_state VARCHAR(20), 
	dag_id VARCHAR(250), 
	task_id VARCHAR(250), 
	run_id VARCHAR(250), 
	map_index INTEGER, 
	writer_user VARCHAR(300), 
	writer_application VARCHAR(250), 
	writer_address VARCHAR(64), 
	writer_pid BIGINT, 
	PRIMARY KEY (slot)
);


CREATE INDEX ti_guard_refusals_seq ON ti_guard_refusals (seq);


INSERT INTO ti_guard_refusals (slot) SELECT 0 + d0.d * 1 + d1.d * 10 + d2.d * 100 + d3.d * 1000 AS slot 
FROM (SELECT 0 AS d UNION ALL SELECT 1 AS d UNION ALL SELECT 2 AS d UNION ALL SELECT 3 AS d UNION ALL SELECT 4 AS d UNION ALL SELECT 5 AS d UNION ALL SELECT 6 AS d UNION ALL SELECT 7 AS d UNION ALL SELECT 8 AS d UNION ALL SELECT 9 AS d) AS d0, (SELECT 0 AS d UNION ALL SELECT 1 AS d UNION ALL SELECT 2 AS d UNION ALL SELECT 3 AS d UNION ALL SELECT 4 AS d UNION ALL SELECT 5 AS d UNION ALL SELECT 6 AS d UNION ALL SELECT 7 AS d UNION ALL SELECT 8 AS d UNION ALL SELECT 9 AS d) AS d1, (SELECT 0 AS d UNION ALL SELECT 1 AS d UNION ALL SELECT 2 AS d UNION ALL SELECT 3 AS d UNION ALL SELECT 4 AS d UNION ALL SELECT 5 AS d UNION ALL SELECT 6 AS d UNION ALL SELECT 7 AS d UNION ALL SELECT 8 AS d UNION ALL SELECT 9 AS d) AS d2, (SELECT 0 AS d UNION ALL SELECT 1 AS d UNION ALL SELECT 2 AS d UNION ALL SELECT 3 AS d UNION ALL SELECT 4 AS d UNION ALL SELECT 5 AS d UNION ALL SELECT 6 AS d UNION ALL SELECT 7 AS d UNION ALL SELECT 8 AS d UNION ALL SELECT 9 AS d) AS d3 
WHERE 0 + d0.d * 1 + d1.d * 10 + d2.d * 100 + d3.d * 1000 < 10000;


CREATE TABLE ti_guard_refusal_counts (
	day DATE NOT NULL, 
	rule VARCHAR(64) NOT NULL, 
	action VARCHAR(16) NOT NULL, 
	old_state VARCHAR(20) NOT NULL, 
	new_state VARCHAR(20) NOT NULL, 
	connection_id BIGINT NOT NULL, 
	bucket INTEGER NOT NULL, 
	refusals BIGINT NOT NULL, 
	PRIMARY KEY (day, rule, action, old_state, new_state, connection_id, bucket)
);


DO $ti_guard_install$
DECLARE
    s text := current_schema();
BEGIN
    IF s IS NULL OR to_regclass(format('%I.%I', s, 'task_instance')) IS NULL THEN
        RAISE EXCEPTION USING MESSAGE = 'ti_guard: no table task_instance in the current schema ' || coalesce(s, '(none)') || ': SET search_path to Airflow''s schema first, or render the SQL for it (ti-guard sql --schema NAME)';
    END IF;
    IF position('$ti_guard' in s) > 0 THEN
        RAISE EXCEPTION USING MESSAGE = 'ti_guard: the schema name holds $ti_guard, which quotes the guard function''s body: rename the schema';
    END IF;
    EXECUTE replace(replace($ti_guard_function$CREATE OR REPLACE FUNCTION ti_guard_guard_f329f6fc() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $ti_guard$
DECLARE
    seq regclass;
    n bigint;
    lane bigint;
BEGIN
    IF TG_TABLE_SCHEMA <> @ti_guard_schema_literal@ OR TG_TABLE_NAME <> 'task_instance' THEN
        RETURN NEW;
    END IF;
    IF current_setting('ti_guard.bypass', true) = 'on' THEN
        IF has_table_privilege(session_user, TG_RELID, 'TRIGGER') THEN
            RETURN NEW;
        END IF;
    END IF;
    IF TG_ARGV[0] = 'mark' THEN
        PERFORM set_config('ti_guard.decided', concat_ws(chr(31), OLD.dag_id, OLD.task_id, OLD.run_id, OLD.map_index, statement_timestamp()), true);
        RETURN NEW;
    END IF;
    IF TG_NARGS > 2 AND current_setting('ti_guard.decided', true) = concat_ws(chr(31), OLD.dag_id, OLD.task_id, OLD.run_id, OLD.map_index, statement_timestamp()) THEN
        PERFORM set_config('ti_guard.decided', '', true);
        RETURN NEW;
    END IF;
    IF TG_ARGV[0] = 'raise' THEN
        RAISE EXCEPTION USING
            ERRCODE = 'check_violation',
            MESSAGE = format('ti_guard: refused %s -> %s for dag_id=%s task_id=%s map_index=%s run_id=%s',
                             OLD.state, NEW.state, OLD.dag_id, OLD.task_id, OLD.map_index, OLD.run_id),
            DETAIL = format('Rule %s: a task instance that a worker started or that finished is not overwritten by another writer.', TG_ARGV[1]),
            HINT = 'For a deliberate repair by an account with TRIGGER on the table: SET LOCAL ti_guard.bypass = ''on'' in the same transaction, or ti-guard set-state.';
    END IF;
    seq := to_regclass(format('%I.%I', @ti_guard_schema_literal@, 'ti_guard_refusal_seq'));
    IF seq IS NOT NULL AND to_regclass(format('%I.%I', @ti_guard_schema_literal@, 'ti_guard_refusals')) IS NOT NULL
            AND to_regclass(format('%I.%I', @ti_guard_schema_literal@, 'ti_guard_refusal_counts')) IS NOT NULL THEN
        n := nextval(seq);
        -- A slot another open transaction holds is skipped, never waited for: the count below still counts.
        UPDATE @ti_guard_schema@.ti_guard_refusals SET seq = n, refused_at = statement_timestamp() AT TIME ZONE 'UTC',
            rule = TG_ARGV[1], action = TG_ARGV[0], old_state = OLD.state, new_state = NEW.state,
            dag_id = OLD.dag_id, task_id = OLD.task_id, run_id = OLD.run_id, map_index = OLD.map_index,
            writer_user = session_user, writer_application = current_setting('application_name', true),
            writer_address = host(inet_client_addr()), writer_pid = pg_backend_pid()
        WHERE slot = (SELECT r.slot FROM @ti_guard_schema@.ti_guard_refusals r WHERE r.slot = n OPERATOR(pg_catalog.%) 10000 FOR UPDATE SKIP LOCKED);
        lane := 0;
        FOR i IN 1..128 LOOP
            EXIT WHEN pg_try_advisory_xact_lock(1952997735, lane::integer);
            lane := CASE WHEN i = 128 THEN 128 + pg_backend_pid() ELSE (lane + 1) OPERATOR(pg_catalog.%) 128 END;
        END LOOP;
        INSERT INTO @ti_guard_schema@.ti_guard_refusal_counts AS c (day, rule, action, old_state, new_state, connection_id, bucket, refusals)
        VALUES ((statement_timestamp() AT TIME ZONE 'UTC')::date, TG_ARGV[1], TG_ARGV[0], OLD.state, NEW.state, lane, n OPERATOR(pg_catalog.%) 1000, 1)
        ON CONFLICT (day, rule, action, old_state, new_state, connection_id, bucket) DO UPDATE SET refusals = c.refusals + 1;
    END IF;
    IF TG_ARGV[0] = 'audit' THEN
        -- Recorded once: a later rule's trigger for this row and statement lets it be.
        PERFORM set_config('ti_guard.decided', concat_ws(chr(31), OLD.dag_id, OLD.task_id, OLD.run_id, OLD.map_index, statement_timestamp()), true);
        RETURN NEW;
    END IF;
    RETURN OLD;
END
$ti_guard$$ti_guard_function$,
        '@ti_guard_schema@', '"' || replace(s, '"', '""') || '"'), '@ti_guard_schema_literal@', quote_literal(s));
END
$ti_guard_install$;


REVOKE ALL ON FUNCTION ti_guard_guard_f329f6fc() FROM PUBLIC;


CREATE TRIGGER ti_guard_racy_skip_dab44ea8 BEFORE UPDATE OF start_date ON task_instance
    FOR EACH ROW
    WHEN (NEW.state OPERATOR(pg_catalog.=) 'skipped' AND OLD.state OPERATOR(pg_catalog.=) ANY (ARRAY['running', 'success', 'failed']) AND NEW.duration IS NOT DISTINCT FROM OLD.duration AND NOT (NEW.duration IS NOT DISTINCT FROM 0))
    EXECUTE FUNCTION ti_guard_guard_f329f6fc('keep', 'racy_skip');


CREATE TRIGGER ti_guard_stale_set_state_skip_01a4c91e BEFORE UPDATE OF start_date ON task_instance
    FOR EACH ROW
    WHEN (NEW.state OPERATOR(pg_catalog.=) 'skipped' AND OLD.state OPERATOR(pg_catalog.=) ANY (ARRAY['running', 'success', 'failed']) AND NOT (NEW.duration IS NOT DISTINCT FROM OLD.duration AND NOT (NEW.duration IS NOT DISTINCT FROM 0)))
    EXECUTE FUNCTION ti_guard_guard_f329f6fc('keep', 'stale_set_state_skip');


CREATE TRIGGER ti_guard_set_state_skip_finish_b788cf94 BEFORE UPDATE OF next_method ON task_instance
    FOR EACH ROW
    WHEN (NEW.state OPERATOR(pg_catalog.=) 'skipped' AND OLD.state OPERATOR(pg_catalog.=) ANY (ARRAY['running']) AND NEW.end_date IS NOT NULL AND NEW.start_date IS NOT DISTINCT FROM OLD.start_date)
    EXECUTE FUNCTION ti_guard_guard_f329f6fc('mark', 'set_state_skip');


CREATE TRIGGER ti_guard_set_state_skip_keep_59cf29cc BEFORE UPDATE OF state ON task_instance
    FOR EACH ROW
    WHEN (NEW.state OPERATOR(pg_catalog.=) 'skipped' AND OLD.state OPERATOR(pg_catalog.=) ANY (ARRAY['running']) AND NEW.end_date IS NOT NULL AND NEW.start_date IS NOT DISTINCT FROM OLD.start_date)
    EXECUTE FUNCTION ti_guard_guard_f329f6fc('keep', 'set_state_skip', 'unless_marked');


CREATE TRIGGER ti_guard_stale_schedule_6ea43246 BEFORE UPDATE OF try_number ON task_instance
    FOR EACH ROW
    WHEN (NEW.state OPERATOR(pg_catalog.=) 'scheduled' AND OLD.state OPERATOR(pg_catalog.=) ANY (ARRAY['running', 'success', 'failed']))
    EXECUTE FUNCTION ti_guard_guard_f329f6fc('keep', 'stale_schedule');


INSERT INTO ti_guard_settings (id, mode, protect, guarded_table, definition, installed_at, rules) VALUES (1, 'ignore', 'running,success,failed', 'task_instance', 'ti_guard_guard_f329f6fc,ti_guard_racy_skip_dab44ea8,ti_guard_stale_set_state_skip_01a4c91e,ti_guard_set_state_skip_finish_b788cf94,ti_guard_set_state_skip_keep_59cf29cc,ti_guard_stale_schedule_6ea43246', CURRENT_TIMESTAMP, 'racy_skip,stale_set_state_skip,set_state_skip,stale_schedule');


INSERT INTO ti_guard_alembic_version (version_num) VALUES ('0001') RETURNING ti_guard_alembic_version.version_num;

-- Running upgrade 0001 -> 0002

ALTER TABLE ti_guard_alembic_version ALTER COLUMN version_num TYPE text;

UPDATE ti_guard_alembic_version SET version_num='0002' WHERE ti_guard_alembic_version.version_num = '0001';

COMMIT;

