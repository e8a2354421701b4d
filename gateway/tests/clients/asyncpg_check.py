"""asyncpg against a Postgres URL (argv[1]): the driver features that lean on the protocol.

asyncpg speaks only the extended protocol and asks for binary results of every type it knows;
it names its prepared statements itself (`__asyncpg_stmt_N__`) and caches them, or uses the
unnamed statement when the cache is off (what it recommends behind PgBouncer).

Prints "name: ok" per check and "name = value" for values compared with a run against Postgres
itself (by gateway/tests/drivers.rs), then "asyncpg ok"; any failure raises (non-zero exit).
Usage: asyncpg_check.py URL [main|table-changed]
"""
import asyncio
import datetime
import decimal
import hashlib
import sys
import time
import uuid

import asyncpg

URL = sys.argv[1]
PART = sys.argv[2] if len(sys.argv) > 2 else "main"
SESSIONS = 100


def check(name, got, want):
    if got != want:
        raise AssertionError(f"{name}: got {got!r}, want {want!r}")
    print(f"{name}: ok", flush=True)


def record(name, value):
    """A value not asserted here but compared between Postgres and Tidepool."""
    print(f"{name} = {value!r}", flush=True)


def error_of(e):
    return (type(e).__name__, e.sqlstate, str(e))


async def prepared(conn, unnamed):
    kind = "unnamed" if unnamed else "named"
    # Statement cache on: every fetch is a named statement; off: the unnamed one.
    for i in range(3):
        check(f"{kind} fetchval {i}", await conn.fetchval("SELECT $1::int + $2::int", i, 40), i + 40)
    stmt = await conn.prepare("SELECT name FROM apg WHERE id = $1")  # always a named statement
    check(f"{kind} prepare attributes", [a.name for a in stmt.get_attributes()], ["name"])
    check(f"{kind} prepare parameters", [t.name for t in stmt.get_parameters()], ["int4"])
    for i in (1, 7, 50):
        check(f"{kind} prepared {i}", await stmt.fetchval(i), f"n{i}")
    # Prepared long ago, used again after other statements.
    await conn.execute("SELECT pg_sleep(0.01)")
    check(f"{kind} prepared again", tuple(await stmt.fetchrow(2)), ("n2",))
    explicit = await conn.prepare("SELECT count(*) FROM apg WHERE id <= $1", name=f"apg_{kind}_count")
    check(f"{kind} explicitly named", await explicit.fetchval(10), 10)
    # A statement whose parameter types the server infers, and one it cannot.
    check(f"{kind} inferred", await conn.fetchval("SELECT id FROM apg WHERE name = $1", "n3"), 3)
    check(f"{kind} untyped parameter", await conn.fetchval("SELECT $1", "as text"), "as text")
    try:
        await conn.fetch("SELECT nosuchcolumn FROM apg")
    except asyncpg.UndefinedColumnError as e:
        record(f"{kind} parse error", error_of(e))
    check(f"{kind} after parse error", await conn.fetchval("SELECT 1"), 1)


async def binary_types(conn):
    await conn.execute("DROP TYPE IF EXISTS apg_mood, apg_pair CASCADE")
    await conn.execute("CREATE TYPE apg_mood AS ENUM ('sad', 'ok', 'happy')")
    await conn.execute("CREATE TYPE apg_pair AS (a int, b text)")
    values = (
        7, 2**40, 1.25, decimal.Decimal("12345.678901"), "text ü", b"\x00\x01\xff", True,
        datetime.date(2024, 2, 29), datetime.datetime(2024, 1, 2, 3, 4, 5, 6),
        datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc),
        datetime.timedelta(days=3, seconds=7), uuid.UUID("12345678-1234-5678-1234-567812345678"),
        '{"k": [1, 2]}', [1, None, 3], ["a", "b"], "happy", (1, "x"),
    )
    row = await conn.fetchrow(
        "SELECT $1::int2, $2::int8, $3::float8, $4::numeric, $5::text, $6::bytea, $7::bool, "
        "$8::date, $9::timestamp, $10::timestamptz, $11::interval, $12::uuid, $13::jsonb, "
        "$14::int4[], $15::text[], $16::apg_mood, $17::apg_pair",
        *values,
    )
    got = tuple(row)
    check("binary round trip", got[:16], values[:16])
    check("binary composite", tuple(got[16]), values[16])
    check("binary null", await conn.fetchval("SELECT NULL::int8"), None)
    check("binary big numeric", await conn.fetchval("SELECT 1e30::numeric"), decimal.Decimal("1e30"))
    check("binary array of enum", await conn.fetchval("SELECT ARRAY['sad', 'ok']::apg_mood[]"), ["sad", "ok"])
    await conn.execute("DROP TYPE apg_mood, apg_pair")


