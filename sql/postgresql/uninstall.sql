BEGIN;

SET lock_timeout = '2000ms';


-- Running downgrade 0001 -> 

DROP TRIGGER IF EXISTS ti_guard_stamp_0a408b8b ON task_instance;


DROP TRIGGER IF EXISTS ti_guard_skip_d98dd220 ON task_instance;


DROP FUNCTION IF EXISTS ti_guard_refuse_e6ebcd2e();


DROP TABLE IF EXISTS ti_guard_settings;


DELETE FROM ti_guard_alembic_version WHERE ti_guard_alembic_version.version_num = '0001';

DROP TABLE ti_guard_alembic_version;


COMMIT;

