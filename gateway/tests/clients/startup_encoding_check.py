"""client_encoding given in the startup packet (issue 11, point 4): what the server reports
(ParameterStatus), SHOW, text converted both ways, a character the encoding lacks (22P05), a
name Postgres does not know (22023, the login refused), and RESET back to the startup value.
psycopg 3 (libpq puts client_encoding in the startup packet). Prints one "name: ok <what
happened>" line per check; the lines must be the same directly and through Tidepool.
Usage: startup_encoding_check.py URL"""

import sys

import psycopg
import psycopg.pq


def report(name, what):
    print(f"{name}: ok {what}", flush=True)


def error(e):
    return f"{type(e).__name__} {e.sqlstate} {e.diag.message_primary}"


url = sys.argv[1]
text = "日本語テキスト"
for enc in ["EUC_JP", "SJIS", "LATIN1", "UTF8"]:
    with psycopg.connect(url, autocommit=True, client_encoding=enc) as c:
        report(f"{enc}: reported", c.pgconn.parameter_status(b"client_encoding"))
        report(f"{enc}: SHOW", c.execute("SHOW client_encoding").fetchone()[0])
        # Characters the server makes, as it sends them in this encoding (or its 22P05).
        for code in [233, 26085]:
            res = c.pgconn.exec_(f"SELECT chr({code})".encode())
            if res.status == psycopg.pq.ExecStatus.TUPLES_OK:
                what = res.get_value(0, 0)
            else:
                what = res.error_field(psycopg.pq.DiagnosticField.SQLSTATE)
            report(f"{enc}: chr({code})", what)
        try:
            (got,) = c.execute("SELECT %s::text", (text,)).fetchone()
            report(f"{enc}: round trip", got == text)
        except psycopg.Error as e:
            report(f"{enc}: round trip", error(e))
        except UnicodeError as e:
            report(f"{enc}: round trip", type(e).__name__)
        c.execute("SET client_encoding TO 'UTF8'")
        c.execute("RESET client_encoding")
        report(f"{enc}: after RESET", c.execute("SHOW client_encoding").fetchone()[0])
        report(f"{enc}: reported after RESET", c.pgconn.parameter_status(b"client_encoding"))

try:
    psycopg.connect(url, client_encoding="NOT_AN_ENCODING").close()
    report("unknown encoding", "connected")
except psycopg.Error as e:
    report("unknown encoding", f"{type(e).__name__} {e.sqlstate}")
