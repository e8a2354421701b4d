-- Transactions: BEGIN/COMMIT/ROLLBACK, savepoints, an error inside a transaction and the
-- aborted state that follows it. Command tags show what the server did (COMMIT of an aborted
-- transaction answers ROLLBACK).
CREATE TABLE acct (id int PRIMARY KEY, balance int NOT NULL);
INSERT INTO acct VALUES (1, 100), (2, 50);

BEGIN;
UPDATE acct SET balance = balance - 10 WHERE id = 1;
UPDATE acct SET balance = balance + 10 WHERE id = 2;
SELECT * FROM acct ORDER BY id;
COMMIT;
SELECT * FROM acct ORDER BY id;

BEGIN;
DELETE FROM acct;
SELECT count(*) FROM acct;
ROLLBACK;
SELECT count(*) FROM acct;

-- Savepoints: roll back to one, release one, nest them.
BEGIN;
INSERT INTO acct VALUES (3, 0);
SAVEPOINT a;
INSERT INTO acct VALUES (4, 0);
SAVEPOINT b;
INSERT INTO acct VALUES (5, 0);
ROLLBACK TO SAVEPOINT b;
RELEASE SAVEPOINT b;
SELECT id FROM acct ORDER BY id;
ROLLBACK TO a;
SELECT id FROM acct ORDER BY id;
RELEASE a;
COMMIT;
SELECT id FROM acct ORDER BY id;

-- An error aborts the transaction: every later statement fails with 25P02 until it ends, and
-- COMMIT answers ROLLBACK.
BEGIN;
INSERT INTO acct VALUES (6, 0);
SELECT 1 / 0;
SELECT * FROM acct;
INSERT INTO acct VALUES (7, 0);
COMMIT;
SELECT id FROM acct ORDER BY id;

-- Recovering from an error with a savepoint.
BEGIN;
INSERT INTO acct VALUES (8, 0);
SAVEPOINT before_dup;
INSERT INTO acct VALUES (1, 0);
ROLLBACK TO before_dup;
INSERT INTO acct VALUES (9, 0);
COMMIT;
SELECT id FROM acct ORDER BY id;

-- ROLLBACK of an aborted transaction, then outside any transaction.
BEGIN;
SELECT nope;
ROLLBACK;
ROLLBACK;
COMMIT;
SAVEPOINT outside;
RELEASE SAVEPOINT nonexistent;

-- Transaction modes and characteristics.
BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY;
SHOW transaction_isolation;
SHOW transaction_read_only;
INSERT INTO acct VALUES (10, 0);
ROLLBACK;
START TRANSACTION;
SET TRANSACTION ISOLATION LEVEL SERIALIZABLE;
SHOW transaction_isolation;
COMMIT;
SHOW transaction_isolation;
BEGIN;
BEGIN;
COMMIT;
-- A failed COMMIT: a deferred constraint that fails at commit time.
CREATE TABLE d (x int UNIQUE DEFERRABLE INITIALLY DEFERRED);
BEGIN;
INSERT INTO d VALUES (1), (1);
COMMIT;
SELECT count(*) FROM d;
-- Transaction block in one simple Query.
BEGIN \; INSERT INTO acct VALUES (11, 0) \; COMMIT;
SELECT id FROM acct WHERE id = 11;
-- txid: the transaction sees one id for its whole life.
BEGIN;
SELECT txid_current() = txid_current() AS same_xid;
CREATE TABLE x AS SELECT txid_current() AS a;
SELECT a = txid_current() AS same_xid_later FROM x;
COMMIT;
DROP TABLE acct, d, x;
