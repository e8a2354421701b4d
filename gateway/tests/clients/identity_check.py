"""pg_backend_pid() is the pid the client got in BackendKeyData (issue 11), in every protocol
path psycopg 3 takes: simple query, extended (unnamed and prepared), in and out of a
transaction, and with the result column named as the call's. Prints one "name: ok" line per
check; exits 1 at the first failure. Usage: identity_check.py URL"""

import sys

import psycopg


def check(name, cond, detail=""):
    if not cond:
        print(f"{name}: FAILED {detail}")
        sys.exit(1)
    print(f"{name}: ok")


url = sys.argv[1]
with psycopg.connect(url, autocommit=True) as conn:
    pid = conn.info.backend_pid
    check("a pid was given", pid > 0, pid)

    res = conn.pgconn.exec_(b"SELECT pg_backend_pid()")
    got = int(res.get_value(0, 0))
    check("simple query", got == pid, (got, pid))
    check("column name", res.fname(0) == b"pg_backend_pid", res.fname(0))

    with conn.cursor() as cur:
        for i in range(5):
            cur.execute("SELECT pg_backend_pid()")
            (got,) = cur.fetchone()
            check(f"extended {i}", got == pid, (got, pid))
        check("extended column name", cur.description[0].name == "pg_backend_pid")
        for i in range(3):
            cur.execute(
                "SELECT pg_catalog.pg_backend_pid() WHERE %s = 1", (1,), prepare=True
            )
            (got,) = cur.fetchone()
            check(f"prepared {i}", got == pid, (got, pid))
        with conn.transaction():
            cur.execute("SELECT pg_backend_pid() = %s, 1", (pid,))
            check("in a transaction", cur.fetchone()[0] is True)
        cur.execute("SELECT 'pg_backend_pid()' AS t")
        check("a string is a string", cur.fetchone()[0] == "pg_backend_pid()")
    # Another session has another pid.
    with psycopg.connect(url, autocommit=True) as other:
        (got,) = other.execute("SELECT pg_backend_pid()").fetchone()
        check("another session", got == other.info.backend_pid and got != pid, (got, pid))
        # Notifications carry the sender's pid as its client knows it: a client tells its
        # own from others' by it.
        conn.execute("LISTEN ident")
        conn.execute("NOTIFY ident, 'mine'")
        other.execute("NOTIFY ident, 'theirs'")
        got = {n.payload: n.pid for n in conn.notifies(timeout=5, stop_after=2)}
        check("own notification", got.get("mine") == pid, (got, pid))
        check(
            "another's notification",
            got.get("theirs") == other.info.backend_pid,
            (got, other.info.backend_pid),
        )
print("identity ok")
