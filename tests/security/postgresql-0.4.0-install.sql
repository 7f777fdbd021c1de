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


CREATE OR REPLACE FUNCTION ti_guard_guard_a3e66481() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $ti_guard$
DECLARE
    n bigint;
BEGIN
    IF current_setting('ti_guard.bypass', true) = 'on' THEN
        RETURN NEW;
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
            HINT = 'For a deliberate repair: SET LOCAL ti_guard.bypass = ''on'' in the same transaction, or ti-guard set-state.';
    END IF;
    PERFORM set_config('search_path', format('pg_catalog, %I, pg_temp', TG_TABLE_SCHEMA), true);
    IF to_regclass('ti_guard_refusal_seq') IS NOT NULL AND to_regclass('ti_guard_refusals') IS NOT NULL AND to_regclass('ti_guard_refusal_counts') IS NOT NULL THEN
        n := nextval('ti_guard_refusal_seq');
        UPDATE ti_guard_refusals SET seq = n, refused_at = statement_timestamp() AT TIME ZONE 'UTC',
            rule = TG_ARGV[1], action = TG_ARGV[0], old_state = OLD.state, new_state = NEW.state,
            dag_id = OLD.dag_id, task_id = OLD.task_id, run_id = OLD.run_id, map_index = OLD.map_index,
            writer_user = session_user, writer_application = current_setting('application_name', true),
            writer_address = host(inet_client_addr()), writer_pid = pg_backend_pid()
        WHERE slot = n % 10000;
        INSERT INTO ti_guard_refusal_counts AS c (day, rule, action, old_state, new_state, connection_id, bucket, refusals)
        VALUES ((statement_timestamp() AT TIME ZONE 'UTC')::date, TG_ARGV[1], TG_ARGV[0], OLD.state, NEW.state, pg_backend_pid(), n % 1000, 1)
        ON CONFLICT (day, rule, action, old_state, new_state, connection_id, bucket) DO UPDATE SET refusals = c.refusals + 1;
    END IF;
    IF TG_ARGV[0] = 'audit' THEN
        -- Recorded once: a later rule's trigger for this row and statement lets it be.
        PERFORM set_config('ti_guard.decided', concat_ws(chr(31), OLD.dag_id, OLD.task_id, OLD.run_id, OLD.map_index, statement_timestamp()), true);
        RETURN NEW;
    END IF;
    RETURN OLD;
END
$ti_guard$;


CREATE TRIGGER ti_guard_racy_skip_9e8caadf BEFORE UPDATE OF start_date ON task_instance
    FOR EACH ROW
    WHEN (NEW.state = 'skipped' AND OLD.state IN ('running', 'success', 'failed'))
    EXECUTE FUNCTION ti_guard_guard_a3e66481('keep', 'racy_skip');


CREATE TRIGGER ti_guard_set_state_skip_finish_39e0212f BEFORE UPDATE OF next_method ON task_instance
    FOR EACH ROW
    WHEN (NEW.state = 'skipped' AND OLD.state IN ('running') AND NEW.end_date IS NOT NULL AND NEW.start_date IS NOT DISTINCT FROM OLD.start_date)
    EXECUTE FUNCTION ti_guard_guard_a3e66481('mark', 'set_state_skip');


CREATE TRIGGER ti_guard_set_state_skip_keep_d055364c BEFORE UPDATE OF state ON task_instance
    FOR EACH ROW
    WHEN (NEW.state = 'skipped' AND OLD.state IN ('running') AND NEW.end_date IS NOT NULL AND NEW.start_date IS NOT DISTINCT FROM OLD.start_date)
    EXECUTE FUNCTION ti_guard_guard_a3e66481('keep', 'set_state_skip', 'unless_marked');


CREATE TRIGGER ti_guard_stale_schedule_37f61790 BEFORE UPDATE OF try_number ON task_instance
    FOR EACH ROW
    WHEN (NEW.state = 'scheduled' AND OLD.state IN ('running', 'success', 'failed'))
    EXECUTE FUNCTION ti_guard_guard_a3e66481('keep', 'stale_schedule');


INSERT INTO ti_guard_settings (id, mode, protect, guarded_table, definition, installed_at) VALUES (1, 'ignore', 'running,success,failed', 'task_instance', 'ti_guard_guard_a3e66481,ti_guard_racy_skip_9e8caadf,ti_guard_set_state_skip_finish_39e0212f,ti_guard_set_state_skip_keep_d055364c,ti_guard_stale_schedule_37f61790', CURRENT_TIMESTAMP);


INSERT INTO ti_guard_alembic_version (version_num) VALUES ('0001') RETURNING ti_guard_alembic_version.version_num;

COMMIT;

