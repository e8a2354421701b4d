-- Errors with their SQLSTATE, detail, hint, position and context, as psql prints them in
-- verbose mode; after each, the session goes on.
SELECT 1 / 0;
SELECT 1.0 / 0;
SELEC 1;
SELECT * FROM no_such_table;
SELECT no_such_column FROM pg_class;
SELECT 'abc'::int;
SELECT 2147483647 + 1;
SELECT no_such_function(1);
SELECT 'a' + 1;
CREATE TABLE u (id int PRIMARY KEY, email text UNIQUE, age int CHECK (age >= 0), boss int REFERENCES u (id), name text NOT NULL);
INSERT INTO u VALUES (1, 'a@x', 30, NULL, 'a');
INSERT INTO u VALUES (1, 'b@x', 30, NULL, 'b');
INSERT INTO u VALUES (2, 'a@x', 30, NULL, 'b');
INSERT INTO u VALUES (3, 'c@x', -1, NULL, 'c');
INSERT INTO u VALUES (4, 'd@x', 1, 99, 'd');
INSERT INTO u VALUES (5, 'e@x', 1, NULL, NULL);
DELETE FROM u WHERE id = 1 AND false;
INSERT INTO u VALUES (6, 'f@x', 1, 1, 'f');
DELETE FROM u WHERE id = 1;
CREATE TABLE u (x int);
DROP TABLE no_such_table;
-- Errors raised by PL/pgSQL with every field, and from nested functions (CONTEXT).
DO $$ BEGIN RAISE EXCEPTION 'custom failure %', 42 USING ERRCODE = 'P0001', DETAIL = 'some detail', HINT = 'some hint'; END $$;
DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = 'check_violation', MESSAGE = 'by condition name', COLUMN = 'c1', CONSTRAINT = 'k1', DATATYPE = 'int4', TABLE = 't1', SCHEMA = 's1'; END $$;
DO $$ BEGIN RAISE SQLSTATE '22012'; END $$;
CREATE FUNCTION inner_fail(x int) RETURNS int LANGUAGE plpgsql AS $$ BEGIN RETURN 10 / x; END $$;
CREATE FUNCTION outer_call(x int) RETURNS int LANGUAGE plpgsql AS $$ BEGIN RETURN inner_fail(x) + 1; END $$;
SELECT outer_call(0);
SELECT outer_call(g) FROM generate_series(-1, 1) g;
-- Errors in a multi-line statement: the position points into the right line.
SELECT 1,
       2,
       3 +
       'x'::int;
-- Statement timeout.
SET statement_timeout = '100ms';
SELECT pg_sleep(2);
RESET statement_timeout;
-- Permission denied.
SELECT * FROM pg_authid;
CREATE DATABASE nope_db;
-- A long message.
SELECT repeat('x', 1000)::int;
-- After all of that, the session works.
SELECT 'still here';
DROP TABLE u;
DROP FUNCTION outer_call(int), inner_fail(int);
