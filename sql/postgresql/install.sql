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
	writer_user VARCHAR(250), 
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
	refusals BIGINT NOT NULL, 
	PRIMARY KEY (day, rule, action, old_state, new_state, connection_id)
);


CREATE OR REPLACE FUNCTION ti_guard_record_1450293c(p_schema text, p_rule text, p_action text, p_old_state text, p_new_state text, p_dag_id text, p_task_id text, p_run_id text, p_map_index integer) RETURNS void
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $ti_guard$
DECLARE
    n bigint;
BEGIN
    PERFORM set_config('search_path', format('pg_catalog, %I, pg_temp', p_schema), true);
    n := nextval('ti_guard_refusal_seq');
    UPDATE ti_guard_refusals SET seq = n, refused_at = statement_timestamp() AT TIME ZONE 'UTC',
        rule = p_rule, action = p_action, old_state = p_old_state, new_state = p_new_state,
        dag_id = p_dag_id, task_id = p_task_id, run_id = p_run_id, map_index = p_map_index,
        writer_user = session_user, writer_application = current_setting('application_name', true),
        writer_address = host(inet_client_addr()), writer_pid = pg_backend_pid()
    WHERE slot = n % 10000;
    INSERT INTO ti_guard_refusal_counts AS c (day, rule, action, old_state, new_state, connection_id, refusals)
    VALUES ((statement_timestamp() AT TIME ZONE 'UTC')::date, p_rule, p_action, p_old_state, p_new_state, pg_backend_pid(), 1)
    ON CONFLICT (day, rule, action, old_state, new_state, connection_id) DO UPDATE SET refusals = c.refusals + 1;
END
$ti_guard$;


CREATE OR REPLACE FUNCTION ti_guard_guard_3bb52bdf() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $ti_guard$
BEGIN
    IF current_setting('ti_guard.bypass', true) = 'on' THEN
        RETURN NEW;
    END IF;
    IF TG_ARGV[0] = 'mark' THEN
        PERFORM set_config('ti_guard.finish', concat_ws(chr(31), OLD.dag_id, OLD.task_id, OLD.run_id, OLD.map_index, statement_timestamp()), true);
        RETURN NEW;
    END IF;
    IF TG_NARGS > 2 AND current_setting('ti_guard.finish', true) = concat_ws(chr(31), OLD.dag_id, OLD.task_id, OLD.run_id, OLD.map_index, statement_timestamp()) THEN
        PERFORM set_config('ti_guard.finish', '', true);
        RETURN NEW;
    END IF;
    IF TG_ARGV[0] = 'raise' THEN
        RAISE EXCEPTION USING
            ERRCODE = 'check_violation',
            MESSAGE = format('ti_guard: refused %s -> %s for dag_id=%s task_id=%s map_index=%s run_id=%s',
                             OLD.state, NEW.state, OLD.dag_id, OLD.task_id, OLD.map_index, OLD.run_id),
            DETAIL = format('Rule %s: a task instance that a worker started or that finished is not overwritten by another writer.', TG_ARGV[1]),
            HINT = 'For a deliberate repair: SET LOCAL ti_guard.bypass = ''on'' in the same transaction, or ti-guard set-state.';
    END IF;
    BEGIN
        EXECUTE format('SELECT %I.ti_guard_record_1450293c($1, $2, $3, $4, $5, $6, $7, $8, $9)', TG_TABLE_SCHEMA)
            USING TG_TABLE_SCHEMA, TG_ARGV[1], TG_ARGV[0], OLD.state, NEW.state, OLD.dag_id, OLD.task_id, OLD.run_id, OLD.map_index;
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'ti_guard: could not record a refusal (%): %', SQLSTATE, SQLERRM;
    END;
    IF TG_ARGV[0] = 'audit' THEN
        RETURN NEW;
    END IF;
    RETURN OLD;
END
$ti_guard$;


CREATE TRIGGER ti_guard_racy_skip_c8887574 BEFORE UPDATE OF start_date ON task_instance
    FOR EACH ROW
    WHEN (NEW.state = 'skipped' AND OLD.state IN ('running', 'success', 'failed'))
    EXECUTE FUNCTION ti_guard_guard_3bb52bdf('keep', 'racy_skip');


CREATE TRIGGER ti_guard_set_state_skip_finish_3b832c7c BEFORE UPDATE OF next_method ON task_instance
    FOR EACH ROW
    WHEN (NEW.state = 'skipped' AND OLD.state IN ('running') AND NEW.end_date IS NOT NULL AND NEW.start_date IS NOT DISTINCT FROM OLD.start_date)
    EXECUTE FUNCTION ti_guard_guard_3bb52bdf('mark', 'set_state_skip');


CREATE TRIGGER ti_guard_set_state_skip_keep_a9653a0b BEFORE UPDATE OF state ON task_instance
    FOR EACH ROW
    WHEN (NEW.state = 'skipped' AND OLD.state IN ('running') AND NEW.end_date IS NOT NULL AND NEW.start_date IS NOT DISTINCT FROM OLD.start_date)
    EXECUTE FUNCTION ti_guard_guard_3bb52bdf('keep', 'set_state_skip', 'unless_marked');


CREATE TRIGGER ti_guard_stale_schedule_2096716a BEFORE UPDATE OF try_number ON task_instance
    FOR EACH ROW
    WHEN (NEW.state = 'scheduled' AND OLD.state IN ('running', 'success', 'failed'))
    EXECUTE FUNCTION ti_guard_guard_3bb52bdf('keep', 'stale_schedule');


INSERT INTO ti_guard_settings (id, mode, protect, guarded_table, definition, installed_at) VALUES (1, 'ignore', 'running,success,failed', 'task_instance', 'ti_guard_record_1450293c,ti_guard_guard_3bb52bdf,ti_guard_racy_skip_c8887574,ti_guard_set_state_skip_finish_3b832c7c,ti_guard_set_state_skip_keep_a9653a0b,ti_guard_stale_schedule_2096716a', CURRENT_TIMESTAMP);


INSERT INTO ti_guard_alembic_version (version_num) VALUES ('0001') RETURNING ti_guard_alembic_version.version_num;

COMMIT;

