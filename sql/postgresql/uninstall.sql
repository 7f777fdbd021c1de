BEGIN;

SET lock_timeout = '2000ms';


-- Running downgrade 0001 -> 

DROP TRIGGER IF EXISTS ti_guard_stale_schedule_5dc7dbc2 ON task_instance;


DROP TRIGGER IF EXISTS ti_guard_set_state_skip_keep_8992f6ac ON task_instance;


DROP TRIGGER IF EXISTS ti_guard_set_state_skip_finish_75973cdc ON task_instance;


DROP TRIGGER IF EXISTS ti_guard_racy_skip_57ace88d ON task_instance;


DROP FUNCTION IF EXISTS ti_guard_guard_4b8c4f49();


DROP TABLE IF EXISTS ti_guard_settings;


DELETE FROM ti_guard_alembic_version WHERE ti_guard_alembic_version.version_num = '0001';

DROP TABLE ti_guard_alembic_version;


COMMIT;

