BEGIN;

PRAGMA busy_timeout = 2000;


-- Running downgrade 0001 -> 

DROP TRIGGER IF EXISTS ti_guard_stamp_2f3c4cb7;


DROP TRIGGER IF EXISTS ti_guard_skip_da2d7727;


DROP TABLE IF EXISTS ti_guard_settings;


DELETE FROM ti_guard_alembic_version WHERE ti_guard_alembic_version.version_num = '0001';

DROP TABLE ti_guard_alembic_version;


COMMIT;

