"""Writes the server fails midway report as they do directly (issue 11, point 4): executemany
(pipelined by psycopg 3) and an explicit pipeline, each failing on a duplicate key halfway, in
and out of a transaction; then what was committed. Prints one "name: ok <what happened>" line
per check; the lines must be the same directly and through Tidepool. Usage: pipeline_check.py URL
"""

import sys

import psycopg


def report(name, what):
    print(f"{name}: ok {what}")


url = sys.argv[1]
with psycopg.connect(url, autocommit=True) as conn:
    conn.execute("DROP TABLE IF EXISTS pipeline_check")
    conn.execute("CREATE TABLE pipeline_check (id int PRIMARY KEY)")

    # executemany in a transaction: the duplicate fails it; nothing is kept.
    try:
        with conn.transaction():
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO pipeline_check VALUES (%s)", [(1,), (2,), (2,), (3,)]
                )
        report("executemany in a transaction", "no error")
    except psycopg.Error as e:
        report("executemany in a transaction", f"{type(e).__name__} {e.sqlstate}")
    (n,) = conn.execute("SELECT count(*) FROM pipeline_check").fetchone()
    report("kept after the failed transaction", n)

    # executemany in autocommit: rows before the failure stay.
    try:
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO pipeline_check VALUES (%s)", [(10,), (11,), (11,), (12,)]
            )
        report("executemany in autocommit", "no error")
    except psycopg.Error as e:
        report("executemany in autocommit", f"{type(e).__name__} {e.sqlstate}")
    rows = [r[0] for r in conn.execute("SELECT id FROM pipeline_check ORDER BY id")]
    report("kept in autocommit", rows)

    # An explicit pipeline: statements after the failed one in the same sync are skipped.
    try:
        with conn.pipeline() as p:
            conn.execute("INSERT INTO pipeline_check VALUES (20)")
            conn.execute("INSERT INTO pipeline_check VALUES (20)")
            conn.execute("INSERT INTO pipeline_check VALUES (21)")
            p.sync()
            conn.execute("INSERT INTO pipeline_check VALUES (22)")
        report("pipeline", "no error")
    except psycopg.Error as e:
        report("pipeline", f"{type(e).__name__} {e.sqlstate}")
    rows = [r[0] for r in conn.execute("SELECT id FROM pipeline_check ORDER BY id")]
    report("kept after the pipeline", rows)
    # The session goes on.
    (one,) = conn.execute("SELECT 1").fetchone()
    report("the session goes on", one)
    conn.execute("DROP TABLE pipeline_check")
print("pipeline ok")
