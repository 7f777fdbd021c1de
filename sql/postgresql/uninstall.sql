BEGIN;

SET lock_timeout = '2000ms';


-- Running downgrade 0001 -> 

DROP TRIGGER IF EXISTS ti_guard_stale_schedule_2096716a ON task_instance;


DROP TRIGGER IF EXISTS ti_guard_set_state_skip_keep_a9653a0b ON task_instance;


DROP TRIGGER IF EXISTS ti_guard_set_state_skip_finish_3b832c7c ON task_instance;


DROP TRIGGER IF EXISTS ti_guard_racy_skip_c8887574 ON task_instance;


DROP FUNCTION IF EXISTS ti_guard_guard_3bb52bdf();


DROP FUNCTION IF EXISTS ti_guard_record_1450293c(p_schema text, p_rule text, p_action text, p_old_state text, p_new_state text, p_dag_id text, p_task_id text, p_run_id text, p_map_index integer);


DROP TABLE IF EXISTS ti_guard_refusals;


DROP TABLE IF EXISTS ti_guard_refusal_counts;


DROP SEQUENCE IF EXISTS ti_guard_refusal_seq;


DROP TABLE IF EXISTS ti_guard_settings;


DELETE FROM ti_guard_alembic_version WHERE ti_guard_alembic_version.version_num = '0001';

DROP TABLE ti_guard_alembic_version;


COMMIT;

