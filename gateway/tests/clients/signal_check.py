"""pg_cancel_backend / pg_terminate_backend of a session's pid as its client knows it
(conn.info.backend_pid, from BackendKeyData), and a session ended by the server (issue 11,
points 1 and 2): psycopg 3, a parameter and a constant pid, a query cancelled, idle and busy
sessions terminated, a termination waiting for its target (a timeout) or refused (a negative
one), a pid that is nobody's. Prints one "name: ok <what happened>" line per
check; the lines must be the same directly and through Tidepool.
Usage: signal_check.py URL"""

import select
import sys
import threading
import time

import psycopg


def report(name, what):
    print(f"{name}: ok {what}", flush=True)


def error(e):
    diag = e.diag
    return f"{type(e).__name__} {e.sqlstate} {diag.severity_nonlocalized} {diag.message_primary}"


def run_in_thread(conn, sql):
    """Runs sql on conn in a thread; returns a function giving what happened."""
    box = {}

    def body():
        try:
            conn.execute(sql)
            box["r"] = "no error"
        except psycopg.Error as e:
            box["r"] = error(e)

    t = threading.Thread(target=body)
    t.start()

    def result():
        t.join(30)
        return box.get("r", "still running")

    return result


def wait_running(observer, pid_of_victim_query, deadline=10):
    """Waits until a pg_sleep is running (seen in pg_stat_activity by its text)."""
    end = time.time() + deadline
    while time.time() < end:
        (n,) = observer.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = %s",
            (pid_of_victim_query,),
        ).fetchone()
        if n:
            return True
        time.sleep(0.05)
    return False


def wait_readable(conn, deadline=5):
    """Waits until the server has sent the connection something (a terminated session's
    FATAL), at most `deadline` seconds: a loaded machine may take longer than a fixed sleep."""
    try:
        select.select([conn.fileno()], [], [], deadline)
    except psycopg.OperationalError:
        pass  # already closed: the FATAL was read


def next_statement(conn):
    """What the next statement of a (possibly terminated) session sees, and whether the
    connection is closed after it."""
    try:
        (v,) = conn.execute("SELECT 1").fetchone()
        what = f"answered {v}"
    except psycopg.Error as e:
        what = error(e)
    return f"{what}; closed={conn.closed}"


url = sys.argv[1]
killer = psycopg.connect(url, autocommit=True)
notices = []
killer.add_notice_handler(
    lambda d: notices.append(f"{d.severity_nonlocalized} {d.sqlstate} {d.message_primary}")
)

for how in ["parameter", "constant"]:
    # Cancel a running query.
    victim = psycopg.connect(url, autocommit=True)
    pid = victim.info.backend_pid
    sleep = f"SELECT pg_sleep(20) -- cancel {how}"
    result = run_in_thread(victim, sleep)
    report(f"cancel {how}: query running", wait_running(killer, sleep))
    if how == "parameter":
        (r,) = killer.execute("SELECT pg_cancel_backend(%s)", (pid,)).fetchone()
    else:
        (r,) = killer.execute(f"SELECT pg_cancel_backend({pid})").fetchone()
    report(f"cancel {how}: answer", r)
    report(f"cancel {how}: the victim's query", result())
    report(f"cancel {how}: the victim goes on", next_statement(victim))

    # Terminate an idle session.
    if how == "parameter":
        cur = killer.execute("SELECT pg_terminate_backend(%s)", (pid,))
    else:
        cur = killer.execute(f"SELECT pg_catalog.pg_terminate_backend({pid}) AS t")
    report(f"terminate idle {how}: answer", (cur.description[0].name, cur.fetchone()[0]))
    wait_readable(victim)
    report(f"terminate idle {how}: the victim", next_statement(victim))
    victim.close()

    # Terminate a session running a query, in a transaction.
    victim = psycopg.connect(url, autocommit=True)
    pid = victim.info.backend_pid
    sleep = f"SELECT pg_sleep(20) -- terminate {how}"
    victim.execute("BEGIN")
    result = run_in_thread(victim, sleep)
    report(f"terminate busy {how}: query running", wait_running(killer, sleep))
    if how == "parameter":
        (r,) = killer.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()
    else:
        (r,) = killer.execute(f"SELECT pg_terminate_backend({pid})").fetchone()
    report(f"terminate busy {how}: answer", r)
    report(f"terminate busy {how}: the victim's query", result())
    report(f"terminate busy {how}: closed", victim.closed)
    victim.close()

