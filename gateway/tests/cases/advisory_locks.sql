-- Session advisory locks are held by the session until released (Tidepool keeps the session on
-- its backend meanwhile); transaction-level ones until the transaction ends.
CREATE VIEW my_advisory AS
  SELECT classid, objid, mode, granted FROM pg_locks
  WHERE locktype = 'advisory' AND pid = pg_backend_pid();
SELECT pg_advisory_lock(1);
SELECT pg_try_advisory_lock(2);
SELECT pg_advisory_lock_shared(3);
SELECT pg_advisory_lock(4, 5);
SELECT * FROM my_advisory ORDER BY classid, objid, mode;
-- Re-entrant: locked twice, unlocked twice.
SELECT pg_advisory_lock(1);
SELECT pg_advisory_unlock(1);
SELECT count(*) FROM my_advisory WHERE objid = 1;
SELECT pg_advisory_unlock(1);
SELECT count(*) FROM my_advisory WHERE objid = 1;
-- Unlocking what is not held: false and a WARNING.
SELECT pg_advisory_unlock(1);
SELECT pg_advisory_unlock_shared(99);
-- Transaction-level locks go away at commit.
BEGIN;
SELECT pg_advisory_xact_lock(10);
SELECT pg_try_advisory_xact_lock(11);
SELECT objid FROM my_advisory ORDER BY objid;
COMMIT;
SELECT objid FROM my_advisory ORDER BY objid;
-- A session lock taken in a transaction that rolls back is still held.
BEGIN;
SELECT pg_advisory_lock(12);
ROLLBACK;
SELECT objid FROM my_advisory WHERE objid = 12;
-- unlock_all releases every session lock.
SELECT pg_advisory_unlock_all();
SELECT count(*) FROM my_advisory;
-- Lock again after unlock_all; DISCARD ALL releases them too.
SELECT pg_advisory_lock(13);
DISCARD ALL;
SELECT count(*) FROM my_advisory;
DROP VIEW my_advisory;
