"""psycopg 3 against a Postgres URL (argv[1]): the driver features that lean on the protocol.

Prints one line per check and "psycopg ok" at the end; any failure raises (non-zero exit).
"""
import sys

import psycopg
from psycopg import sql


def check(name, got, want):
    if got != want:
        raise AssertionError(f"{name}: got {got!r}, want {want!r}")
    print(f"{name}: ok")


url = sys.argv[1]
notices = []

with psycopg.connect(url, autocommit=True) as conn:
    conn.add_notice_handler(lambda d: notices.append((d.severity, d.sqlstate, d.message_primary)))
    cur = conn.cursor()

    # Server-side parameter binding (extended protocol), several types.
    cur.execute("SELECT %s::int + 1, %s::text, %s::float8, %s::bool, %s", (41, "x", 1.5, True, None))
    check("params", cur.fetchone(), (42, "x", 1.5, True, None))

    cur.execute("DROP TABLE IF EXISTS pyt")
    cur.execute("CREATE TABLE pyt (id int PRIMARY KEY, name text)")
    cur.executemany("INSERT INTO pyt VALUES (%s, %s)", [(i, f"n{i}") for i in range(1, 51)])
    cur.execute("SELECT count(*) FROM pyt")
    check("executemany", cur.fetchone()[0], 50)

    # Explicitly prepared, then automatically prepared after the threshold.
    for i in range(1, 4):
        cur.execute("SELECT name FROM pyt WHERE id = %s", (i,), prepare=True)
        check(f"prepared {i}", cur.fetchone()[0], f"n{i}")
    conn.prepare_threshold = 0
    for i in range(10):
        cur.execute("SELECT count(*) FROM pyt WHERE id > %s", (i,))
        check(f"auto-prepared {i}", cur.fetchone()[0], 50 - i)
    conn.prepare_threshold = 5

    # Transactions, savepoints, errors.
    conn.autocommit = False
    with conn.transaction():
        cur.execute("INSERT INTO pyt VALUES (100, 'tx')")
        try:
            with conn.transaction():
                cur.execute("INSERT INTO pyt VALUES (1, 'dup')")
        except psycopg.errors.UniqueViolation as e:
            check("unique violation sqlstate", e.sqlstate, "23505")
    cur.execute("SELECT name FROM pyt WHERE id = 100")
    check("savepoint kept outer work", cur.fetchone()[0], "tx")
    conn.rollback()
    try:
        cur.execute("SELECT 1 / 0")
    except psycopg.errors.DivisionByZero as e:
        check("division by zero", e.sqlstate, "22012")
    check("failed transaction status", conn.info.transaction_status, psycopg.pq.TransactionStatus.INERROR)
    conn.rollback()
    check("idle after rollback", conn.info.transaction_status, psycopg.pq.TransactionStatus.IDLE)
    conn.autocommit = True

    # COPY both ways.
    with cur.copy("COPY pyt (id, name) FROM STDIN") as copy:
        for i in range(1000, 3000):
            copy.write_row((i, f"copied {i}"))
    cur.execute("SELECT count(*) FROM pyt WHERE id >= 1000")
    check("copy in", cur.fetchone()[0], 2000)
    rows = []
    with cur.copy("COPY (SELECT id FROM pyt WHERE id < 5 ORDER BY id) TO STDOUT") as copy:
        for row in copy.rows():
            rows.append(row)
    check("copy out", rows, [("1",), ("2",), ("3",), ("4",)])

    # Pipeline mode: many queries, one sync.
    with conn.pipeline():
        curs = []
        for i in range(20):
            c = conn.cursor()
            c.execute("SELECT %s::int * 2", (i,))
            curs.append(c)
    check("pipeline", [c.fetchone()[0] for c in curs], [i * 2 for i in range(20)])
    try:
        with conn.pipeline():
            conn.execute("SELECT 1")
            conn.execute("SELECT 1 / 0")
            conn.execute("SELECT 2")
    except psycopg.errors.DivisionByZero:
        print("pipeline error: ok")
    else:
        raise AssertionError("pipeline error: no DivisionByZero raised")

    # Binary results.
    bcur = conn.cursor(binary=True)
    bcur.execute("SELECT 1::int8, 'b'::text, ARRAY[1, 2]::int4[]")
    check("binary", bcur.fetchone(), (1, "b", [1, 2]))

    # Server-side (named) cursor in a transaction.
    conn.autocommit = False
    with conn.cursor(name="named") as ncur:
        ncur.itersize = 7
        ncur.execute("SELECT id FROM pyt WHERE id <= 20 ORDER BY id")
        check("named cursor", [r[0] for r in ncur], list(range(1, 21)))
    conn.commit()
    conn.autocommit = True

    # Notices and settings.
    conn.execute("DO $$ BEGIN RAISE NOTICE 'hello psycopg'; END $$")
    check("notice", notices[-1], ("NOTICE", "00000", "hello psycopg"))
    conn.execute("SET TimeZone = 'Asia/Tokyo'")
    check("parameter status", conn.info.parameter_status("TimeZone"), "Asia/Tokyo")
    check("setting kept", conn.execute("SHOW TimeZone").fetchone()[0], "Asia/Tokyo")
    check("identifier quoting", conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier("pyt"))).fetchone()[0], 2051)
    conn.execute("DROP TABLE pyt")

print("psycopg ok")
