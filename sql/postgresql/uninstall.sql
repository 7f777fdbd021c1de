BEGIN;

SET lock_timeout = '2000ms';


-- Running downgrade 0001 -> 

DROP TRIGGER IF EXISTS ti_guard_stale_schedule_37f61790 ON task_instance;


DROP TRIGGER IF EXISTS ti_guard_set_state_skip_keep_d055364c ON task_instance;


DROP TRIGGER IF EXISTS ti_guard_set_state_skip_finish_39e0212f ON task_instance;


DROP TRIGGER IF EXISTS ti_guard_racy_skip_9e8caadf ON task_instance;


DROP FUNCTION IF EXISTS ti_guard_guard_a3e66481();


DROP TABLE IF EXISTS ti_guard_refusals;


DROP TABLE IF EXISTS ti_guard_refusal_counts;


DROP SEQUENCE IF EXISTS ti_guard_refusal_seq;


DROP TABLE IF EXISTS ti_guard_settings;


DELETE FROM ti_guard_alembic_version WHERE ti_guard_alembic_version.version_num = '0001';

DROP TABLE ti_guard_alembic_version;


COMMIT;

