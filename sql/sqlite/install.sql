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


CREATE TRIGGER ti_guard_skip_da2d7727 BEFORE UPDATE OF state ON task_instance
FOR EACH ROW WHEN NEW.state = 'skipped' AND OLD.state IN ('running', 'success', 'failed') AND NOT (OLD.state = 'running' AND NEW.end_date IS NOT NULL AND NEW.start_date IS OLD.start_date)
BEGIN
    SELECT RAISE(ABORT, 'ti_guard: refused a transition to skipped from running, success, failed (a task instance that a worker started or that finished is not skipped by another writer)');
END;


CREATE TRIGGER ti_guard_stamp_2f3c4cb7 BEFORE UPDATE OF start_date ON task_instance
FOR EACH ROW WHEN NEW.state = 'skipped' AND OLD.state IN ('running', 'success', 'failed')
BEGIN
    SELECT RAISE(ABORT, 'ti_guard: refused a transition to skipped from running, success, failed (a task instance that a worker started or that finished is not skipped by another writer)');
END;


INSERT INTO ti_guard_settings (id, mode, protect, guarded_table, definition, installed_at) VALUES (1, 'raise', 'running,success,failed', 'task_instance', 'ti_guard_skip_da2d7727,ti_guard_stamp_2f3c4cb7', CURRENT_TIMESTAMP);


INSERT INTO ti_guard_alembic_version (version_num) VALUES ('0001') RETURNING version_num;

COMMIT;

