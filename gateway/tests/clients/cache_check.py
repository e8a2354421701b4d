"""Prepared statements after the schema changes under them (issue 11, point 3): ALTER TABLE,
ALTER COLUMN TYPE, a dropped and re-created type, in and out of a transaction. psycopg 3 with
every statement prepared (prepare_threshold=0), and asyncpg with its statement cache (and its
InvalidCachedStatementError retry). Prints one "name: ok <what happened>" line per check; the
lines must be the same directly and through Tidepool.

Usage: cache_check.py URL [--fresh-backends]: with --fresh-backends, a pause after each schema
change, for a Tidepool whose pooler replaces its backends after a short lifetime: the
statements then run on backends that never prepared them (and were prepared on others)."""

import asyncio
import sys
import time

import psycopg


def report(name, what):
    print(f"{name}: ok {what}", flush=True)


url = sys.argv[1]
fresh_backends = "--fresh-backends" in sys.argv[2:]


def rehome():
    if fresh_backends:
        time.sleep(0.8)


def outcome(conn, sql):
    try:
        rows = conn.execute(sql).fetchall()
        return f"rows {rows}"
    except psycopg.Error as e:
        return f"{type(e).__name__} {e.sqlstate} {e.diag.message_primary}"


admin = psycopg.connect(url, autocommit=True)
admin.execute("DROP TABLE IF EXISTS cc_t, cc_e, cc_d")
admin.execute("DROP TYPE IF EXISTS cc_mood")
admin.execute("CREATE TABLE cc_t (a int)")
admin.execute("INSERT INTO cc_t VALUES (1)")
admin.execute("CREATE TYPE cc_mood AS ENUM ('sad', 'ok')")
admin.execute("CREATE TABLE cc_e (m cc_mood)")
admin.execute("INSERT INTO cc_e VALUES ('ok')")

# psycopg 3, autocommit.
p = psycopg.connect(url, autocommit=True, prepare_threshold=0)
for i in range(2):
    report(f"psycopg before {i}", outcome(p, "SELECT * FROM cc_t"))
admin.execute("ALTER TABLE cc_t ADD COLUMN b text DEFAULT 'x'")
rehome()
for i in range(3):
    report(f"psycopg after ADD COLUMN {i}", outcome(p, "SELECT * FROM cc_t"))

# In a transaction.
report("psycopg tx before", outcome(p, "SELECT a FROM cc_t"))
admin.execute("ALTER TABLE cc_t ALTER COLUMN a TYPE bigint")
rehome()
p.execute("BEGIN")
report("psycopg tx after ALTER TYPE 0", outcome(p, "SELECT a FROM cc_t"))
report("psycopg tx after ALTER TYPE 1", outcome(p, "SELECT a FROM cc_t"))
p.execute("ROLLBACK")
for i in range(2):
    report(f"psycopg after rollback {i}", outcome(p, "SELECT a FROM cc_t"))

# A dropped and re-created type.
for i in range(2):
    report(f"psycopg enum before {i}", outcome(p, "SELECT m FROM cc_e"))
admin.execute("DROP TABLE cc_e")
admin.execute("DROP TYPE cc_mood")
admin.execute("CREATE TYPE cc_mood AS ENUM ('sad', 'ok', 'glad')")
admin.execute("CREATE TABLE cc_e (m cc_mood)")
admin.execute("INSERT INTO cc_e VALUES ('glad')")
rehome()
for i in range(3):
    report(f"psycopg enum re-created {i}", outcome(p, "SELECT m FROM cc_e"))

# A dropped table, then re-created with other columns.
admin.execute("DROP TABLE IF EXISTS cc_d")
admin.execute("CREATE TABLE cc_d (a int)")
report("psycopg dropped before", outcome(p, "SELECT * FROM cc_d"))
admin.execute("DROP TABLE cc_d")
rehome()
for i in range(2):
    report(f"psycopg dropped {i}", outcome(p, "SELECT * FROM cc_d"))
report("psycopg dropped, the session goes on", outcome(p, "SELECT 1"))
admin.execute("CREATE TABLE cc_d (a int, b int)")
rehome()
report("psycopg re-created", outcome(p, "SELECT * FROM cc_d"))
p.close()


# asyncpg: its statement cache, and the retry on InvalidCachedStatementError.
async def with_asyncpg():
    import asyncpg

    c = await asyncpg.connect(url)

    async def run(name, sql):
        try:
            rows = await c.fetch(sql)
            report(name, f"rows {[tuple(r) for r in rows]}")
        except asyncpg.PostgresError as e:
            report(name, f"{type(e).__name__} {e.sqlstate} {e.message}")

    await admin_async("DROP TABLE IF EXISTS cc_a")
    await admin_async("CREATE TABLE cc_a (a int)")
    await admin_async("INSERT INTO cc_a VALUES (1)")
    for i in range(2):
        await run(f"asyncpg before {i}", "SELECT * FROM cc_a")
    await admin_async("ALTER TABLE cc_a ADD COLUMN b text DEFAULT 'y'")
    rehome()
    for i in range(2):
        await run(f"asyncpg after ADD COLUMN {i}", "SELECT * FROM cc_a")
    await admin_async("ALTER TABLE cc_a ALTER COLUMN a TYPE bigint")
    rehome()
    try:
        async with c.transaction():
            await run("asyncpg in a transaction", "SELECT * FROM cc_a")
    except asyncpg.PostgresError as e:
        report("asyncpg transaction", f"{type(e).__name__} {e.sqlstate}")
    await run("asyncpg after the transaction", "SELECT * FROM cc_a")
    await c.close()


async def admin_async(sql):
    admin.execute(sql)


asyncio.run(with_asyncpg())
admin.close()
