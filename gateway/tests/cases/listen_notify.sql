-- LISTEN/NOTIFY as psql shows them: psql prints a notification after the command during
-- which it arrived. A session hears its own notifications at the end of the notifying
-- transaction.
LISTEN chan;
SELECT pg_listening_channels();
NOTIFY chan;
NOTIFY chan, 'with payload';
SELECT pg_notify('chan', 'from pg_notify');
-- Not listening on this one.
NOTIFY other, 'unheard';
SELECT 'after unheard';
-- Inside a transaction: delivered at commit, duplicates folded, none on rollback.
BEGIN;
NOTIFY chan, 'in tx';
NOTIFY chan, 'in tx';
NOTIFY chan, 'second';
SELECT 'still in the transaction';
COMMIT;
BEGIN;
NOTIFY chan, 'rolled back';
ROLLBACK;
SELECT 'after rollback';
-- Quoted and case-sensitive channel names.
LISTEN "Mixed Case";
NOTIFY "Mixed Case", 'mixed';
SELECT pg_listening_channels() ORDER BY 1;
-- UNLISTEN one, then all.
UNLISTEN chan;
NOTIFY chan, 'after unlisten';
SELECT pg_listening_channels() ORDER BY 1;
UNLISTEN *;
NOTIFY "Mixed Case", 'after unlisten all';
SELECT count(*) FROM pg_listening_channels();
-- LISTEN in a rolled-back transaction does not take effect.
BEGIN;
LISTEN never;
ROLLBACK;
NOTIFY never, 'x';
SELECT count(*) FROM pg_listening_channels();
-- Errors.
SELECT pg_notify('chan', repeat('x', 9000));
SELECT pg_notify(NULL, 'x');
LISTEN chan;
DISCARD ALL;
SELECT count(*) FROM pg_listening_channels();