async def transactions(conn):
    async with conn.transaction():
        await conn.execute("INSERT INTO apg VALUES (100, 'tx')")
        try:
            async with conn.transaction():  # a savepoint
                await conn.execute("INSERT INTO apg VALUES (1, 'dup')")
        except asyncpg.UniqueViolationError as e:
            record("unique violation", error_of(e))
        check("savepoint kept outer work", await conn.fetchval("SELECT name FROM apg WHERE id = 100"), "tx")
    check("committed", await conn.fetchval("SELECT name FROM apg WHERE id = 100"), "tx")

    try:
        async with conn.transaction():
            await conn.execute("INSERT INTO apg VALUES (101, 'rolled back')")
            await conn.execute("SELECT 1 / 0")
    except asyncpg.DivisionByZeroError as e:
        record("division by zero", error_of(e))
    check("rolled back", await conn.fetchval("SELECT count(*) FROM apg WHERE id = 101"), 0)
    check("idle after rollback", conn.is_in_transaction(), False)

    tr = conn.transaction(isolation="serializable", readonly=True)
    await tr.start()
    check("serializable", await conn.fetchval("SHOW transaction_isolation"), "serializable")
    try:
        await conn.execute("INSERT INTO apg VALUES (102, 'ro')")
    except asyncpg.ReadOnlySQLTransactionError as e:
        record("read only", error_of(e))
    try:
        await conn.fetchval("SELECT 1")
    except asyncpg.InFailedSQLTransactionError as e:
        record("in failed transaction", error_of(e))
    await tr.rollback()
    check("after failed transaction", await conn.fetchval("SELECT 2"), 2)

    # executemany: many Bind/Execute, one Sync; atomic on error.
    try:
        await conn.executemany("INSERT INTO apg VALUES ($1, $2)", [(200, "a"), (201, "b"), (1, "dup"), (202, "c")])
    except asyncpg.UniqueViolationError as e:
        record("executemany error", error_of(e))
    check("executemany atomic", await conn.fetchval("SELECT count(*) FROM apg WHERE id >= 200"), 0)
    await conn.executemany("INSERT INTO apg VALUES ($1, $2)", [(i, f"m{i}") for i in range(200, 300)])
    check("executemany", await conn.fetchval("SELECT count(*) FROM apg WHERE id >= 200"), 100)


async def copy(conn):
    # COPY FROM STDIN in binary, from records.
    result = await conn.copy_records_to_table("apg", records=[(i, f"copied {i}") for i in range(1000, 3000)])
    check("copy records tag", result, "COPY 2000")
    check("copy records", await conn.fetchval("SELECT count(*) FROM apg WHERE id >= 1000"), 2000)
    # COPY FROM STDIN in text, from an iterable of bytes.
    async def lines():
        for i in range(3000, 3500):
            yield f"{i}\tline {i}\n".encode()
    result = await conn.copy_to_table("apg", source=lines(), columns=["id", "name"])
    check("copy text in", result, "COPY 500")
    # COPY TO STDOUT.
    chunks = []
    async def sink(data):
        chunks.append(bytes(data))
    result = await conn.copy_from_query("SELECT id, name FROM apg WHERE id BETWEEN $1 AND $2 ORDER BY id", 1000, 1004, output=sink)
    check("copy out tag", result, "COPY 5")
    check("copy out", b"".join(chunks).decode(), "".join(f"{i}\tcopied {i}\n" for i in range(1000, 1005)))
    chunks.clear()
    await conn.copy_from_table("apg", output=sink, format="csv", columns=["id"])
    check("copy table out", len(b"".join(chunks).splitlines()), 2651)
    try:
        await conn.copy_to_table("apg", source=lines())  # duplicate keys
    except asyncpg.UniqueViolationError as e:
        record("copy error", (e.sqlstate, str(e)))
    check("after copy error", await conn.fetchval("SELECT count(*) FROM apg WHERE id >= 3000"), 500)


