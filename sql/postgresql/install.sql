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


CREATE OR REPLACE FUNCTION ti_guard_refuse_e6ebcd2e() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $ti_guard$
BEGIN
    IF current_setting('ti_guard.bypass', true) = 'on' THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION USING
        ERRCODE = 'check_violation',
        MESSAGE = format('ti_guard: refused %s -> skipped for dag_id=%s task_id=%s map_index=%s run_id=%s',
                         OLD.state, OLD.dag_id, OLD.task_id, OLD.map_index, OLD.run_id),
        DETAIL = 'A task instance that a worker started or that finished is not skipped by another writer.',
        HINT = 'For a deliberate repair: SET LOCAL ti_guard.bypass = ''on'' in the same transaction, or ti-guard set-state.';
END
$ti_guard$;


CREATE TRIGGER ti_guard_skip_d98dd220 BEFORE UPDATE OF state ON task_instance
    FOR EACH ROW
    WHEN (NEW.state = 'skipped' AND OLD.state IN ('running', 'success', 'failed') AND NOT (OLD.state = 'running' AND NEW.end_date IS NOT NULL AND NEW.start_date IS NOT DISTINCT FROM OLD.start_date))
    EXECUTE FUNCTION ti_guard_refuse_e6ebcd2e();


CREATE TRIGGER ti_guard_stamp_0a408b8b BEFORE UPDATE OF start_date ON task_instance
    FOR EACH ROW
    WHEN (NEW.state = 'skipped' AND OLD.state IN ('running', 'success', 'failed'))
    EXECUTE FUNCTION ti_guard_refuse_e6ebcd2e();


INSERT INTO ti_guard_settings (id, mode, protect, guarded_table, definition, installed_at) VALUES (1, 'raise', 'running,success,failed', 'task_instance', 'ti_guard_refuse_e6ebcd2e,ti_guard_skip_d98dd220,ti_guard_stamp_0a408b8b', CURRENT_TIMESTAMP);


INSERT INTO ti_guard_alembic_version (version_num) VALUES ('0001') RETURNING ti_guard_alembic_version.version_num;

COMMIT;

