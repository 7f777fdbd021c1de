SET SESSION lock_wait_timeout = 2;


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
	refused_at DATETIME(6), 
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


DELIMITER //

CREATE TRIGGER ti_guard_guard_1684f395 BEFORE UPDATE ON task_instance FOR EACH ROW
BEGIN
    IF CAST(NEW.state AS BINARY) IN ('skipped', 'scheduled') THEN
        IF CAST(NEW.state AS BINARY) = 'skipped' THEN
            IF CAST(OLD.state AS BINARY) IN ('running', 'success', 'failed') THEN
                IF (NOT (NEW.start_date <=> OLD.start_date) OR (NOT (NEW.end_date <=> OLD.end_date) AND NEW.end_date <=> NEW.start_date)) AND NEW.duration <=> OLD.duration AND NOT (NEW.duration <=> 0) THEN
                    SET @ti_guard_granted = FALSE;
                    IF @ti_guard_bypass <=> 'on' THEN
                        SET @ti_guard_granted = EXISTS (SELECT 1 FROM information_schema.USER_PRIVILEGES WHERE PRIVILEGE_TYPE = 'TRIGGER' AND SUBSTRING_INDEX(REPLACE(GRANTEE, CHAR(39 USING ascii), ''), '@', 1) = SUBSTRING_INDEX(USER(), '@', 1) AND SUBSTRING_INDEX(USER(), '@', -1) LIKE SUBSTRING_INDEX(REPLACE(GRANTEE, CHAR(39 USING ascii), ''), '@', -1)) OR EXISTS (SELECT 1 FROM information_schema.SCHEMA_PRIVILEGES WHERE PRIVILEGE_TYPE = 'TRIGGER' AND TABLE_SCHEMA = DATABASE() AND SUBSTRING_INDEX(REPLACE(GRANTEE, CHAR(39 USING ascii), ''), '@', 1) = SUBSTRING_INDEX(USER(), '@', 1) AND SUBSTRING_INDEX(USER(), '@', -1) LIKE SUBSTRING_INDEX(REPLACE(GRANTEE, CHAR(39 USING ascii), ''), '@', -1)) OR EXISTS (SELECT 1 FROM information_schema.TABLE_PRIVILEGES WHERE PRIVILEGE_TYPE = 'TRIGGER' AND TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'task_instance' AND SUBSTRING_INDEX(REPLACE(GRANTEE, CHAR(39 USING ascii), ''), '@', 1) = SUBSTRING_INDEX(USER(), '@', 1) AND SUBSTRING_INDEX(USER(), '@', -1) LIKE SUBSTRING_INDEX(REPLACE(GRANTEE, CHAR(39 USING ascii), ''), '@', -1));
                    END IF;
                    IF NOT @ti_guard_granted THEN
                        BEGIN
                            DECLARE CONTINUE HANDLER FOR SQLEXCEPTION BEGIN END;
                            SET @ti_guard_seq = UUID_SHORT();
                            IF NOT (IS_USED_LOCK(CONCAT('ti_guard_lane_', COALESCE(@ti_guard_lane, -1))) <=> CONNECTION_ID()) THEN
                                SET @ti_guard_lane = 0, @ti_guard_tries = 1;
                                WHILE @ti_guard_tries <= 128 AND NOT (GET_LOCK(CONCAT('ti_guard_lane_', COALESCE(@ti_guard_lane, -1)), 0) <=> 1) DO
                                    SET @ti_guard_lane = IF(@ti_guard_tries = 128, 128 + CONNECTION_ID(), (@ti_guard_lane + 1) MOD 128),
                                        @ti_guard_tries = @ti_guard_tries + 1;
                                END WHILE;
                            END IF;
                            UPDATE ti_guard_refusals SET seq = @ti_guard_seq, refused_at = UTC_TIMESTAMP(6), rule = 'racy_skip',
                                action = 'keep', old_state = OLD.state, new_state = NEW.state, dag_id = OLD.dag_id, task_id = OLD.task_id,
                                run_id = OLD.run_id, map_index = OLD.map_index, writer_user = USER(), writer_pid = CONNECTION_ID()
                            WHERE @ti_guard_lane < 128 AND slot = @ti_guard_lane + 128 * (@ti_guard_seq MOD 78);
                            INSERT INTO ti_guard_refusal_counts (day, rule, action, old_state, new_state, connection_id, bucket, refusals)
                            VALUES (UTC_DATE(), 'racy_skip', 'keep', OLD.state, NEW.state, @ti_guard_lane, @ti_guard_seq MOD 1000, 1)
                            ON DUPLICATE KEY UPDATE refusals = refusals + 1;
                        END;
                        SET NEW.state = OLD.state,
                            NEW.start_date = OLD.start_date,
                            NEW.end_date = OLD.end_date,
                            NEW.updated_at = OLD.updated_at;
                    END IF;
                END IF;
            END IF;
            IF CAST(OLD.state AS BINARY) IN ('running', 'success', 'failed') THEN
                IF (NOT (NEW.start_date <=> OLD.start_date) OR (NOT (NEW.end_date <=> OLD.end_date) AND NEW.end_date <=> NEW.start_date)) AND NOT (NEW.duration <=> OLD.duration AND NOT (NEW.duration <=> 0)) THEN
                    SET @ti_guard_granted = FALSE;
                    IF @ti_guard_bypass <=> 'on' THEN
                        SET @ti_guard_granted = EXISTS (SELECT 1 FROM information_schema.USER_PRIVILEGES WHERE PRIVILEGE_TYPE = 'TRIGGER' AND SUBSTRING_INDEX(REPLACE(GRANTEE, CHAR(39 USING ascii), ''), '@', 1) = SUBSTRING_INDEX(USER(), '@', 1) AND SUBSTRING_INDEX(USER(), '@', -1) LIKE SUBSTRING_INDEX(REPLACE(GRANTEE, CHAR(39 USING ascii), ''), '@', -1)) OR EXISTS (SELECT 1 FROM information_schema.SCHEMA_PRIVILEGES WHERE PRIVILEGE_TYPE = 'TRIGGER' AND TABLE_SCHEMA = DATABASE() AND SUBSTRING_INDEX(REPLACE(GRANTEE, CHAR(39 USING ascii), ''), '@', 1) = SUBSTRING_INDEX(USER(), '@', 1) AND SUBSTRING_INDEX(USER(), '@', -1) LIKE SUBSTRING_INDEX(REPLACE(GRANTEE, CHAR(39 USING ascii), ''), '@', -1)) OR EXISTS (SELECT 1 FROM information_schema.TABLE_PRIVILEGES WHERE PRIVILEGE_TYPE = 'TRIGGER' AND TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'task_instance' AND SUBSTRING_INDEX(REPLACE(GRANTEE, CHAR(39 USING ascii), ''), '@', 1) = SUBSTRING_INDEX(USER(), '@', 1) AND SUBSTRING_INDEX(USER(), '@', -1) LIKE SUBSTRING_INDEX(REPLACE(GRANTEE, CHAR(39 USING ascii), ''), '@', -1));
                    END IF;
                    IF NOT @ti_guard_granted THEN
                        BEGIN
                            DECLARE CONTINUE HANDLER FOR SQLEXCEPTION BEGIN END;
                            SET @ti_guard_seq = UUID_SHORT();
                            IF NOT (IS_USED_LOCK(CONCAT('ti_guard_lane_', COALESCE(@ti_guard_lane, -1))) <=> CONNECTION_ID()) THEN
                                SET @ti_guard_lane = 0, @ti_guard_tries = 1;
                                WHILE @ti_guard_tries <= 128 AND NOT (GET_LOCK(CONCAT('ti_guard_lane_', COALESCE(@ti_guard_lane, -1)), 0) <=> 1) DO
                                    SET @ti_guard_lane = IF(@ti_guard_tries = 128, 128 + CONNECTION_ID(), (@ti_guard_lane + 1) MOD 128),
                                        @ti_guard_tries = @ti_guard_tries + 1;
                                END WHILE;
                            END IF;
                            UPDATE ti_guard_refusals SET seq = @ti_guard_seq, refused_at = UTC_TIMESTAMP(6), rule = 'stale_set_state_skip',
                                action = 'keep', old_state = OLD.state, new_state = NEW.state, dag_id = OLD.dag_id, task_id = OLD.task_id,
                                run_id = OLD.run_id, map_index = OLD.map_index, writer_user = USER(), writer_pid = CONNECTION_ID()
                            WHERE @ti_guard_lane < 128 AND slot = @ti_guard_lane + 128 * (@ti_guard_seq MOD 78);
                            INSERT INTO ti_guard_refusal_counts (day, rule, action, old_state, new_state, connection_id, bucket, refusals)
                            VALUES (UTC_DATE(), 'stale_set_state_skip', 'keep', OLD.state, NEW.state, @ti_guard_lane, @ti_guard_seq MOD 1000, 1)
                            ON DUPLICATE KEY UPDATE refusals = refusals + 1;
                        END;
                        SET NEW.state = OLD.state,
                            NEW.start_date = OLD.start_date,
                            NEW.end_date = OLD.end_date,
                            NEW.duration = OLD.duration,
                            NEW.updated_at = OLD.updated_at;
                    END IF;
                END IF;
            END IF;
            IF CAST(OLD.state AS BINARY) IN ('running') THEN
                IF NEW.end_date IS NOT NULL AND NEW.start_date <=> OLD.start_date THEN
                    SET @ti_guard_set_state = FALSE;
                    BEGIN
                        DECLARE EXIT HANDLER FOR SQLEXCEPTION SET @ti_guard_set_state = FALSE;
                        SET @ti_guard_statement = (SELECT e.SQL_TEXT FROM performance_schema.events_statements_current e JOIN performance_schema.threads t ON t.THREAD_ID = e.THREAD_ID WHERE t.PROCESSLIST_ID = CONNECTION_ID() AND e.NESTING_EVENT_LEVEL = 0 AND e.END_EVENT_ID IS NULL);
                        IF LOCATE(CHAR(92 USING ascii), @ti_guard_statement) = 0 THEN
                            SET @ti_guard_statement = REGEXP_SUBSTR(REGEXP_REPLACE(REGEXP_REPLACE(REGEXP_REPLACE(@ti_guard_statement, '(?i)[`"]next_method[`"]', 'next_method'), '(?i)[`"]start_date[`"]', 'start_date'), CONVERT(X'275b5e275d2a277c225b5e225d2a227c605b5e605d2a60' USING utf8mb4), ' '), '(?is)^[^A-Za-z0-9_$]*UPDATE[^A-Za-z0-9_$].*?[^A-Za-z0-9_$]SET[^A-Za-z0-9_$].*?[^A-Za-z0-9_$]WHERE[^A-Za-z0-9_$]');
                            SET @ti_guard_set_state = CHAR_LENGTH(@ti_guard_statement) > 0 AND CHAR_LENGTH(@ti_guard_statement) = LENGTH(@ti_guard_statement) AND NOT (@ti_guard_statement REGEXP CONVERT(X'5b272260235d7c2f5b2a5d7c2d2d' USING utf8mb4))
                                AND CHAR_LENGTH(REPLACE(@ti_guard_statement, '(', '')) = CHAR_LENGTH(REPLACE(@ti_guard_statement, ')', ''))
                                AND NOT (@ti_guard_statement REGEXP '(?i)(^|[^A-Za-z0-9_$])(next_method|start_date)([^A-Za-z0-9_$]|$)');
                        END IF;
                    END;
                    IF @ti_guard_set_state THEN
                        SET @ti_guard_granted = FALSE;
                        IF @ti_guard_bypass <=> 'on' THEN
                            SET @ti_guard_granted = EXISTS (SELECT 1 FROM information_schema.USER_PRIVILEGES WHERE PRIVILEGE_TYPE = 'TRIGGER' AND SUBSTRING_INDEX(REPLACE(GRANTEE, CHAR(39 USING ascii), ''), '@', 1) = SUBSTRING_INDEX(USER(), '@', 1) AND SUBSTRING_INDEX(USER(), '@', -1) LIKE SUBSTRING_INDEX(REPLACE(GRANTEE, CHAR(39 USING ascii), ''), '@', -1)) OR EXISTS (SELECT 1 FROM information_schema.SCHEMA_PRIVILEGES WHERE PRIVILEGE_TYPE = 'TRIGGER' AND TABLE_SCHEMA = DATABASE() AND SUBSTRING_INDEX(REPLACE(GRANTEE, CHAR(39 USING ascii), ''), '@', 1) = SUBSTRING_INDEX(USER(), '@', 1) AND SUBSTRING_INDEX(USER(), '@', -1) LIKE SUBSTRING_INDEX(REPLACE(GRANTEE, CHAR(39 USING ascii), ''), '@', -1)) OR EXISTS (SELECT 1 FROM information_schema.TABLE_PRIVILEGES WHERE PRIVILEGE_TYPE = 'TRIGGER' AND TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'task_instance' AND SUBSTRING_INDEX(REPLACE(GRANTEE, CHAR(39 USING ascii), ''), '@', 1) = SUBSTRING_INDEX(USER(), '@', 1) AND SUBSTRING_INDEX(USER(), '@', -1) LIKE SUBSTRING_INDEX(REPLACE(GRANTEE, CHAR(39 USING ascii), ''), '@', -1));
                        END IF;
                        IF NOT @ti_guard_granted THEN
                            BEGIN
                                DECLARE CONTINUE HANDLER FOR SQLEXCEPTION BEGIN END;
                                SET @ti_guard_seq = UUID_SHORT();
                                IF NOT (IS_USED_LOCK(CONCAT('ti_guard_lane_', COALESCE(@ti_guard_lane, -1))) <=> CONNECTION_ID()) THEN
                                    SET @ti_guard_lane = 0, @ti_guard_tries = 1;
                                    WHILE @ti_guard_tries <= 128 AND NOT (GET_LOCK(CONCAT('ti_guard_lane_', COALESCE(@ti_guard_lane, -1)), 0) <=> 1) DO
                                        SET @ti_guard_lane = IF(@ti_guard_tries = 128, 128 + CONNECTION_ID(), (@ti_guard_lane + 1) MOD 128),
                                            @ti_guard_tries = @ti_guard_tries + 1;
                                    END WHILE;
                                END IF;
                                UPDATE ti_guard_refusals SET seq = @ti_guard_seq, refused_at = UTC_TIMESTAMP(6), rule = 'set_state_skip',
                                    action = 'keep', old_state = OLD.state, new_state = NEW.state, dag_id = OLD.dag_id, task_id = OLD.task_id,
                                    run_id = OLD.run_id, map_index = OLD.map_index, writer_user = USER(), writer_pid = CONNECTION_ID()
                                WHERE @ti_guard_lane < 128 AND slot = @ti_guard_lane + 128 * (@ti_guard_seq MOD 78);
                                INSERT INTO ti_guard_refusal_counts (day, rule, action, old_state, new_state, connection_id, bucket, refusals)
                                VALUES (UTC_DATE(), 'set_state_skip', 'keep', OLD.state, NEW.state, @ti_guard_lane, @ti_guard_seq MOD 1000, 1)
                                ON DUPLICATE KEY UPDATE refusals = refusals + 1;
                            END;
                            SET NEW.state = OLD.state,
                                NEW.end_date = OLD.end_date,
                                NEW.duration = OLD.duration,
                                NEW.updated_at = OLD.updated_at;
                        END IF;
                    END IF;
                END IF;
            END IF;
        END IF;
        IF CAST(NEW.state AS BINARY) = 'scheduled' THEN
            IF CAST(OLD.state AS BINARY) IN ('running', 'success', 'failed') THEN
                IF NOT (NEW.try_number <=> OLD.try_number) THEN
                    SET @ti_guard_granted = FALSE;
                    IF @ti_guard_bypass <=> 'on' THEN
                        SET @ti_guard_granted = EXISTS (SELECT 1 FROM information_schema.USER_PRIVILEGES WHERE PRIVILEGE_TYPE = 'TRIGGER' AND SUBSTRING_INDEX(REPLACE(GRANTEE, CHAR(39 USING ascii), ''), '@', 1) = SUBSTRING_INDEX(USER(), '@', 1) AND SUBSTRING_INDEX(USER(), '@', -1) LIKE SUBSTRING_INDEX(REPLACE(GRANTEE, CHAR(39 USING ascii), ''), '@', -1)) OR EXISTS (SELECT 1 FROM information_schema.SCHEMA_PRIVILEGES WHERE PRIVILEGE_TYPE = 'TRIGGER' AND TABLE_SCHEMA = DATABASE() AND SUBSTRING_INDEX(REPLACE(GRANTEE, CHAR(39 USING ascii), ''), '@', 1) = SUBSTRING_INDEX(USER(), '@', 1) AND SUBSTRING_INDEX(USER(), '@', -1) LIKE SUBSTRING_INDEX(REPLACE(GRANTEE, CHAR(39 USING ascii), ''), '@', -1)) OR EXISTS (SELECT 1 FROM information_schema.TABLE_PRIVILEGES WHERE PRIVILEGE_TYPE = 'TRIGGER' AND TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'task_instance' AND SUBSTRING_INDEX(REPLACE(GRANTEE, CHAR(39 USING ascii), ''), '@', 1) = SUBSTRING_INDEX(USER(), '@', 1) AND SUBSTRING_INDEX(USER(), '@', -1) LIKE SUBSTRING_INDEX(REPLACE(GRANTEE, CHAR(39 USING ascii), ''), '@', -1));
                    END IF;
                    IF NOT @ti_guard_granted THEN
                        BEGIN
                            DECLARE CONTINUE HANDLER FOR SQLEXCEPTION BEGIN END;
                            SET @ti_guard_seq = UUID_SHORT();
                            IF NOT (IS_USED_LOCK(CONCAT('ti_guard_lane_', COALESCE(@ti_guard_lane, -1))) <=> CONNECTION_ID()) THEN
                                SET @ti_guard_lane = 0, @ti_guard_tries = 1;
                                WHILE @ti_guard_tries <= 128 AND NOT (GET_LOCK(CONCAT('ti_guard_lane_', COALESCE(@ti_guard_lane, -1)), 0) <=> 1) DO
                                    SET @ti_guard_lane = IF(@ti_guard_tries = 128, 128 + CONNECTION_ID(), (@ti_guard_lane + 1) MOD 128),
                                        @ti_guard_tries = @ti_guard_tries + 1;
                                END WHILE;
                            END IF;
                            UPDATE ti_guard_refusals SET seq = @ti_guard_seq, refused_at = UTC_TIMESTAMP(6), rule = 'stale_schedule',
                                action = 'keep', old_state = OLD.state, new_state = NEW.state, dag_id = OLD.dag_id, task_id = OLD.task_id,
                                run_id = OLD.run_id, map_index = OLD.map_index, writer_user = USER(), writer_pid = CONNECTION_ID()
                            WHERE @ti_guard_lane < 128 AND slot = @ti_guard_lane + 128 * (@ti_guard_seq MOD 78);
                            INSERT INTO ti_guard_refusal_counts (day, rule, action, old_state, new_state, connection_id, bucket, refusals)
                            VALUES (UTC_DATE(), 'stale_schedule', 'keep', OLD.state, NEW.state, @ti_guard_lane, @ti_guard_seq MOD 1000, 1)
                            ON DUPLICATE KEY UPDATE refusals = refusals + 1;
                        END;
                        SET NEW.state = OLD.state,
                            NEW.try_number = OLD.try_number,
                            NEW.scheduled_dttm = OLD.scheduled_dttm,
                            NEW.updated_at = OLD.updated_at;
                    END IF;
                END IF;
            END IF;
        END IF;
    END IF;
END
//

DELIMITER ;


INSERT INTO ti_guard_settings (id, mode, protect, guarded_table, definition, installed_at, rules) VALUES (1, 'ignore', 'running,success,failed', 'task_instance', 'ti_guard_guard_1684f395', CURRENT_TIMESTAMP, 'racy_skip,stale_set_state_skip,set_state_skip,stale_schedule');


INSERT INTO ti_guard_alembic_version (version_num) VALUES ('0001');

-- Running upgrade 0001 -> 0002

UPDATE ti_guard_alembic_version SET version_num='0002' WHERE ti_guard_alembic_version.version_num = '0001';