async def listen_notify(url):
    a = await asyncpg.connect(url)
    b = await asyncpg.connect(url)
    got = asyncio.Queue()
    def on_notify(_conn, _pid, channel, payload):
        got.put_nowait((channel, payload))

    await a.add_listener("apg_news", on_notify)
    await b.execute("NOTIFY apg_news, 'first'")
    async with b.transaction():
        await b.execute("SELECT pg_notify('apg_news', 'in tx')")
    try:
        async with b.transaction():
            await b.execute("NOTIFY apg_news, 'rolled back'")
            raise RuntimeError("roll back")
    except RuntimeError:
        pass
    await b.execute("NOTIFY apg_news, 'last'")
    received = [await asyncio.wait_for(got.get(), 10) for _ in range(3)]
    check("notifications", received, [("apg_news", "first"), ("apg_news", "in tx"), ("apg_news", "last")])
    # The listening session goes on querying.
    check("listener queries", await a.fetchval("SELECT 5"), 5)
    await a.remove_listener("apg_news", on_notify)  # sends UNLISTEN
    await b.execute("NOTIFY apg_news, 'after unlisten'")
    await asyncio.sleep(0.3)
    check("nothing after unlisten", got.empty(), True)
    await a.close()
    await b.close()


# Postgres signals a cancelled backend twice (the process, then its process group: signal_child
# in postmaster.c); on a loaded machine the second signal can come late enough to cancel the
# session's next statement. Every check waits a moment after a cancel for that reason.
CANCEL_SETTLE = 0.3


async def cancel(conn):
    # A task cancelled mid-query makes asyncpg send a CancelRequest on a new connection, then
    # wait for the server to finish the query: the session is usable at once after.
    start = time.monotonic()
    try:
        await asyncio.wait_for(conn.fetchval("SELECT pg_sleep(30)"), 1.0)
    except asyncio.TimeoutError:
        pass
    check("cancel within 10 s", time.monotonic() - start < 10, True)
    await asyncio.sleep(CANCEL_SETTLE)
    check("usable after cancel", await conn.fetchval("SELECT 'after cancel'"), "after cancel")
    # statement_timeout: the server cancels itself.
    await conn.execute("SET statement_timeout = '200ms'")
    try:
        await conn.fetchval("SELECT pg_sleep(5)")
    except asyncpg.QueryCanceledError as e:
        record("statement timeout", error_of(e))
    await conn.execute("RESET statement_timeout")
    # A cancel inside a transaction aborts it; leaving the block by an exception rolls back.
    try:
        async with conn.transaction():
            await conn.execute("INSERT INTO apg VALUES (4000, 'before cancel')")
            try:
                await asyncio.wait_for(conn.fetchval("SELECT pg_sleep(30)"), 1.0)
            except asyncio.TimeoutError:
                pass
            await asyncio.sleep(CANCEL_SETTLE)
            await conn.fetchval("SELECT 1")
    except asyncpg.InFailedSQLTransactionError as e:
        record("transaction after cancel", error_of(e))
    check("idle after cancelled transaction", conn.is_in_transaction(), False)
    check("cancelled transaction rolled back", await conn.fetchval("SELECT count(*) FROM apg WHERE id = 4000"), 0)


