-- Signals to other sessions' pids. The harness opened them: :alice_idle and :alice_busy (in
-- pg_sleep) are alice's, :bob_idle bob's, :root_idle a superuser's; what each saw is printed
-- after the script.
-- As alice: her other sessions, not bob's nor a superuser's (each function its own message).
SELECT pg_cancel_backend(:alice_busy);
SELECT pg_cancel_backend(:bob_idle);
SELECT pg_terminate_backend(:bob_idle);
SELECT pg_cancel_backend(:root_idle);
SELECT pg_terminate_backend(:root_idle);
-- A refusal aborts the transaction.
BEGIN;
SELECT pg_terminate_backend(:bob_idle);
SELECT 1 AS aborted;
ROLLBACK;
-- Not reached: nothing is signalled.
SELECT pg_terminate_backend(:alice_idle) WHERE false;
BEGIN;
SELECT 1/0;
SELECT pg_terminate_backend(:alice_idle);
ROLLBACK;
-- Judged by the current role: alice reaches these roles only by SET ROLE.
SET ROLE tp_nobody;
SELECT pg_cancel_backend(:alice_idle);
SET ROLE tp_bobs;
SELECT pg_cancel_backend(:bob_idle);
SELECT pg_cancel_backend(:alice_idle);
SELECT pg_terminate_backend(:root_idle);
SET ROLE tp_signaller;
SELECT pg_cancel_backend(:alice_idle), pg_cancel_backend(:bob_idle);
SELECT pg_cancel_backend(:root_idle);
SELECT pg_terminate_backend(:bob_idle);
RESET ROLE;
SELECT pg_terminate_backend(:alice_idle);
SELECT 'done';
