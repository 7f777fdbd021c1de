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

CREATE TRIGGER ti_guard_guard_c6ae5090 BEFORE UPDATE ON task_instance FOR EACH ROW
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
                        SET NEW.id = OLD.id,
                            NEW.task_id = OLD.task_id,
                            NEW.dag_id = OLD.dag_id,
                            NEW.run_id = OLD.run_id,
                            NEW.map_index = OLD.map_index,
                            NEW.start_date = OLD.start_date,
                            NEW.end_date = OLD.end_date,
                            NEW.duration = OLD.duration,
                            NEW.state = OLD.state,
                            NEW.try_number = OLD.try_number,
                            NEW.max_tries = OLD.max_tries,
                            NEW.hostname = OLD.hostname,
                            NEW.unixname = OLD.unixname,
                            NEW.pool = OLD.pool,
                            NEW.pool_slots = OLD.pool_slots,
                            NEW.queue = OLD.queue,
                            NEW.priority_weight = OLD.priority_weight,
                            NEW.operator = OLD.operator,
                            NEW.custom_operator_name = OLD.custom_operator_name,
                            NEW.queued_dttm = OLD.queued_dttm,
                            NEW.scheduled_dttm = OLD.scheduled_dttm,
                            NEW.queued_by_job_id = OLD.queued_by_job_id,
                            NEW.last_heartbeat_at = OLD.last_heartbeat_at,
                            NEW.pid = OLD.pid,
                            NEW.executor = OLD.executor,
                            NEW.executor_config = OLD.executor_config,
                            NEW.updated_at = OLD.updated_at,
                            NEW.rendered_map_index = OLD.rendered_map_index,
                            NEW.context_carrier = OLD.context_carrier,
                            NEW.span_status = OLD.span_status,
                            NEW.external_executor_id = OLD.external_executor_id,
                            NEW.trigger_id = OLD.trigger_id,
                            NEW.trigger_timeout = OLD.trigger_timeout,
                            NEW.next_method = OLD.next_method,
                            NEW.next_kwargs = OLD.next_kwargs,
                            NEW.task_display_name = OLD.task_display_name,
                            NEW.dag_version_id = OLD.dag_version_id,
                            NEW.retry_delay_override = OLD.retry_delay_override,
                            NEW.retry_reason = OLD.retry_reason;
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
                        SET NEW.id = OLD.id,
                            NEW.task_id = OLD.task_id,
                            NEW.dag_id = OLD.dag_id,
                            NEW.run_id = OLD.run_id,
                            NEW.map_index = OLD.map_index,
                            NEW.start_date = OLD.start_date,
                            NEW.end_date = OLD.end_date,
                            NEW.duration = OLD.duration,
                            NEW.state = OLD.state,
                            NEW.try_number = OLD.try_number,
                            NEW.max_tries = OLD.max_tries,
                            NEW.hostname = OLD.hostname,
                            NEW.unixname = OLD.unixname,
                            NEW.pool = OLD.pool,
                            NEW.pool_slots = OLD.pool_slots,
                            NEW.queue = OLD.queue,
                            NEW.priority_weight = OLD.priority_weight,
                            NEW.operator = OLD.operator,
                            NEW.custom_operator_name = OLD.custom_operator_name,
                            NEW.queued_dttm = OLD.queued_dttm,
                            NEW.scheduled_dttm = OLD.scheduled_dttm,
                            NEW.queued_by_job_id = OLD.queued_by_job_id,
                            NEW.last_heartbeat_at = OLD.last_heartbeat_at,
                            NEW.pid = OLD.pid,
                            NEW.executor = OLD.executor,
                            NEW.executor_config = OLD.executor_config,
                            NEW.updated_at = OLD.updated_at,
                            NEW.rendered_map_index = OLD.rendered_map_index,
                            NEW.context_carrier = OLD.context_carrier,
                            NEW.span_status = OLD.span_status,
                            NEW.external_executor_id = OLD.external_executor_id,
                            NEW.trigger_id = OLD.trigger_id,
                            NEW.trigger_timeout = OLD.trigger_timeout,
                            NEW.next_method = OLD.next_method,
                            NEW.next_kwargs = OLD.next_kwargs,
                            NEW.task_display_name = OLD.task_display_name,
                            NEW.dag_version_id = OLD.dag_version_id,
                            NEW.retry_delay_override = OLD.retry_delay_override,
                            NEW.retry_reason = OLD.retry_reason;
                    END IF;
                END IF;
            END IF;
        END IF;
    END IF;
END
//

DELIMITER ;


INSERT INTO ti_guard_settings (id, mode, protect, guarded_table, definition, installed_at) VALUES (1, 'ignore', 'running,success,failed', 'task_instance', 'ti_guard_guard_c6ae5090', CURRENT_TIMESTAMP);


INSERT INTO ti_guard_alembic_version (version_num) VALUES ('0001');

