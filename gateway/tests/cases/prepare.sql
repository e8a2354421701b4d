-- SQL-level prepared statements: PREPARE / EXECUTE / DEALLOCATE and their errors.
CREATE TABLE items (id int PRIMARY KEY, name text);
PREPARE ins (int, text) AS INSERT INTO items VALUES ($1, $2) RETURNING *;
EXECUTE ins(1, 'one');
EXECUTE ins(2, 'two');
EXECUTE ins(1, 'again');
PREPARE byid AS SELECT name FROM items WHERE id = $1;
EXECUTE byid(2);
EXECUTE byid('1');
EXECUTE byid('x');
EXECUTE byid;
EXECUTE byid(1, 2);
PREPARE noparams AS SELECT count(*) FROM items;
EXECUTE noparams;
SELECT name, statement, parameter_types, from_sql FROM pg_prepared_statements ORDER BY name;
-- Duplicate name, unknown name, bad statement.
PREPARE byid AS SELECT 1;
EXECUTE nope;
DEALLOCATE nope;
PREPARE bad AS SELECT * FROM no_such_table;
PREPARE bad2 AS SELEC 1;
-- A prepared statement survives a rolled-back transaction (it is not transactional) ...
BEGIN;
PREPARE intx AS SELECT 'in a transaction';
ROLLBACK;
EXECUTE intx;
-- ... and EXECUTE works inside a transaction and after an error in an earlier one.
BEGIN;
EXECUTE ins(3, 'three');
EXECUTE byid(3);
COMMIT;
BEGIN;
SELECT 1 / 0;
EXECUTE byid(3);
ROLLBACK;
EXECUTE byid(3);
-- DDL under a prepared statement: a changed result type is an error (0A000).
ALTER TABLE items ADD COLUMN extra int DEFAULT 7;
PREPARE star AS SELECT * FROM items ORDER BY id;
EXECUTE star;
ALTER TABLE items DROP COLUMN extra;
EXECUTE star;
-- DEALLOCATE one, then all.
DEALLOCATE ins;
EXECUTE ins(4, 'four');
DEALLOCATE PREPARE byid;
SELECT name FROM pg_prepared_statements ORDER BY name;
DEALLOCATE ALL;
SELECT count(*) FROM pg_prepared_statements;
EXECUTE noparams;
-- Same name can be prepared again after DEALLOCATE.
PREPARE noparams AS SELECT 'new text';
EXECUTE noparams;
-- PREPARE and EXECUTE in one simple Query.
PREPARE two AS SELECT 2 \; EXECUTE two \; DEALLOCATE two;
EXPLAIN (COSTS OFF) EXECUTE noparams;
CREATE TABLE copyof AS EXECUTE noparams;
SELECT * FROM copyof;
DROP TABLE items, copyof;
DEALLOCATE ALL;

-- Code Postgres runs itself finds a SQL-prepared statement by its name: psql's \gdesc (a
-- Parse, then a Describe) and dynamic SQL in a DO block / function.
PREPARE gd AS SELECT 1 AS first, 2 AS second;
EXECUTE gd \gdesc
EXPLAIN EXECUTE gd \gdesc
PREPARE dq(int) AS SELECT $1 + 1;
DO $$ DECLARE r int; BEGIN EXECUTE 'EXECUTE dq(41)' INTO r; RAISE NOTICE 'dq %', r; END $$;
SELECT name FROM pg_prepared_statements WHERE name IN ('gd', 'dq') ORDER BY name;
DEALLOCATE gd;
DEALLOCATE dq;
DO $$ BEGIN EXECUTE 'EXECUTE dq(1)'; END $$;

-- Stale plans of SQL-prepared statements (issue 11): a column's type changed, a table and its
-- enum type dropped and re-created. Postgres's 0A000 comes on every EXECUTE, in and out of a
-- transaction, until the statement is prepared again; a statement whose result type did not
-- change runs on.
CREATE TABLE shapes (id int, v int);
INSERT INTO shapes VALUES (1, 10);
PREPARE sv AS SELECT * FROM shapes;
PREPARE sid(int) AS SELECT id FROM shapes WHERE id = $1;
PREPARE pv(int) AS SELECT v FROM shapes WHERE id = $1;
EXECUTE sv;
ALTER TABLE shapes ALTER COLUMN v TYPE bigint;
EXECUTE sv;
EXECUTE sv;
EXECUTE pv(1);
EXECUTE sid(1);
BEGIN;
EXECUTE sv;
EXECUTE sid(1);
ROLLBACK;
BEGIN;
EXECUTE sid(1);
EXECUTE pv(1);
COMMIT;
DEALLOCATE sv;
PREPARE sv AS SELECT * FROM shapes;
EXECUTE sv;
CREATE TYPE mood AS ENUM ('sad', 'ok');
CREATE TABLE moods (m mood);
INSERT INTO moods VALUES ('ok');
PREPARE mv AS SELECT m FROM moods;
EXECUTE mv;
DROP TABLE moods;
DROP TYPE mood;
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE moods (m mood);
INSERT INTO moods VALUES ('happy');
EXECUTE mv;
EXECUTE mv;
DEALLOCATE mv;
PREPARE mv AS SELECT m FROM moods;
EXECUTE mv;
DEALLOCATE ALL;
DROP TABLE shapes, moods;
DROP TYPE mood;