async def large_result(conn):
    rows = await conn.fetch("SELECT g, md5(g::text) FROM generate_series(1, 100000) g")
    check("large result rows", len(rows), 100000)
    check("large result sum", sum(r[0] for r in rows), 100000 * 100001 // 2)
    check("large result last", tuple(rows[-1]), (100000, hashlib.md5(b"100000").hexdigest()))
    # A cursor: a portal read 1000 rows at a time (Execute with a row limit).
    n = 0
    total = 0
    async with conn.transaction():
        async for r in conn.cursor("SELECT g FROM generate_series(1, 100000) g", prefetch=1000):
            n += 1
            total += r[0]
    check("cursor rows", (n, total), (100000, 100000 * 100001 // 2))
    async with conn.transaction():
        cur = await conn.cursor("SELECT g FROM generate_series(1, 1000) g")
        check("cursor fetch", [r[0] for r in await cur.fetch(3)], [1, 2, 3])
        await cur.forward(500)
        check("cursor forward", tuple(await cur.fetchrow()), (504,))
    big = await conn.fetchval("SELECT repeat('x', 10000000)")
    check("10 MB value", len(big), 10000000)


async def session(i, url, counter_stmt):
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"SET application_name = 'apg-{i}'")
        stmt = await conn.prepare("SELECT $1::int * 2, current_setting('application_name')")
        for r in range(5):
            v, app = await stmt.fetchrow(i * 10 + r)
            if (v, app) != ((i * 10 + r) * 2, f"apg-{i}"):
                raise AssertionError(f"session {i} round {r}: got {(v, app)}")
            async with conn.transaction():
                await conn.execute(counter_stmt)
            if r == 2:
                await asyncio.sleep(0.01)
        return await conn.fetchval("SELECT current_setting('application_name')")
    finally:
        await conn.close()


async def many_sessions(url):
    await_conn = await asyncpg.connect(url)
    await await_conn.execute("DROP TABLE IF EXISTS apg_counter")
    await await_conn.execute("CREATE TABLE apg_counter (id int PRIMARY KEY, n int)")
    await await_conn.execute("INSERT INTO apg_counter VALUES (1, 0)")
    names = await asyncio.gather(
        *(session(i, url, "UPDATE apg_counter SET n = n + 1 WHERE id = 1") for i in range(SESSIONS))
    )
    check(f"{SESSIONS} sessions kept their settings", names, [f"apg-{i}" for i in range(SESSIONS)])
    check(f"{SESSIONS} sessions counted", await await_conn.fetchval("SELECT n FROM apg_counter"), SESSIONS * 5)
    # A pool, as applications use it.
    pool = await asyncpg.create_pool(url, min_size=10, max_size=20)
    results = await asyncio.gather(*(pool.fetchval("SELECT $1::int + 1", i) for i in range(200)))
    check("pool", results, [i + 1 for i in range(200)])
    await pool.close()
    await await_conn.execute("DROP TABLE apg_counter")
    await await_conn.close()


async def table_changed(conn):
    """A table changed under a cached statement: asyncpg drops its statement cache and prepares
    the same text again under a new name when Postgres says "cached plan must not change result
    type" (InvalidCachedStatementError), and retries once, outside a transaction."""
    await conn.execute("DROP TABLE IF EXISTS apg_shape")
    await conn.execute("CREATE TABLE apg_shape (a int)")
    await conn.execute("INSERT INTO apg_shape VALUES (1)")
    check("before change", [tuple(r) for r in await conn.fetch("SELECT * FROM apg_shape")], [(1,)])
    await conn.execute("ALTER TABLE apg_shape ADD COLUMN b text DEFAULT 'b'")
    check("changed table re-prepared", [tuple(r) for r in await conn.fetch("SELECT * FROM apg_shape")], [(1, "b")])
    await conn.execute("DROP TABLE apg_shape")


async def main():
    conn = await asyncpg.connect(URL)
    if PART == "table-changed":
        await table_changed(conn)
        await conn.close()
        print("asyncpg ok")
        return
    notices = []
    conn.add_log_listener(lambda _c, msg: notices.append((msg.severity, msg.sqlstate, msg.message)))
    await conn.execute("DROP TABLE IF EXISTS apg")
    await conn.execute("CREATE TABLE apg (id int PRIMARY KEY, name text)")
    await conn.executemany("INSERT INTO apg VALUES ($1, $2)", [(i, f"n{i}") for i in range(1, 51)])

    await prepared(conn, unnamed=False)
    unnamed = await asyncpg.connect(URL, statement_cache_size=0)
    await prepared(unnamed, unnamed=True)
    await unnamed.close()
    await binary_types(conn)
    await transactions(conn)
    await copy(conn)
    await listen_notify(URL)
    await cancel(conn)
    await large_result(conn)
    await many_sessions(URL)

    await conn.execute("DO $$ BEGIN RAISE NOTICE 'hello asyncpg'; END $$")
    await asyncio.sleep(0.05)  # log listeners are called soon, not at once
    check("notice", notices[-1:], [("NOTICE", "00000", "hello asyncpg")])
    await conn.execute("SET TimeZone = 'Asia/Tokyo'")
    check("parameter status", conn.get_settings().TimeZone, "Asia/Tokyo")
    await conn.execute("DROP TABLE apg")
    await conn.close()
    print("asyncpg ok")


asyncio.run(main())
