"""A session ended by the server (issue 11, point 2): the backend running a client's query, or
holding its open transaction, is terminated from another connection (pg_terminate_backend of
the pid pg_stat_activity shows); the client sees Postgres's FATAL 57P01, nothing after it, and a
closed connection. psycopg 3 and psql. Prints one "name: ok <what happened>" line per check; the
lines must be the same directly and through Tidepool. Usage: server_end_check.py URL"""

import subprocess
import sys
import threading
import time

import psycopg


def report(name, what):
    print(f"{name}: ok {what}", flush=True)


def error(e):
    # The whole text libpq gathered: a second error after the FATAL would show here.
    lines = [l for l in str(e).splitlines() if l.strip()]
    return f"{type(e).__name__} {e.sqlstate} {lines}"


def terminate_where(observer, condition, value, deadline=10):
    """pg_terminate_backend of the backends pg_stat_activity shows matching; how many."""
    end = time.time() + deadline
    while time.time() < end:
        rows = observer.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE pid <> pg_backend_pid() AND {condition}",
            (value,),
        ).fetchall()
        if rows:
            return [r[0] for r in rows]
        time.sleep(0.05)
    return []


url = sys.argv[1]
observer = psycopg.connect(url, autocommit=True)

# A running query.
victim = psycopg.connect(url, autocommit=True)
box = {}
sleep = "SELECT pg_sleep(20) -- server end, running"


def run():
    try:
        victim.execute(sleep)
        box["r"] = "no error"
    except psycopg.Error as e:
        box["r"] = error(e)


t = threading.Thread(target=run)
t.start()
report("running: terminated", terminate_where(observer, "state = 'active' AND query = %s", sleep))
t.join(30)
report("running: the client", box.get("r", "still running"))
report("running: closed", victim.closed)
victim.close()

# An open transaction, idle between statements.
victim = psycopg.connect(url, autocommit=True)
victim.execute("BEGIN")
marker = "SELECT 1 -- server end, idle in transaction"
victim.execute(marker)
report(
    "idle in transaction: terminated",
    terminate_where(observer, "state = 'idle in transaction' AND query = %s", marker),
)
time.sleep(0.5)
try:
    victim.execute("SELECT 2")
    report("idle in transaction: the client", "answered")
except psycopg.Error as e:
    report("idle in transaction: the client", error(e))
report("idle in transaction: closed", victim.closed)
victim.close()

# psql running a query.
sleep = "SELECT pg_sleep(20) -- server end, psql"
psql = subprocess.Popen(
    ["psql", url, "-X", "-q", "-c", sleep],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
)
report("psql: terminated", terminate_where(observer, "state = 'active' AND query = %s", sleep))
out, err = psql.communicate(timeout=30)
report("psql: exit", psql.returncode)
report("psql: said", [l for l in (out + err).splitlines() if l.strip()])
observer.close()
