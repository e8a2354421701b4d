-- Values of many types, NULLs and edge cases, as text rows.
SELECT NULL AS n, '' AS empty, ' ' AS space, 'quote''s' AS q, E'tab\there' AS tab, E'new\nline' AS nl;
SELECT 'ünïcødé ✓ 日本語' AS u, length('ünïcødé ✓ 日本語'), octet_length('ünïcødé ✓ 日本語');
SELECT 0::smallint, (-32768)::smallint, 2147483647::int, (-9223372036854775808)::bigint;
SELECT 1.5::real, 1e300::float8, 'NaN'::float8, '-Infinity'::float8, 0.1::numeric(30, 25), 123456789012345678901234567890.123::numeric;
SELECT true, false, NULL::bool;
SELECT '2024-02-29'::date, '23:59:59.999999'::time, '2024-02-29 12:34:56.789+05:30'::timestamptz, '2024-02-29 12:34:56'::timestamp, interval '1 year 2 mons 3 days 04:05:06.7';
SELECT 'infinity'::timestamptz, '-infinity'::date;
SELECT '\xdeadbeef'::bytea, ''::bytea;
SELECT ARRAY[1, 2, NULL], ARRAY[['a', 'b'], ['c', 'd']], '{}'::int[], ARRAY['with "quotes"', 'with,comma'];
SELECT '{"a": [1, 2, {"b": null}]}'::json, '{"b": 2, "a": 1}'::jsonb, '[]'::jsonb;
SELECT 'a1b2c3d4-e5f6-4788-99aa-bbccddeeff00'::uuid, '192.168.0.1/24'::inet, '08:00:2b:01:02:03'::macaddr;
SELECT int4range(1, 10), '[2024-01-01,2024-02-01)'::daterange, point(1.5, 2), box(point(0, 0), point(1, 1));
SELECT ROW(1, 'x', NULL) AS rec, (1, 2) AS pair;
SELECT 'a fairly long text value '::text || repeat('0123456789', 300) AS long_value;
SELECT g AS n, g * g AS sq, md5(g::text) AS h FROM generate_series(1, 50) g;
SELECT * FROM (VALUES (1, 'a'), (2, NULL), (NULL, 'c')) AS v(num, letter) ORDER BY num NULLS FIRST;
SELECT count(*) FROM generate_series(1, 100000);
SELECT string_agg(g::text, ',') FROM generate_series(1, 20000) g;
-- Zero rows, zero columns.
SELECT 1 WHERE false;
SELECT;
SELECT FROM generate_series(1, 3);
-- psql formatting does not change what the server sends, but exercise a few modes.
\pset format unaligned
SELECT 1 AS a, 2 AS b;
\pset format aligned
\x on
SELECT 1 AS a, 'two' AS b;
\x off
