-- LISTEN/UNLISTEN take effect at commit, not at all on rollback, also in an implicit
-- transaction (one query string with several statements) that fails. Through Tidepool no
-- backend is pinned: the channels follow the session from backend to backend.
BEGIN;
LISTEN a;
-- Not yet: a pending LISTEN is not listed before commit.
SELECT count(*) FROM pg_listening_channels();
COMMIT;
SELECT pg_listening_channels() ORDER BY 1;
BEGIN;
UNLISTEN a;
SELECT pg_listening_channels() ORDER BY 1;
ROLLBACK;
SELECT pg_listening_channels() ORDER BY 1;
NOTIFY a, 'still listening';
-- An implicit transaction that fails: its LISTEN never happened.
SELECT 'first' \; LISTEN c \; SELECT 1 / 0;
SELECT pg_listening_channels() ORDER BY 1;
-- UNLISTEN then NOTIFY in one transaction: not heard (the channel is checked on reading).
UNLISTEN a \; NOTIFY a, 'unheard';
SELECT count(*) FROM pg_listening_channels();
-- LISTEN then UNLISTEN * in one transaction: nothing.
BEGIN;
LISTEN d;
LISTEN e;
UNLISTEN *;
COMMIT;
SELECT count(*) FROM pg_listening_channels();
NOTIFY d, 'unheard';
-- A notification that arrives while the listener is in a transaction comes at its end.
LISTEN f;
BEGIN;
SELECT 'in transaction';
NOTIFY f, 'own, at commit';
SELECT 'still in transaction';
COMMIT;
SELECT 'after';
-- LISTEN and NOTIFY in one transaction: the session hears itself at the end of it, in an
-- implicit transaction and in an explicit one (Postgres makes it a listener before it queues
-- its notifications at commit).
UNLISTEN *;
LISTEN g \; NOTIFY g, 'same implicit transaction';
BEGIN;
LISTEN "Quoted H";
NOTIFY "Quoted H", 'same transaction';
SELECT 'before commit';
COMMIT;
/* a comment */ listen MixedI \; select pg_notify('mixedi', 'folded name');
-- Rolled back, or failed: neither happened.
BEGIN;
LISTEN j;
NOTIFY j, 'rolled back';
ROLLBACK;
LISTEN k \; NOTIFY k, 'failed' \; SELECT 1 / 0;
SELECT pg_listening_channels() ORDER BY 1;
NOTIFY j, 'not listening';
NOTIFY k, 'not listening';
SELECT 'end';
