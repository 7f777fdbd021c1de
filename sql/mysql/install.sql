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
	definition VARCHAR(200) NOT NULL, 
	installed_at DATETIME NOT NULL, 
	PRIMARY KEY (id)
);


DELIMITER //

CREATE TRIGGER ti_guard_skip_e2e23c15 BEFORE UPDATE ON task_instance FOR EACH ROW
BEGIN
    IF CAST(NEW.state AS BINARY) = 'skipped' THEN
        IF CAST(OLD.state AS BINARY) IN ('running', 'success', 'failed') THEN
            IF NOT (CAST(OLD.state AS BINARY) = 'running' AND NEW.end_date IS NOT NULL AND NEW.start_date <=> OLD.start_date AND NOT (NEW.end_date <=> NEW.start_date)) THEN
                IF @ti_guard_bypass IS NOT NULL AND NOT (@ti_guard_bypass_at <=> CONCAT(@ti_guard_bypass, '@', NOW(6))) THEN
                    DO SLEEP(0.11);
                    IF @ti_guard_bypass <=> (SELECT trx_id FROM information_schema.INNODB_TRX WHERE trx_mysql_thread_id = CONNECTION_ID()) THEN
                        SET @ti_guard_bypass_at = CONCAT(@ti_guard_bypass, '@', NOW(6));
                    END IF;
                END IF;
                IF @ti_guard_bypass IS NULL OR NOT (@ti_guard_bypass_at <=> CONCAT(@ti_guard_bypass, '@', NOW(6))) THEN
                    SET @ti_guard_refusal = LEFT(CONCAT('ti_guard: refused ', OLD.state, ' -> skipped for dag_id=', OLD.dag_id,
                        ' task_id=', OLD.task_id, ' map_index=', OLD.map_index, ' run_id=', OLD.run_id), 128);
                    SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = @ti_guard_refusal;
                END IF;
            END IF;
        END IF;
    END IF;
END
//

DELIMITER ;


INSERT INTO ti_guard_settings (id, mode, protect, guarded_table, definition, installed_at) VALUES (1, 'raise', 'running,success,failed', 'task_instance', 'ti_guard_skip_e2e23c15', CURRENT_TIMESTAMP);


INSERT INTO ti_guard_alembic_version (version_num) VALUES ('0001');

