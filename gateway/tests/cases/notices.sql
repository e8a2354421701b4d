-- Notices, warnings and info messages, interleaved with rows exactly as the server sends them.
DO $$ BEGIN RAISE NOTICE 'hello from DO'; END $$;
DO $$ BEGIN RAISE NOTICE 'one'; RAISE WARNING 'two'; RAISE INFO 'three'; RAISE LOG 'to the log only'; RAISE DEBUG 'hidden'; END $$;
DO $$ BEGIN RAISE NOTICE 'with fields' USING DETAIL = 'd', HINT = 'h', ERRCODE = '01000'; END $$;
CREATE FUNCTION noisy(x int) RETURNS int LANGUAGE plpgsql AS $$ BEGIN RAISE NOTICE 'row %', x; RETURN x; END $$;
SELECT noisy(g) FROM generate_series(1, 3) g;
-- Notices from DDL.
DROP TABLE IF EXISTS nothing_here;
CREATE TABLE IF NOT EXISTS n1 (x int);
CREATE TABLE IF NOT EXISTS n1 (x int);
CREATE TABLE n2 (id serial PRIMARY KEY, x text);
ALTER TABLE n2 ADD CONSTRAINT n2_x_key UNIQUE (x);
DROP TABLE n2 CASCADE;
-- client_min_messages filters what reaches the client.
SET client_min_messages = warning;
DO $$ BEGIN RAISE NOTICE 'filtered out'; RAISE WARNING 'kept'; END $$;
SET client_min_messages = debug1;
DO $$ BEGIN RAISE DEBUG 'now visible'; END $$;
RESET client_min_messages;
DO $$ BEGIN RAISE DEBUG 'hidden again'; RAISE NOTICE 'notice back'; END $$;
-- Notices inside a transaction, then an error that ends it.
BEGIN;
DO $$ BEGIN RAISE NOTICE 'inside'; END $$;
DO $$ BEGIN RAISE NOTICE 'before the error'; PERFORM 1 / 0; END $$;
ROLLBACK;
-- Notices in a multi-statement query.
DO $$ BEGIN RAISE NOTICE 'first'; END $$ \; SELECT 'between' \; DO $$ BEGIN RAISE NOTICE 'last'; END $$;
-- Many notices in one statement.
DO $$ BEGIN FOR i IN 1..200 LOOP RAISE NOTICE 'n%', i; END LOOP; END $$;
-- WARNINGs from the server itself.
SELECT pg_advisory_unlock(12345);
COMMIT;
DROP TABLE n1;
DROP FUNCTION noisy(int);