# A termination with a timeout returns once the target is gone: the victim's connection is
# closed by then (its FATAL is there to read). Its transaction holds a backend.
for how in ["constant", "parameter", "both parameters"]:
    victim = psycopg.connect(url, autocommit=True)
    pid = victim.info.backend_pid
    victim.execute("BEGIN")
    victim.execute("SELECT 1")
    if how == "constant":
        cur = killer.execute(f"SELECT pg_terminate_backend({pid}, 10000)")
    elif how == "parameter":
        cur = killer.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,))
    else:
        cur = killer.execute("SELECT pg_terminate_backend(%s, %s)", (pid, 10000))
    (r,) = cur.fetchone()
    closed = bool(select.select([victim.fileno()], [], [], 0)[0])
    report(f"terminate with a timeout, {how}: answer", r)
    report(f"terminate with a timeout, {how}: the victim already closed", closed)
    report(f"terminate with a timeout, {how}: the victim", next_statement(victim))
    victim.close()

# A negative timeout is refused before anything is signalled.
victim = psycopg.connect(url, autocommit=True)
pid = victim.info.backend_pid
for sql, args in [(f"SELECT pg_terminate_backend({pid}, -1)", None),
                  ("SELECT pg_terminate_backend(%s, -5)", (pid,))]:
    try:
        killer.execute(sql, args)
        report("negative timeout", "no error")
    except psycopg.Error as e:
        report("negative timeout", error(e))
time.sleep(0.3)
report("negative timeout: the victim", next_statement(victim))
victim.close()

# A pid that is no session and no backend: Postgres's false and warning.
notices.clear()
(r,) = killer.execute("SELECT pg_terminate_backend(2000000000)").fetchone()
report("nobody's pid: answer", r)
report("nobody's pid: notices", notices)
notices.clear()
(r,) = killer.execute("SELECT pg_cancel_backend(%s)", (2000000001,)).fetchone()
report("nobody's pid, parameter: answer", r)
report("nobody's pid, parameter: notices", notices)

# In a failed transaction the call is refused, and nothing is signalled.
victim = psycopg.connect(url, autocommit=True)
pid = victim.info.backend_pid
killer.execute("BEGIN")
try:
    killer.execute("SELECT 1/0")
except psycopg.Error as e:
    report("failed transaction: first error", error(e))
try:
    killer.execute("SELECT pg_terminate_backend(%s)", (pid,))
    report("failed transaction: the call", "no error")
except psycopg.Error as e:
    report("failed transaction: the call", error(e))
killer.execute("ROLLBACK")
time.sleep(0.3)
report("failed transaction: the victim", next_statement(victim))
victim.close()

# SQL PREPARE / EXECUTE / DEALLOCATE: a statement prepared by SQL signals at each EXECUTE, with
# its pid a parameter (an EXECUTE argument) or a constant, in one batch or across batches.
def results(cur):
    """Every result of a multi-statement query: its command tag and rows."""
    out = []
    while True:
        out.append((cur.statusmessage, cur.fetchall() if cur.description else None))
        if not cur.nextset():
            return out


def sql_prepared(name, prepare, execute, expect):
    """Runs `prepare` then `execute` (None: `prepare` holds both) on a victim's pid
    (`{pid}`) while the victim runs a query; reports the answers, the notices, and what the
    victim saw (`expect`: cancel or terminate)."""
    victim = psycopg.connect(url, autocommit=True)
    pid = victim.info.backend_pid
    sleep = f"SELECT pg_sleep(20) -- {name}"
    result = run_in_thread(victim, sleep)
    report(f"{name}: query running", wait_running(killer, sleep))
    notices.clear()
    out = results(killer.execute(prepare.format(pid=pid)))
    if execute:
        out += results(killer.execute(execute.format(pid=pid)))
    report(f"{name}: answers", out)
    report(f"{name}: notices", notices)
    report(f"{name}: the victim's query", result())
    if expect == "terminate":
        wait_readable(victim)
    report(f"{name}: the victim", next_statement(victim))
    victim.close()


