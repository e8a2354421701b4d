-- A session signalling itself by the pid its client knows (BackendKeyData, pg_backend_pid()):
-- Postgres checks the current role against the role the session logged in as, and a signal to
-- itself lands in the very statement that sent it.
SELECT pg_backend_pid() AS me \gset
SELECT pg_backend_pid() = :me AS same_pid;
-- A cancel cancels the statement that asked.
SELECT pg_cancel_backend(:me);
SELECT pg_cancel_backend(pg_backend_pid());
SELECT 1 AS after_cancel;
BEGIN;
SELECT pg_cancel_backend(:me);
SELECT 1 AS aborted;
ROLLBACK;
-- Not reached: nothing is signalled.
SELECT pg_cancel_backend(:me) WHERE false;
SELECT pg_terminate_backend(:me) FROM generate_series(1, 0);
BEGIN;
SELECT 1/0;
SELECT pg_terminate_backend(:me);
ROLLBACK;
-- Judged by the current role: one without alice's privileges may not signal her session,
-- this one included.
SET ROLE tp_nobody;
SELECT pg_cancel_backend(:me);
SELECT pg_terminate_backend(pg_backend_pid());
SELECT pg_cancel_backend(:me) AS other_columns, 1 AS too;
RESET ROLE;
SELECT current_user;
-- Terminating itself ends the session: psql reports the lost connection and stops.
SELECT pg_terminate_backend(:me);
SELECT 'never reached';
