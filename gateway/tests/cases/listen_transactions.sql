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
