-- COPY FROM STDIN / TO STDOUT through the simple protocol, small and large, and failing midway.
CREATE TABLE t (id int PRIMARY KEY, name text, note text);
COPY t FROM STDIN;
1	one	\N
2	two	with\ttab
3	three	back\\slash
\.
COPY t TO STDOUT;
COPY t (id, name) TO STDOUT WITH (FORMAT csv, HEADER);
COPY (SELECT id * 10, upper(name) FROM t ORDER BY id) TO STDOUT WITH (FORMAT csv);
COPY t FROM STDIN WITH (FORMAT csv, HEADER);
id,name,note
4,four,"quoted, with comma"
5,five,
\.
SELECT * FROM t ORDER BY id;
-- Bad data midway: the whole COPY fails (22P02 with the line in CONTEXT), nothing is kept,
-- and the session goes on.
COPY t FROM STDIN;
6	six	\N
7	seven	\N
eight	eight	\N
9	nine	\N
\.
SELECT count(*) FROM t;
-- A duplicate key midway.
COPY t FROM STDIN;
10	ten	\N
1	dup	\N
\.
SELECT count(*) FROM t;
-- Wrong number of columns.
COPY t FROM STDIN;
11	eleven
\.
-- COPY inside a transaction: rolled back, then committed; a failed COPY aborts the transaction.
BEGIN;
COPY t FROM STDIN;
20	twenty	\N
\.
SELECT count(*) FROM t;
ROLLBACK;
SELECT count(*) FROM t;
BEGIN;
COPY t FROM STDIN;
21	twenty-one	\N
\.
COMMIT;
BEGIN;
COPY t FROM STDIN;
x	bad	\N
\.
SELECT 1;
ROLLBACK;
SELECT count(*) FROM t;
-- COPY errors before any data moves.
COPY nope FROM STDIN;
COPY t (nope) TO STDOUT;
COPY t FROM '/etc/hostname';
-- Large: about 6 MB each way, through psql's \copy from and to a program.
CREATE TABLE big (id int, payload text);
\copy big FROM PROGRAM 'awk ''BEGIN { for (i = 1; i <= 60000; i++) printf "%d\t%0100d\n", i, i }'''
SELECT count(*), sum(length(payload)), md5(string_agg(payload, ',' ORDER BY id)) FROM big;
\copy big TO PROGRAM 'cksum'
\copy (SELECT * FROM big ORDER BY id) TO PROGRAM 'cksum'
COPY (SELECT id, payload FROM big WHERE id % 10000 = 0 ORDER BY id) TO STDOUT;
-- Large with bad data near the end: nothing is kept.
\copy big FROM PROGRAM 'awk ''BEGIN { for (i = 1; i <= 60000; i++) printf "%s\t%0100d\n", (i == 59990 ? "bad" : i), i }'''
SELECT count(*) FROM big;
-- Large COPY TO STDOUT printed in full (the output is compared byte for byte).
COPY (SELECT g, repeat(md5(g::text), 8) FROM generate_series(1, 3000) g) TO STDOUT;
DROP TABLE t, big;
