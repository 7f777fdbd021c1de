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
	definition VARCHAR(1000) NOT NULL, 
	installed_at DATETIME NOT NULL, 
	rules VARCHAR(400), 
	PRIMARY KEY (id)
);


CREATE TABLE ti_guard_refusals (
	slot INTEGER NOT NULL, 
	seq NUMERIC(20, 0), 
	refused_at DATETIME, 
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


CREATE TRIGGER ti_guard_racy_skip_b2e8baaf BEFORE UPDATE OF start_date ON task_instance
FOR EACH ROW WHEN NEW.state = 'skipped' AND OLD.state IN ('running', 'success', 'failed') AND NEW.duration IS OLD.duration AND NOT (NEW.duration IS 0)
BEGIN
    UPDATE ti_guard_refusals SET seq = (SELECT COALESCE(MAX(seq), 0) + 1 FROM ti_guard_refusals), refused_at = strftime('%Y-%m-%d %H:%M:%f000', 'now'),
        rule = 'racy_skip', action = 'keep', old_state = OLD.state, new_state = NEW.state,
        dag_id = OLD.dag_id, task_id = OLD.task_id, run_id = OLD.run_id, map_index = OLD.map_index
    WHERE slot = (SELECT COALESCE(MAX(seq), 0) + 1 FROM ti_guard_refusals) % 10000;
    INSERT INTO ti_guard_refusal_counts (day, rule, action, old_state, new_state, connection_id, bucket, refusals)
    VALUES (date('now'), 'racy_skip', 'keep', OLD.state, NEW.state, 0, (SELECT MAX(seq) FROM ti_guard_refusals) % 1000, 1)
    ON CONFLICT (day, rule, action, old_state, new_state, connection_id, bucket) DO UPDATE SET refusals = refusals + 1;
    SELECT RAISE(IGNORE);
END;


CREATE TRIGGER ti_guard_stale_set_state_skip_40795438 AFTER UPDATE OF start_date ON task_instance
FOR EACH ROW WHEN NEW.state = 'skipped' AND OLD.state IN ('running', 'success', 'failed') AND NOT (NEW.duration IS OLD.duration AND NOT (NEW.duration IS 0))
BEGIN
    UPDATE ti_guard_refusals SET seq = (SELECT COALESCE(MAX(seq), 0) + 1 FROM ti_guard_refusals), refused_at = strftime('%Y-%m-%d %H:%M:%f000', 'now'),
        rule = 'stale_set_state_skip', action = 'keep', old_state = OLD.state, new_state = NEW.state,
        dag_id = OLD.dag_id, task_id = OLD.task_id, run_id = OLD.run_id, map_index = OLD.map_index
    WHERE slot = (SELECT COALESCE(MAX(seq), 0) + 1 FROM ti_guard_refusals) % 10000;
    INSERT INTO ti_guard_refusal_counts (day, rule, action, old_state, new_state, connection_id, bucket, refusals)
    VALUES (date('now'), 'stale_set_state_skip', 'keep', OLD.state, NEW.state, 0, (SELECT MAX(seq) FROM ti_guard_refusals) % 1000, 1)
    ON CONFLICT (day, rule, action, old_state, new_state, connection_id, bucket) DO UPDATE SET refusals = refusals + 1;
    UPDATE task_instance SET state = OLD.state, start_date = OLD.start_date, end_date = OLD.end_date, duration = OLD.duration, updated_at = OLD.updated_at
    WHERE dag_id = OLD.dag_id AND task_id = OLD.task_id AND run_id = OLD.run_id AND map_index = OLD.map_index;
END;


CREATE TRIGGER ti_guard_stale_schedule_7c868685 BEFORE UPDATE OF try_number ON task_instance
FOR EACH ROW WHEN NEW.state = 'scheduled' AND OLD.state IN ('running', 'success', 'failed')
BEGIN
    UPDATE ti_guard_refusals SET seq = (SELECT COALESCE(MAX(seq), 0) + 1 FROM ti_guard_refusals), refused_at = strftime('%Y-%m-%d %H:%M:%f000', 'now'),
        rule = 'stale_schedule', action = 'keep', old_state = OLD.state, new_state = NEW.state,
        dag_id = OLD.dag_id, task_id = OLD.task_id, run_id = OLD.run_id, map_index = OLD.map_index
    WHERE slot = (SELECT COALESCE(MAX(seq), 0) + 1 FROM ti_guard_refusals) % 10000;
    INSERT INTO ti_guard_refusal_counts (day, rule, action, old_state, new_state, connection_id, bucket, refusals)
    VALUES (date('now'), 'stale_schedule', 'keep', OLD.state, NEW.state, 0, (SELECT MAX(seq) FROM ti_guard_refusals) % 1000, 1)
    ON CONFLICT (day, rule, action, old_state, new_state, connection_id, bucket) DO UPDATE SET refusals = refusals + 1;
    SELECT RAISE(IGNORE);
END;


INSERT INTO ti_guard_settings (id, mode, protect, guarded_table, definition, installed_at, rules) VALUES (1, 'ignore', 'running,success,failed', 'task_instance', 'ti_guard_racy_skip_b2e8baaf,ti_guard_stale_set_state_skip_40795438,ti_guard_stale_schedule_7c868685', CURRENT_TIMESTAMP, 'racy_skip,stale_set_state_skip,set_state_skip,stale_schedule');


INSERT INTO ti_guard_alembic_version (version_num) VALUES ('0001') RETURNING version_num;

-- Running upgrade 0001 -> 0002

UPDATE ti_guard_alembic_version SET version_num='0002' WHERE ti_guard_alembic_version.version_num = '0001';

COMMIT;

