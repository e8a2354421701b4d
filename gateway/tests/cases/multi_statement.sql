-- Several statements in one simple Query message (psql sends text joined with "\;" as one).
-- The server runs them in one implicit transaction unless they contain their own.
SELECT 1 AS a \; SELECT 2 AS b \; SELECT 3 AS c;
CREATE TABLE m (x int) \; INSERT INTO m VALUES (1), (2) \; SELECT count(*) FROM m;
-- An error in the middle stops the rest and rolls back the implicit transaction.
INSERT INTO m VALUES (3) \; SELECT 1 / 0 \; INSERT INTO m VALUES (4);
SELECT x FROM m ORDER BY x;
-- An explicit COMMIT inside commits what came before it.
INSERT INTO m VALUES (5) \; COMMIT \; INSERT INTO m VALUES (6) \; SELECT 1 / 0;
SELECT x FROM m ORDER BY x;
-- BEGIN inside opens a transaction that stays open after the query.
BEGIN \; INSERT INTO m VALUES (7);
SELECT x FROM m ORDER BY x;
ROLLBACK;
SELECT x FROM m ORDER BY x;
-- Statements that cannot run inside a transaction block fail inside a multi-statement query.
SELECT 1 \; VACUUM m;
VACUUM m \; SELECT 1;
-- SET and SHOW together; a SET that fails undoes the others.
SET work_mem = '5MB' \; SET work_mem = 'bad' \; SELECT 1;
SHOW work_mem;
SET work_mem = '6MB' \; SHOW work_mem;
SHOW work_mem;
RESET work_mem;
-- Empty statements and comments.
;
SELECT 1 \; ;
/* only a comment */ SELECT 'after comment';
-- Rows of different shapes in one query.
SELECT 1 AS one, 'x' AS ex \; SELECT NULL::int AS n, true AS t, 1.5 AS f \; VALUES (1, 2), (3, 4);
-- Data-modifying statements return their tags.
INSERT INTO m VALUES (10) \; UPDATE m SET x = x + 1 WHERE x = 10 \; DELETE FROM m WHERE x = 11 \; SELECT count(*) FROM m;
-- A syntax error anywhere fails the whole query before anything runs.
INSERT INTO m VALUES (12) \; SELEC 1;
SELECT count(*) FROM m WHERE x = 12;
DROP TABLE m;
