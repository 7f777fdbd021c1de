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
	definition VARCHAR(200) NOT NULL, 
	installed_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	PRIMARY KEY (id)
);


CREATE OR REPLACE FUNCTION ti_guard_guard_4b8c4f49() RETURNS trigger
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
    IF TG_ARGV[0] = 'keep_unmarked' THEN
        IF current_setting('ti_guard.finish', true) = concat_ws(chr(31), OLD.dag_id, OLD.task_id, OLD.run_id, OLD.map_index, statement_timestamp()) THEN
            PERFORM set_config('ti_guard.finish', '', true);
            RETURN NEW;
        END IF;
        RETURN OLD;
    END IF;
    IF TG_ARGV[0] = 'raise' THEN
        RAISE EXCEPTION USING
            ERRCODE = 'check_violation',
            MESSAGE = format('ti_guard: refused %s -> %s for dag_id=%s task_id=%s map_index=%s run_id=%s',
                             OLD.state, NEW.state, OLD.dag_id, OLD.task_id, OLD.map_index, OLD.run_id),
            DETAIL = format('Rule %s: a task instance that a worker started or that finished is not overwritten by another writer.', TG_ARGV[1]),
            HINT = 'For a deliberate repair: SET LOCAL ti_guard.bypass = ''on'' in the same transaction, or ti-guard set-state.';
    END IF;
    RETURN OLD;
END
$ti_guard$;


CREATE TRIGGER ti_guard_racy_skip_57ace88d BEFORE UPDATE OF start_date ON task_instance
    FOR EACH ROW
    WHEN (NEW.state = 'skipped' AND OLD.state IN ('running', 'success', 'failed'))
    EXECUTE FUNCTION ti_guard_guard_4b8c4f49('keep', 'racy_skip');


CREATE TRIGGER ti_guard_set_state_skip_finish_75973cdc BEFORE UPDATE OF next_method ON task_instance
    FOR EACH ROW
    WHEN (NEW.state = 'skipped' AND OLD.state IN ('running') AND NEW.end_date IS NOT NULL AND NEW.start_date IS NOT DISTINCT FROM OLD.start_date)
    EXECUTE FUNCTION ti_guard_guard_4b8c4f49('mark', 'set_state_skip');


CREATE TRIGGER ti_guard_set_state_skip_keep_8992f6ac BEFORE UPDATE OF state ON task_instance
    FOR EACH ROW
    WHEN (NEW.state = 'skipped' AND OLD.state IN ('running') AND NEW.end_date IS NOT NULL AND NEW.start_date IS NOT DISTINCT FROM OLD.start_date)
    EXECUTE FUNCTION ti_guard_guard_4b8c4f49('keep_unmarked', 'set_state_skip');


CREATE TRIGGER ti_guard_stale_schedule_5dc7dbc2 BEFORE UPDATE OF try_number ON task_instance
    FOR EACH ROW
    WHEN (NEW.state = 'scheduled' AND OLD.state IN ('running', 'success', 'failed'))
    EXECUTE FUNCTION ti_guard_guard_4b8c4f49('keep', 'stale_schedule');


INSERT INTO ti_guard_settings (id, mode, protect, guarded_table, definition, installed_at) VALUES (1, 'ignore', 'running,success,failed', 'task_instance', 'ti_guard_guard_4b8c4f49,ti_guard_racy_skip_57ace88d,ti_guard_set_state_skip_finish_75973cdc,ti_guard_set_state_skip_keep_8992f6ac,ti_guard_stale_schedule_5dc7dbc2', CURRENT_TIMESTAMP);


INSERT INTO ti_guard_alembic_version (version_num) VALUES ('0001') RETURNING ti_guard_alembic_version.version_num;

COMMIT;

