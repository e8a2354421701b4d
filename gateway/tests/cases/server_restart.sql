-- The server restarts (pg_ctl restart -m fast) while this session is idle, another idle one
-- (:idle) is idle, another (:in_transaction) is in a transaction and another (:busy) runs a
-- query: every one of them meets the FATAL 57P01 Postgres sends as it goes down, at its next
-- statement (psql then reports the lost connection and stops).
SET application_name = 'before the restart';
SELECT 1 AS before_restart;
--@ restart
SELECT 2 AS after_restart;
SELECT 'never reached';