sql_prepared(
    "SQL PREPARE, parameter, one batch",
    "PREPARE sig_p(int) AS SELECT pg_cancel_backend($1); EXECUTE sig_p({pid})",
    None,
    "cancel",
)
sql_prepared(
    "SQL PREPARE, constant, one batch",
    "PREPARE sig_c AS SELECT pg_terminate_backend({pid}); EXECUTE sig_c;",
    None,
    "terminate",
)
sql_prepared(
    "SQL PREPARE, parameter, two batches",
    "DEALLOCATE sig_p; PREPARE sig_p AS SELECT 1 AS one, pg_catalog.pg_cancel_backend($1) AS c",
    "EXECUTE sig_p ({pid})",
    "cancel",
)
sql_prepared(
    "SQL PREPARE, constant, two batches",
    "DEALLOCATE PREPARE sig_c; PREPARE sig_c AS SELECT pg_cancel_backend({pid})",
    "SELECT 1; EXECUTE sig_c",
    "cancel",
)
# Gone with DEALLOCATE, DEALLOCATE ALL and DISCARD ALL: a statement of the same name that does
# not signal answers the pid itself.
victim = psycopg.connect(url, autocommit=True)
pid = victim.info.backend_pid
for forget in ["DEALLOCATE sig_t; ", "DEALLOCATE ALL; ", "DISCARD ALL"]:
    killer.execute("PREPARE sig_t(int) AS SELECT pg_terminate_backend($1)")
    if forget == "DISCARD ALL":
        # Not in a multi-statement query (an implicit transaction).
        killer.execute(forget)
        forget = ""
    out = results(killer.execute(f"{forget}PREPARE sig_t(int) AS SELECT $1; EXECUTE sig_t({pid})"))
    report(f"after {forget or 'DISCARD ALL'}", (out[-1][1] == [(pid,)], [r[0] for r in out]))
    killer.execute("DEALLOCATE ALL")
killer.execute("PREPARE sig_t(int) AS SELECT pg_terminate_backend($1)")
killer.execute("DEALLOCATE sig_t")
out = results(killer.execute("PREPARE sig_t(int) AS SELECT $1"))
out += results(killer.execute(f"EXECUTE sig_t({pid})"))
report("after DEALLOCATE, two batches", out[-1][1] == [(pid,)])
killer.execute("DEALLOCATE sig_t")
# A pid that is nobody's, by EXECUTE: Postgres's false and warning.
notices.clear()
killer.execute("PREPARE sig_n(int) AS SELECT pg_cancel_backend($1)")
report("SQL PREPARE, nobody's pid", results(killer.execute("EXECUTE sig_n(2000000002)")))
report("SQL PREPARE, nobody's pid: notices", notices)
killer.execute("DEALLOCATE sig_n")
report("the untouched victim", next_statement(victim))
victim.close()

# pg_backend_pid() in a SQL-prepared statement, and beside one in a batch.
own = killer.info.backend_pid
out = results(killer.execute("PREPARE sig_b AS SELECT pg_backend_pid(); EXECUTE sig_b"))
report("pg_backend_pid() by EXECUTE", out[-1][1] == [(own,)])
out = results(killer.execute("EXECUTE sig_b; DEALLOCATE sig_b; SELECT pg_backend_pid()"))
report("pg_backend_pid() beside EXECUTE", (out[0][1] == [(own,)], out[-1][1] == [(own,)]))

# A session terminating itself by its own pid.
(r,) = killer.execute("SELECT 1").fetchone()
own = killer.info.backend_pid
try:
    killer.execute("SELECT pg_terminate_backend(%s)", (own,))
    time.sleep(0.5)
    report("own pid", next_statement(killer))
except psycopg.Error as e:
    report("own pid", f"{error(e)}; closed={killer.closed}")
killer.close()
