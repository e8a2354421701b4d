-- Temporary tables belong to the session: they must be there for every later statement of the
-- session (Tidepool keeps the session on its backend while it has one) and gone for others.
CREATE TEMP TABLE scratch (id int, v text);
INSERT INTO scratch SELECT g, 'v' || g FROM generate_series(1, 5) g;
SELECT count(*) FROM scratch;
SELECT * FROM scratch WHERE id > 3 ORDER BY id;
UPDATE scratch SET v = upper(v) WHERE id = 1;
SELECT v FROM scratch WHERE id = 1;
-- A temp table shadows a permanent one of the same name.
CREATE TABLE shadow (x text);
INSERT INTO shadow VALUES ('permanent');
CREATE TEMP TABLE shadow (x text);
INSERT INTO shadow VALUES ('temporary');
SELECT x FROM shadow;
SELECT x FROM public.shadow;
DROP TABLE shadow;
SELECT x FROM shadow;
-- ON COMMIT DROP and ON COMMIT DELETE ROWS.
BEGIN;
CREATE TEMP TABLE gone (x int) ON COMMIT DROP;
INSERT INTO gone VALUES (1);
SELECT * FROM gone;
COMMIT;
SELECT * FROM gone;
CREATE TEMP TABLE emptied (x int) ON COMMIT DELETE ROWS;
BEGIN;
INSERT INTO emptied VALUES (1), (2);
SELECT count(*) FROM emptied;
COMMIT;
SELECT count(*) FROM emptied;
-- Temp objects of other kinds.
CREATE TEMP SEQUENCE tseq;
SELECT nextval('tseq'), nextval('tseq');
SELECT currval('tseq');
CREATE TEMP VIEW tview AS SELECT id FROM scratch WHERE id < 3;
SELECT * FROM tview ORDER BY id;
CREATE FUNCTION pg_temp.twice(int) RETURNS int AS 'SELECT $1 * 2' LANGUAGE sql;
SELECT pg_temp.twice(21);
-- A temp table created in a rolled-back transaction does not exist.
BEGIN;
CREATE TEMP TABLE never (x int);
ROLLBACK;
SELECT * FROM never;
-- Explicit DROP; then DISCARD TEMP drops the rest.
DROP TABLE scratch CASCADE;
SELECT * FROM scratch;
SELECT count(*) FROM emptied;
DISCARD TEMP;
SELECT count(*) FROM emptied;
SELECT nextval('tseq');
-- The session can use temp tables again after DISCARD TEMP.
CREATE TEMP TABLE again AS SELECT 42 AS answer;
SELECT * FROM again;
DISCARD TEMP;
-- lastval/currval are session state too (not temp tables, but just as per-session).
CREATE TABLE withseq (id serial, x int);
INSERT INTO withseq (x) VALUES (1);
SELECT lastval();
SELECT currval('withseq_id_seq');
DROP TABLE withseq;
