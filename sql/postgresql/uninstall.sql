BEGIN;

SET lock_timeout = '2000ms';


-- Running downgrade 0002 -> 0001

UPDATE ti_guard_alembic_version SET version_num='0001' WHERE ti_guard_alembic_version.version_num = '0002';

-- Running downgrade 0001 -> 

DROP TRIGGER IF EXISTS ti_guard_stale_schedule_6ea43246 ON task_instance;


DROP TRIGGER IF EXISTS ti_guard_set_state_skip_keep_59cf29cc ON task_instance;


DROP TRIGGER IF EXISTS ti_guard_set_state_skip_finish_b788cf94 ON task_instance;


DROP TRIGGER IF EXISTS ti_guard_stale_set_state_skip_7b6d1126 ON task_instance;


DROP TRIGGER IF EXISTS ti_guard_racy_skip_699e452b ON task_instance;


DROP FUNCTION IF EXISTS ti_guard_guard_f329f6fc();


DROP TABLE IF EXISTS ti_guard_refusals;


DROP TABLE IF EXISTS ti_guard_refusal_counts;


DROP SEQUENCE IF EXISTS ti_guard_refusal_seq;


DROP TABLE IF EXISTS ti_guard_settings;


DELETE FROM ti_guard_alembic_version WHERE ti_guard_alembic_version.version_num = '0001';

DROP TABLE ti_guard_alembic_version;


COMMIT;

