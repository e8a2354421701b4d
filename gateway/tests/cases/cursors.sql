-- Cursors: inside a transaction, and WITH HOLD cursors that outlive it (the session keeps its
-- backend while one is open).
CREATE TABLE nums AS SELECT g AS n FROM generate_series(1, 20) g;
DECLARE outside CURSOR FOR SELECT 1;
BEGIN;
DECLARE c CURSOR FOR SELECT n FROM nums ORDER BY n;
FETCH 3 FROM c;
FETCH NEXT FROM c;
MOVE FORWARD 5 IN c;
FETCH 2 FROM c;
FETCH PRIOR FROM c;
CLOSE c;
FETCH 1 FROM c;
ROLLBACK;
BEGIN;
DECLARE sc SCROLL CURSOR FOR SELECT n FROM nums ORDER BY n;
FETCH LAST FROM sc;
FETCH ABSOLUTE 2 FROM sc;
FETCH RELATIVE 3 FROM sc;
FETCH BACKWARD 2 FROM sc;
SELECT name, statement, is_holdable, is_binary, is_scrollable FROM pg_cursors ORDER BY name;
COMMIT;
FETCH 1 FROM sc;
-- WITH HOLD: survives COMMIT, fetched over several later statements.
BEGIN;
DECLARE h CURSOR WITH HOLD FOR SELECT n FROM nums ORDER BY n;
FETCH 2 FROM h;
COMMIT;
FETCH 2 FROM h;
SELECT 'something else';
FETCH 2 FROM h;
SELECT name, is_holdable FROM pg_cursors ORDER BY name;
-- A WITH HOLD cursor is not removed by a later rolled-back transaction.
BEGIN;
FETCH 1 FROM h;
ROLLBACK;
FETCH 1 FROM h;
-- WITH HOLD declared outside an explicit transaction.
DECLARE h2 CURSOR WITH HOLD FOR SELECT n * 10 FROM nums WHERE n <= 3 ORDER BY n;
FETCH ALL FROM h2;
FETCH 1 FROM h2;
CLOSE h2;
-- Errors with cursors.
FETCH 1 FROM nope;
CLOSE nope;
BEGIN;
DECLARE h CURSOR FOR SELECT 1;
ROLLBACK;
CLOSE h;
FETCH 1 FROM h;
CLOSE ALL;
SELECT count(*) FROM pg_cursors;
DROP TABLE nums;
