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

CREATE TRIGGER ti_guard_guard_38888e2a BEFORE UPDATE ON task_instance FOR EACH ROW
BEGIN
    IF CAST(NEW.state AS BINARY) IN ('skipped', 'scheduled') THEN
        IF CAST(NEW.state AS BINARY) = 'skipped' THEN
            IF CAST(OLD.state AS BINARY) IN ('running', 'success', 'failed') THEN
                IF NOT (NEW.start_date <=> OLD.start_date) OR (NOT (NEW.end_date <=> OLD.end_date) AND NEW.end_date <=> NEW.start_date) THEN
                    IF @ti_guard_bypass IS NOT NULL AND NOT (@ti_guard_bypass_at <=> CONCAT(@ti_guard_bypass, '@', NOW(6))) THEN
                        DO SLEEP(0.11);
                        IF @ti_guard_bypass <=> (SELECT trx_id FROM information_schema.INNODB_TRX WHERE trx_mysql_thread_id = CONNECTION_ID()) THEN
                            SET @ti_guard_bypass_at = CONCAT(@ti_guard_bypass, '@', NOW(6));
                        END IF;
                    END IF;
                    IF @ti_guard_bypass IS NULL OR NOT (@ti_guard_bypass_at <=> CONCAT(@ti_guard_bypass, '@', NOW(6))) THEN
                        SET NEW.state = OLD.state,
                            NEW.start_date = OLD.start_date,
                            NEW.end_date = OLD.end_date,
                            NEW.updated_at = OLD.updated_at;
                    END IF;
                END IF;
            END IF;
        END IF;
        IF CAST(NEW.state AS BINARY) = 'scheduled' THEN
            IF CAST(OLD.state AS BINARY) IN ('running', 'success', 'failed') THEN
                IF NOT (NEW.try_number <=> OLD.try_number) THEN
                    IF @ti_guard_bypass IS NOT NULL AND NOT (@ti_guard_bypass_at <=> CONCAT(@ti_guard_bypass, '@', NOW(6))) THEN
                        DO SLEEP(0.11);
                        IF @ti_guard_bypass <=> (SELECT trx_id FROM information_schema.INNODB_TRX WHERE trx_mysql_thread_id = CONNECTION_ID()) THEN
                            SET @ti_guard_bypass_at = CONCAT(@ti_guard_bypass, '@', NOW(6));
                        END IF;
                    END IF;
                    IF @ti_guard_bypass IS NULL OR NOT (@ti_guard_bypass_at <=> CONCAT(@ti_guard_bypass, '@', NOW(6))) THEN
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


INSERT INTO ti_guard_settings (id, mode, protect, guarded_table, definition, installed_at) VALUES (1, 'ignore', 'running,success,failed', 'task_instance', 'ti_guard_guard_38888e2a', CURRENT_TIMESTAMP);


INSERT INTO ti_guard_alembic_version (version_num) VALUES ('0001');

