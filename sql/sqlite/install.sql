BEGIN;

PRAGMA busy_timeout = 2000;


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
	installed_at DATETIME NOT NULL, 
	PRIMARY KEY (id)
);


CREATE TRIGGER ti_guard_racy_skip_c677521f BEFORE UPDATE OF start_date ON task_instance
FOR EACH ROW WHEN NEW.state = 'skipped' AND OLD.state IN ('running', 'success', 'failed')
BEGIN
    SELECT RAISE(IGNORE);
END;


CREATE TRIGGER ti_guard_stale_schedule_d71b79e8 BEFORE UPDATE OF try_number ON task_instance
FOR EACH ROW WHEN NEW.state = 'scheduled' AND OLD.state IN ('running', 'success', 'failed')
BEGIN
    SELECT RAISE(IGNORE);
END;


INSERT INTO ti_guard_settings (id, mode, protect, guarded_table, definition, installed_at) VALUES (1, 'ignore', 'running,success,failed', 'task_instance', 'ti_guard_racy_skip_c677521f,ti_guard_stale_schedule_d71b79e8', CURRENT_TIMESTAMP);


INSERT INTO ti_guard_alembic_version (version_num) VALUES ('0001') RETURNING version_num;

COMMIT;

