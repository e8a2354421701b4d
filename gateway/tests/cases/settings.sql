-- Session settings: SET, SET LOCAL, RESET, RESET ALL, DISCARD ALL, set_config, and SHOW after
-- each. Through Tidepool these live in the gateway's session and follow it to any backend, so
-- every statement here may run on a different backend.
SHOW work_mem;
SET work_mem = '8MB';
SHOW work_mem;
SELECT current_setting('work_mem');
SET search_path = pg_catalog, public;
SHOW search_path;
SET TIME ZONE 'Pacific/Auckland';
SHOW TimeZone;
SELECT '2024-01-01 00:00:00+00'::timestamptz;
SET datestyle = 'SQL, DMY';
SELECT '2024-03-04'::date, '2024-03-04 05:06:07+00'::timestamptz;
SET intervalstyle = 'iso_8601';
SELECT interval '1 day 2 hours';
SET extra_float_digits = 0;
SELECT 0.1::float8 + 0.2::float8;
SET bytea_output = 'escape';
SELECT 'ab\000c'::bytea;
SET statement_timeout = '5s';
SHOW statement_timeout;
SET application_name = 'differential';
SHOW application_name;
SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid();
-- A custom (placeholder) setting.
SET myapp.tenant = 'acme';
SHOW myapp.tenant;
SELECT current_setting('myapp.tenant'), current_setting('myapp.missing', true);
SHOW myapp.missing;

-- SET LOCAL lasts until the end of the transaction.
BEGIN;
SET LOCAL work_mem = '16MB';
SHOW work_mem;
SET LOCAL TIME ZONE 'UTC';
SHOW TimeZone;
COMMIT;
SHOW work_mem;
SHOW TimeZone;
SET LOCAL work_mem = '32MB';
SHOW work_mem;

-- SET inside a transaction that rolls back is undone; inside one that commits it stays.
BEGIN;
SET work_mem = '20MB';
SHOW work_mem;
ROLLBACK;
SHOW work_mem;
BEGIN;
SET work_mem = '21MB';
COMMIT;
SHOW work_mem;
-- ... and a savepoint rolled back undoes what was set after it.
BEGIN;
SET work_mem = '22MB';
SAVEPOINT s;
SET work_mem = '23MB';
SHOW work_mem;
ROLLBACK TO s;
SHOW work_mem;
COMMIT;
SHOW work_mem;
-- ... and an error aborts the SET of that transaction.
BEGIN;
SET work_mem = '24MB';
SELECT 1 / 0;
ROLLBACK;
SHOW work_mem;

-- set_config: session-wide (false) and transaction-local (true).
SELECT set_config('work_mem', '9MB', false);
SHOW work_mem;
BEGIN;
SELECT set_config('work_mem', '10MB', true);
SHOW work_mem;
COMMIT;
SHOW work_mem;
SELECT set_config('myapp.user', 'bob', false), current_setting('myapp.user');
SELECT set_config('search_path', 'public', false) FROM generate_series(1, 2);

-- Errors: unknown setting, bad value, one that cannot change now.
SET no_such_setting = 1;
SET work_mem = 'lots';
SET port = 1;
SHOW no_such_setting;
SET transaction_isolation = 'serializable';
RESET no_such_setting;

-- RESET one, SET ... TO DEFAULT, RESET ALL.
RESET work_mem;
SHOW work_mem;
SET datestyle TO DEFAULT;
SHOW datestyle;
SHOW TimeZone;
RESET ALL;
SHOW search_path;
SHOW TimeZone;
SHOW statement_timeout;
SHOW application_name;
SHOW myapp.tenant;
SHOW extra_float_digits;

-- RESET ALL / DISCARD ALL inside a transaction.
BEGIN;
SET work_mem = '11MB';
RESET ALL;
SHOW work_mem;
DISCARD ALL;
ROLLBACK;

-- DISCARD ALL drops settings, prepared statements, temp tables and more.
SET work_mem = '12MB';
SET application_name = 'before discard';
PREPARE p AS SELECT 1;
CREATE TEMP TABLE t (x int);
DISCARD ALL;
SHOW work_mem;
SHOW application_name;
EXECUTE p;
SELECT * FROM t;
-- Settings given in a multi-statement query.
SET work_mem = '13MB' \; SHOW work_mem \; RESET work_mem \; SHOW work_mem;
-- SET ROLE to oneself, RESET ROLE, SET SESSION AUTHORIZATION DEFAULT.
SET ROLE alice;
SELECT current_user, session_user;
RESET ROLE;
SELECT current_user;
SET SESSION AUTHORIZATION DEFAULT;
SELECT current_user;
