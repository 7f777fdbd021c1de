BEGIN;

PRAGMA busy_timeout = 2000;


-- Running downgrade 0002 -> 0001

UPDATE ti_guard_alembic_version SET version_num='0001' WHERE ti_guard_alembic_version.version_num = '0002';

-- Running downgrade 0001 -> 

DROP TRIGGER IF EXISTS ti_guard_stale_schedule_7c868685;


DROP TRIGGER IF EXISTS ti_guard_stale_set_state_skip_40795438;


DROP TRIGGER IF EXISTS ti_guard_racy_skip_b2e8baaf;


DROP TABLE IF EXISTS ti_guard_refusals;


DROP TABLE IF EXISTS ti_guard_refusal_counts;


DROP TABLE IF EXISTS ti_guard_settings;


DELETE FROM ti_guard_alembic_version WHERE ti_guard_alembic_version.version_num = '0001';

DROP TABLE ti_guard_alembic_version;


COMMIT;

