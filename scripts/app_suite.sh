#!/usr/bin/env bash
# Runs a real application's own test suite twice against a throwaway PostgreSQL 15 cluster:
#   (a) Postgres directly, over TCP;
#   (b) through tidepool-gateway → tidepool-pooler with pooling active (a small --pool-size and
#       --max-backends, smaller than the number of connections the suite opens);
# then compares the counts (tests run, failures, errors, skips) and the names of the tests that
# did not pass, and prints what differs.
#
# The application is Django (its own test suite, `tests/runtests.py`, unchanged) with the
# PostgreSQL backend (psycopg 3). The default labels cover `django.contrib.postgres`
# (`postgres_tests`: JSONB-backed fields, hstore, pg_trgm, unaccent, citext, btree_gist/gin,
# bloom, uuid-ossp through its migrations, full-text search, ranges, arrays, exclusion
# constraints, server-side cursors), JSONField (`model_fields`), the backend itself (`backends`:
# transactions, savepoints, sequences, introspection, cursors, threads), schema changes and
# migrations (`schema`, `migrations`), `select_for_update` (row locks from several threads,
# NOWAIT / SKIP LOCKED) and `transactions`.
#
# With APP=pgpubsub the application is django-pgpubsub $PGPUBSUB_VERSION (a task framework on
# LISTEN/NOTIFY): its own pytest suite (pgpubsub/tests from the PyPI sdist, unchanged) with
# psycopg2, django-pgtrigger and Django 4.2. Its tests create rows whose triggers (installed by the
# migrations, through django-pgtrigger) store a notification and NOTIFY, LISTEN on the test
# session's own connection (in a transaction, so the LISTEN takes effect at commit), count the
# notifications that arrive, and process them with SELECT … FOR UPDATE SKIP LOCKED.
#
# NOT part of scripts/test.sh: it takes many minutes and downloads Django and Python packages
# from PyPI. Run it by hand (as root, Debian 12, PostgreSQL 15 and python3 installed):
#
#   scripts/app_suite.sh                  the default labels, both runs
#   scripts/app_suite.sh LABEL...         other runtests.py labels (e.g. postgres_tests.test_hstore)
#   APP=pgpubsub scripts/app_suite.sh     django-pgpubsub's whole suite, both runs
#   APP=pgpubsub scripts/app_suite.sh ARG...  other pytest arguments (e.g. pgpubsub/tests/test_core.py)
#
# Environment:
#   APP                      django (default) or pgpubsub.
#   TIDEPOOL_APP_PSYCOPG     APP=pgpubsub: 2 (psycopg2, default) or 3 (psycopg 3, with
#                            PGPUBSUB_USE_PSYCOPG_V3=True; Django 4.2 uses it too).
#   TIDEPOOL_APP_DIR         work directory (default /tmp/tidepool-app): the download cache,
#                            the unpacked sources, the virtualenvs and the results stay there
#                            between runs (results/ for Django, results-pgpubsub/ for
#                            django-pgpubsub); the cluster is removed on exit.
#   TIDEPOOL_BIN_DIR         tidepool-gateway / tidepool-pooler binaries (default target/debug of
#                            this checkout; build them first: cargo build -p tidepool-gateway -p
#                            tidepool-pooler).
#   TIDEPOOL_APP_POOL_SIZE   pooler --pool-size (default 2: backends per (user, database)).
#   TIDEPOOL_APP_MAX_BACKENDS  pooler --max-backends (default 4).
#   TIDEPOOL_APP_CORES       --cores of pooler and gateway (default 2).
#   TIDEPOOL_APP_TIMEOUT     seconds allowed per test-suite run (default 2400).
#   TIDEPOOL_APP_RUNS        which runs (default "direct tidepool").
#   TIDEPOOL_APP_PARALLEL    runtests.py --parallel (default 1). With N > 1 Django clones the test
#                            databases with CREATE DATABASE … TEMPLATE and runs N processes.
#   TIDEPOOL_KEEP_TEST_DIRS=1  keep the cluster directory (data, logs) after exit.
#
# How it works:
#   - Django $DJANGO_VERSION: `pip download django==… --no-binary :all:` (the sdist carries
#     tests/), unpacked under the work directory; a virtualenv with the versions pinned below
#     (asgiref, sqlparse, psycopg[binary], psycopg-pool); runtests.py runs with PYTHONPATH at the unpacked
#     Django, so the tests are those of that release, unchanged.
#   - Cluster: initdb as the `postgres` OS user (UTF8, C locale, fsync off), free loopback
#     ports, pg_hba per docs/CONTRACTS.md. The tests log in as `django`, a superuser with a SCRAM
#     password (the postgres_tests migrations create bloom and uuid-ossp, which are not trusted
#     extensions), over TCP; through Tidepool the gateway does SCRAM passthrough. The pooler's
#     admin connection is the bootstrap superuser over the socket (peer).
#   - A settings module (tests/test_tidepool.py) with the two databases Django's suite needs,
#     `default` and `other`, both on the host and port of the run; Django creates and drops the
#     test databases itself (CREATE DATABASE / DROP DATABASE, through the gateway in run b).
#   - `runtests.py --settings=test_tidepool --parallel 1 -v 2 --noinput LABELS`: one process, which
#     holds up to four connections at once (default, other, the `postgres` database for
#     CREATE/DROP DATABASE, and the threads of select_for_update/backends/transactions tests),
#     more than --pool-size 2 for one (user, database).
#   - APP=pgpubsub: the sdist from files.pythonhosted.org (checked against its sha256), unpacked
#     under the work directory; a virtualenv with the versions pinned below. The sdist carries the
#     tests and the pytest configuration (pyproject.toml: DJANGO_SETTINGS_MODULE = "settings",
#     --reuse-db) but not the settings module of its repository, so the script writes
#     settings.py beside pyproject.toml (the apps the tests need and the database of the run).
#     `python -m pytest --create-db -p no:cacheprovider --junitxml=… ARGS`: pytest-django creates
#     the test database (and runs every migration, triggers included) afresh in each run, so the
#     Tidepool run does not reuse what the direct run made.
#
# Output (in $TIDEPOOL_APP_DIR/results, or results-pgpubsub):
#   direct/, tidepool/     runtests.log, status (one "test-id outcome" line per test), summary
#   differing.txt          tests whose outcome differs, direct → tidepool
#   summary.md             counts and differing tests
#   logs/                  postgres.log, pooler.log, gateway.log
# Exit status: 0 when the outcomes are the same, 1 when some differ, 2 when something else failed.
set -euo pipefail

log() { printf 'app_suite.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 2; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${TIDEPOOL_APP_DIR:-/tmp/tidepool-app}
BIN_DIR=${TIDEPOOL_BIN_DIR:-$REPO/target/debug}
POOL_SIZE=${TIDEPOOL_APP_POOL_SIZE:-2}
MAX_BACKENDS=${TIDEPOOL_APP_MAX_BACKENDS:-4}
CORES=${TIDEPOOL_APP_CORES:-2}
RUN_TIMEOUT=${TIDEPOOL_APP_TIMEOUT:-2400}
RUNS=${TIDEPOOL_APP_RUNS:-direct tidepool}
PARALLEL=${TIDEPOOL_APP_PARALLEL:-1}
PG_BIN=/usr/lib/postgresql/15/bin
APP=${APP:-django}
DJANGO_VERSION=5.1.15
PGPUBSUB_VERSION=1.3.1
PGPUBSUB_URL=https://files.pythonhosted.org/packages/fc/f5/9ce8dd9674409971e75f899ce41dd88b1b2fba28adeb331f1a680e59ceb5/django_pgpubsub-$PGPUBSUB_VERSION.tar.gz
PGPUBSUB_SHA256=1fedb0b5b8915ee7886510731780d527f94abfb643b45bffe71f5c4694c3f7fa
case $APP in
django)
    PY_PACKAGES=(asgiref==3.13.0 sqlparse==0.6.1 'psycopg[binary]==3.3.9' psycopg-pool==3.3.3)
    VENV_NAME=venv
    DEFAULT_LABELS=(postgres_tests model_fields backends schema migrations select_for_update transactions
        queries expressions aggregation db_functions constraints indexes introspection inspectdb bulk_create
        transaction_hooks fixtures serializers)
    APP_TITLE="Django $DJANGO_VERSION"
    ;;
pgpubsub)
    # django-pgpubsub declares django>=2 and django-pgtrigger>=4.7.0; its dev dependencies pin
    # psycopg2-binary 2.9.3 (no wheel for Python 3.11: 2.9.13 here), pytest 7, pytest-django 4.5.
    PY_PACKAGES=(django==4.2.30 django-pgtrigger==4.17.0 pytest==8.3.5 pytest-django==4.9.0)
    case ${TIDEPOOL_APP_PSYCOPG:-2} in
    2)
        PY_PACKAGES+=(psycopg2-binary==2.9.13)
        VENV_NAME=venv-pgpubsub
        DRIVER=psycopg2
        ;;
    3)
        # Django 4.2 takes psycopg 3 when it is installed; pgpubsub needs to be told.
        PY_PACKAGES+=('psycopg[binary]==3.3.9')
        VENV_NAME=venv-pgpubsub-psycopg3
        DRIVER=psycopg
        export PGPUBSUB_USE_PSYCOPG_V3=True
        ;;
    *) printf 'app_suite.sh: error: TIDEPOOL_APP_PSYCOPG is 2 or 3\n' >&2; exit 2 ;;
    esac
    DEFAULT_LABELS=()
    APP_TITLE="django-pgpubsub $PGPUBSUB_VERSION ($DRIVER)"
    ;;
*) printf 'app_suite.sh: error: unknown APP %s (django, pgpubsub)\n' "$APP" >&2; exit 2 ;;
esac
ADMIN_USER=postgres
APP_USER=django
APP_PASSWORD=django-pw
if [[ $# -gt 0 ]]; then LABELS=("$@"); else LABELS=(${DEFAULT_LABELS[@]+"${DEFAULT_LABELS[@]}"}); fi
COMMAND_LINE="scripts/app_suite.sh${*:+ $*}"
[[ $APP == django ]] || COMMAND_LINE="APP=$APP $COMMAND_LINE"
for v in TIDEPOOL_APP_PSYCOPG TIDEPOOL_APP_POOL_SIZE TIDEPOOL_APP_MAX_BACKENDS TIDEPOOL_APP_CORES TIDEPOOL_APP_RUNS TIDEPOOL_APP_PARALLEL; do
    [[ -n ${!v:-} ]] && COMMAND_LINE="$v=\"${!v}\" $COMMAND_LINE"
done

[[ $(id -u) -eq 0 ]] || die "run as root (Postgres runs as the postgres OS user through runuser)"
id postgres >/dev/null 2>&1 || die "no postgres OS user: install postgresql-15"
for b in initdb pg_ctl psql; do
    [[ -x $PG_BIN/$b ]] || die "$PG_BIN/$b missing: install postgresql-15"
done
for e in hstore pg_trgm bloom uuid-ossp; do
    [[ -f /usr/share/postgresql/15/extension/$e.control ]] || die "extension $e missing (postgresql-15 ships contrib)"
done
command -v python3 >/dev/null || die "python3 missing"
if [[ $RUNS == *tidepool* ]]; then
    for b in tidepool-gateway tidepool-pooler; do
        [[ -x $BIN_DIR/$b ]] || die "$BIN_DIR/$b missing: cargo build -p tidepool-gateway -p tidepool-pooler"
    done
fi

export LC_ALL=C.UTF-8 LANG=C.UTF-8
mkdir -p "$WORK"
chmod 755 "$WORK"

# --- 1. the application and its Python dependencies ---------------------------------------------

DJANGO_DIR=$WORK/django-$DJANGO_VERSION
VENV=$WORK/$VENV_NAME
make_venv() { # module-to-import...
    if [[ ! -f $VENV/.complete ]] || [[ $(cat "$VENV/.complete") != "${PY_PACKAGES[*]}" ]]; then
        log "virtualenv $VENV: ${PY_PACKAGES[*]}"
        rm -rf "$VENV"
        python3 -m venv "$VENV" || die "python3 -m venv failed (apt-get install python3-venv)"
        "$VENV/bin/pip" install -q "${PY_PACKAGES[@]}" || die "pip install ${PY_PACKAGES[*]} failed"
        echo "${PY_PACKAGES[*]}" >"$VENV/.complete"
    fi
    local m
    for m in "$@"; do
        "$VENV/bin/python" -c "import $m" || die "the virtualenv lacks $m"
    done
}
fetch_django() {
    if [[ -f $DJANGO_DIR/tests/runtests.py && -f $WORK/.complete-django-$DJANGO_VERSION ]]; then
        log "Django $DJANGO_VERSION present: $DJANGO_DIR"
    else
        mkdir -p "$WORK/dl"
        local sdist=$WORK/dl/django-$DJANGO_VERSION.tar.gz
        if [[ ! -f $sdist ]]; then
            log "pip download django==$DJANGO_VERSION (sdist: it carries tests/)"
            python3 -m pip download -q "django==$DJANGO_VERSION" --no-binary :all: --no-deps -d "$WORK/dl" \
                || die "pip download django==$DJANGO_VERSION failed"
        fi
        rm -rf "$DJANGO_DIR"
        tar -xzf "$sdist" -C "$WORK" || die "unpacking $sdist failed"
        [[ -f $DJANGO_DIR/tests/runtests.py ]] || die "$sdist has no tests/runtests.py"
        touch "$WORK/.complete-django-$DJANGO_VERSION"
    fi
    make_venv psycopg asgiref sqlparse
}

PGPUBSUB_DIR=$WORK/django_pgpubsub-$PGPUBSUB_VERSION
fetch_pgpubsub() {
    if [[ -f $PGPUBSUB_DIR/pgpubsub/tests/conftest.py && -f $WORK/.complete-pgpubsub-$PGPUBSUB_VERSION ]]; then
        log "django-pgpubsub $PGPUBSUB_VERSION present: $PGPUBSUB_DIR"
    else
        mkdir -p "$WORK/dl"
        local sdist=$WORK/dl/django_pgpubsub-$PGPUBSUB_VERSION.tar.gz
        # The URL, not `pip download --no-binary`: that builds the sdist's build backend (poetry)
        # and its dependencies (maturin, in Rust) from source just to read the metadata.
        if [[ ! -f $sdist ]]; then
            log "download $PGPUBSUB_URL"
            curl -sSfL -o "$sdist.part" "$PGPUBSUB_URL" || die "download of $PGPUBSUB_URL failed"
            mv "$sdist.part" "$sdist"
        fi
        echo "$PGPUBSUB_SHA256  $sdist" | sha256sum -c --status || die "$sdist: sha256 differs from $PGPUBSUB_SHA256"
        rm -rf "$PGPUBSUB_DIR"
        tar -xzf "$sdist" -C "$WORK" || die "unpacking $sdist failed"
        [[ -f $PGPUBSUB_DIR/pgpubsub/tests/conftest.py ]] || die "$sdist has no pgpubsub/tests/conftest.py"
        touch "$WORK/.complete-pgpubsub-$PGPUBSUB_VERSION"
    fi
    make_venv django pgtrigger "$DRIVER" pytest pytest_django
}

# --- 2. cluster and Tidepool ---------------------------------------------------------------------

RESULTS=$WORK/results
[[ $APP == django ]] || RESULTS=$WORK/results-$APP
[[ $APP == pgpubsub && $DRIVER == psycopg ]] && RESULTS+=-psycopg3

CLUSTER_ADMIN=$ADMIN_USER
RUN_PREFIX=tidepool-app-run
PG_MAX_CONNECTIONS=100
PG_EXTRA_CONF=
# shellcheck source=lib/throwaway.sh
source "$REPO/scripts/lib/throwaway.sh"

# The cluster, with the application's superuser (a SCRAM verifier: password_encryption's
# default) and its database.
start_app_cluster() {
    start_cluster
    admin_psql postgres "CREATE ROLE $APP_USER LOGIN SUPERUSER PASSWORD '$APP_PASSWORD'"
    admin_psql postgres "CREATE DATABASE $APP_USER OWNER $APP_USER"
}

# --- 3. the test suite ---------------------------------------------------------------------------

write_settings_pgpubsub() { # port
    cat >"$PGPUBSUB_DIR/settings.py" <<EOF
# Written by Tidepool's scripts/app_suite.sh: django-pgpubsub's own tests on PostgreSQL
# (pyproject.toml: DJANGO_SETTINGS_MODULE = "settings"; the sdist does not ship one).
SECRET_KEY = "django-pgpubsub-tests"
INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "pgpubsub",
    "pgpubsub.tests",
    "pgtrigger",
]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": "127.0.0.1",
        "PORT": $1,
        "USER": "$APP_USER",
        "PASSWORD": "$APP_PASSWORD",
        "NAME": "$APP_USER",
        "TEST": {"NAME": "test_tidepool_pgpubsub"},
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
USE_TZ = False
EOF
}

write_settings_django() { # port
    cat >"$DJANGO_DIR/tests/test_tidepool.py" <<EOF
# Written by Tidepool's scripts/app_suite.sh: Django's own test suite on PostgreSQL.
_DB = {
    "ENGINE": "django.db.backends.postgresql",
    "HOST": "127.0.0.1",
    "PORT": $1,
    "USER": "$APP_USER",
    "PASSWORD": "$APP_PASSWORD",
    "NAME": "$APP_USER",
}
DATABASES = {
    "default": dict(_DB, TEST={"NAME": "test_tidepool_default"}),
    "other": dict(_DB, TEST={"NAME": "test_tidepool_other"}),
}
SECRET_KEY = "django_tests_secret_key"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
USE_TZ = False
EOF
}

run_suite() { # name port
    local name=$1 port=$2 out=$RESULTS/$1
    rm -rf "$out"
    mkdir -p "$out"
    "write_settings_$APP" "$port"
    local cmd dir pythonpath progress
    if [[ $APP == django ]]; then
        cmd=("$VENV/bin/python" -u runtests.py --settings=test_tidepool --parallel "$PARALLEL" -v 2 --noinput "${LABELS[@]}")
        dir=$DJANGO_DIR/tests
        pythonpath=$DJANGO_DIR
        progress=' \.\.\. '
    else
        cmd=("$VENV/bin/python" -u -m pytest --create-db -p no:cacheprovider -v --junitxml="$out/junit.xml"
            ${LABELS[@]+"${LABELS[@]}"})
        dir=$PGPUBSUB_DIR
        pythonpath=$PGPUBSUB_DIR
        progress=' (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)'
    fi
    echo "(cd $dir && PYTHONPATH=$pythonpath ${cmd[*]})" >"$out/command"
    log "run $name (port $port): ${cmd[*]}"
    local started=$SECONDS timed_out=0 last_report=$SECONDS i
    set -m
    (cd "$dir" && PYTHONPATH=$pythonpath exec "${cmd[@]}") >"$out/runtests.log" 2>&1 &
    SUITE_PID=$!
    set +m
    # How many connections the suite holds at once (sampled twice a second from pg_stat_activity
    # in the direct run, where each client connection is one backend): the pool must be smaller.
    local samples=0
    while kill -0 "$SUITE_PID" 2>/dev/null; do
        if [[ $name == direct ]]; then
            for ((i = 0; i < 4; i++)); do
                admin_psql postgres "COPY (SELECT coalesce(max(n), 0), coalesce(sum(n), 0) FROM (SELECT datname, count(*) AS n FROM pg_stat_activity WHERE usename = '$APP_USER' AND pid <> pg_backend_pid() GROUP BY datname) d) TO STDOUT" \
                    >>"$out/connections" 2>/dev/null || true
                samples=$((samples + 1))
                sleep 0.5
            done
        else
            sleep 2
        fi
        if ((SECONDS - started > RUN_TIMEOUT)); then
            log "run $name: timed out after $RUN_TIMEOUT s; killing it"
            timed_out=1
            kill_suite
            break
        fi
        if ((SECONDS - last_report >= 60)); then
            last_report=$SECONDS
            log "run $name: $(grep -cE "$progress" "$out/runtests.log" || true) tests done after $((SECONDS - started)) s"
        fi
    done
    local rc=0
    wait "$SUITE_PID" || rc=$?
    SUITE_PID=
    echo "$timed_out" >"$out/timed_out"
    echo "$rc" >"$out/rc"
    if [[ -s $out/connections ]]; then
        awk '$1 > d { d = $1 } $2 > t { t = $2 } END { printf "%d %d\n", d, t }' "$out/connections" >"$out/peak_connections"
        log "run $name: at most $(cut -d' ' -f1 "$out/peak_connections") connections to one database and $(cut -d' ' -f2 "$out/peak_connections") in all at once ($samples samples)"
    fi
    echo $((SECONDS - started)) >"$out/seconds"
    log "run $name: the suite exited $rc after $((SECONDS - started)) s"
    "parse_results_$APP" "$name"
}

# status: "test-id outcome" per test from pytest's JUnit XML (outcomes ok, FAIL, ERROR, skipped,
# expected-failure; a test that passes and then errors in its teardown counts as ERROR);
# summary: pytest's last line ("27 passed in 9.1s") and the exit status.
parse_results_pgpubsub() { # name
    local out=$RESULTS/$1
    "$VENV/bin/python" - "$out/junit.xml" >"$out/status.unsorted" <<'PY' || echo "(no-junit.xml) no-outcome" >"$out/status.unsorted"
import sys
import xml.etree.ElementTree as ET

outcomes = {}
for case in ET.parse(sys.argv[1]).getroot().iter("testcase"):
    test = f"{case.get('classname')}.{case.get('name')}".replace(" ", "_")
    tags = [child.tag for child in case]
    if "error" in tags:
        outcome = "ERROR"
    elif "failure" in tags:
        outcome = "FAIL"
    elif "skipped" in tags:
        skipped = case.find("skipped")
        outcome = "expected-failure" if skipped.get("type") == "pytest.xfail" else "skipped"
    else:
        outcome = "ok"
    # pytest writes a second testcase for an error in teardown after a pass: the worse one counts.
    if outcomes.get(test) not in ("ERROR", "FAIL"):
        outcomes[test] = outcome
for test, outcome in outcomes.items():
    print(test, outcome)
PY
    sort -u "$out/status.unsorted" >"$out/status"
    rm -f "$out/status.unsorted"
    local line
    line=$(grep -E '^=+ .*(passed|failed|error|skipped|no tests ran).* in [0-9.]+s' "$out/runtests.log" | tail -n 1 \
        | sed -E 's/^=+ //; s/ =+$//') || true
    echo "${line:-(no pytest summary line)}, exit status $(cat "$out/rc")" >"$out/summary"
    log "run $1: $(cat "$out/summary")"
}

# status: "test-id outcome" per test, from the -v 2 lines "name (module.Class.name) ... ok"
# (a docstring's first line may stand between the name and " ... "); outcomes ok, FAIL, ERROR,
# skipped, expected-failure, unexpected-success. The FAIL:/ERROR: headers of the report at the
# end are authoritative for failures (a test may fail in tearDown after printing "ok").
parse_results_django() { # name
    local out=$RESULTS/$1
    awk '
        function outcome(s) {
            if (s ~ /^ok/) return "ok"
            if (s ~ /^FAIL/) return "FAIL"
            if (s ~ /^ERROR/) return "ERROR"
            if (s ~ /^skipped/) return "skipped"
            if (s ~ /^expected failure/) return "expected-failure"
            if (s ~ /^unexpected success/) return "unexpected-success"
            return ""
        }
        /^(FAIL|ERROR): [^ ]+ \([^)]+\)/ {
            id = $0; sub(/^[A-Z]+: [^ ]+ \(/, "", id); sub(/\).*$/, "", id)
            final[id] = ($1 == "FAIL:") ? "FAIL" : "ERROR"; seen[id] = 1; next
        }
        /^[A-Za-z_][A-Za-z0-9_]* \([A-Za-z0-9_.]+\)/ {
            cur = $0; sub(/^[^ ]+ \(/, "", cur); sub(/\).*$/, "", cur)
            if (!(cur in seen)) { order[++n] = cur; seen[cur] = 1 }
        }
        / \.\.\. / && cur != "" {
            s = $0; sub(/^.* \.\.\. /, "", s); o = outcome(s)
            if (o != "" && !(cur in st)) st[cur] = o
        }
        END {
            for (id in final) if (!(id in st) || st[id] == "ok") { st[id] = final[id] }
            for (id in final) { found = 0; for (i = 1; i <= n; i++) if (order[i] == id) found = 1; if (!found) order[++n] = id }
            for (i = 1; i <= n; i++) print order[i], (order[i] in st ? st[order[i]] : "no-outcome")
        }
    ' "$out/runtests.log" | sort -u >"$out/status"
    {
        grep -E '^Ran [0-9]+ tests? in' "$out/runtests.log" || echo "Ran ? tests (no summary line)"
        grep -E '^(OK|FAILED)( \(|$)' "$out/runtests.log" || echo "(no OK/FAILED line)"
    } | tr '\n' ' ' | sed 's/ $//' >"$out/summary"
    # What made runtests.py fail outside the tests (the set-up or tear-down of the test
    # databases): the last line of a traceback that ends the log.
    tail -n 5 "$out/runtests.log" | grep -E '^[A-Za-z_.]+(Error|Exception)[A-Za-z]*: ' | tail -n 1 >"$out/crash" || true
    echo ", exit status $(cat "$out/rc")$( [[ -s $out/crash ]] && echo " after the tests: $(cat "$out/crash")")" >>"$out/summary"
    log "run $1: $(cat "$out/summary")"
}

count() { awk -v o="$2" '$2 == o { n++ } END { print n + 0 }' "$RESULTS/$1/status"; }

# --- main ----------------------------------------------------------------------------------------

BIN_VERSION="$BIN_DIR/tidepool-{gateway,pooler} built $(date -u -r "$BIN_DIR/tidepool-gateway" '+%Y-%m-%d %H:%M UTC' 2>/dev/null || echo '?')"
if git -C "$BIN_DIR" rev-parse --git-dir >/dev/null 2>&1; then
    BIN_VERSION+=", checkout $(git -C "$BIN_DIR" rev-parse --short HEAD) ($(git -C "$BIN_DIR" rev-parse --show-toplevel))"
fi

"fetch_$APP"
rm -rf "$RESULTS"
mkdir -p "$RESULTS/logs"
start_app_cluster
for run in $RUNS; do
    case $run in
    direct) run_suite direct "$PG_PORT" ;;
    tidepool)
        start_tidepool
        run_suite tidepool "$GATEWAY_PORT"
        stop_tidepool
        ;;
    *) die "unknown run $run (TIDEPOOL_APP_RUNS: direct, tidepool)" ;;
    esac
done
[[ $RUNS == *direct* && $RUNS == *tidepool* ]] || { log "one run only: nothing to compare"; exit 0; }

# Differing: a test whose outcome differs (a test missing from one run counts as "absent").
join -a1 -a2 -e absent -o 0,1.2,2.2 "$RESULTS/direct/status" "$RESULTS/tidepool/status" \
    | awk '$2 != $3' >"$RESULTS/differing.txt"
NDIFF=$(wc -l <"$RESULTS/differing.txt")
# The run's own outcome counts too: a suite whose tests all pass but whose test databases cannot be
# dropped afterwards exits non-zero, and that differs from direct.
RC_DIFFERS=0
[[ $(cat "$RESULTS/direct/rc") == "$(cat "$RESULTS/tidepool/rc")" ]] || RC_DIFFERS=1

{
    echo "# $APP_TITLE's own test suite: direct vs Tidepool"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- command: \`$COMMAND_LINE\` (pooler --pool-size $POOL_SIZE --max-backends $MAX_BACKENDS, --cores $CORES)"
    echo "- test command: \`$(cat "$RESULTS/tidepool/command")\`"
    echo "- binaries: $BIN_VERSION"
    for r in direct tidepool; do
        echo "- $r: $(cat "$RESULTS/$r/summary") — $(count "$r" ok) ok, $(count "$r" FAIL) FAIL," \
            "$(count "$r" ERROR) ERROR, $(count "$r" skipped) skipped, $(count "$r" expected-failure) expected failures;" \
            "$(cat "$RESULTS/$r/seconds") s$( [[ $(cat "$RESULTS/$r/timed_out") == 1 ]] && echo " (timed out)")"
    done
    [[ -s $RESULTS/direct/peak_connections ]] && echo "- the suite held at most $(cut -d' ' -f1 "$RESULTS/direct/peak_connections") connections to one database and $(cut -d' ' -f2 "$RESULTS/direct/peak_connections") in all at once (direct run, sampled twice a second)"
    echo "- tests whose outcome differs: $NDIFF"
    ((RC_DIFFERS)) && echo "- the suite's exit status differs: direct $(cat "$RESULTS/direct/rc"), tidepool $(cat "$RESULTS/tidepool/rc")"
    echo
    if ((NDIFF > 0)); then
        echo "| test | direct | tidepool |"
        echo "|---|---|---|"
        awk '{ printf "| %s | %s | %s |\n", $1, $2, $3 }' "$RESULTS/differing.txt"
    fi
} >"$RESULTS/summary.md"

echo
echo "direct:   $(cat "$RESULTS/direct/summary")"
echo "tidepool: $(cat "$RESULTS/tidepool/summary") (pool size $POOL_SIZE, max backends $MAX_BACKENDS)"
if ((NDIFF == 0 && RC_DIFFERS == 0)); then
    echo "no test's outcome differs"
    echo "results: $RESULTS"
    exit 0
fi
((RC_DIFFERS)) && echo "the suite's exit status differs: direct $(cat "$RESULTS/direct/rc"), tidepool $(cat "$RESULTS/tidepool/rc")"
if ((NDIFF > 0)); then
    echo "$NDIFF tests differ (test direct → tidepool):"
    sed 's/^/  /' "$RESULTS/differing.txt"
else
    echo "no test's outcome differs"
fi
echo "summary: $RESULTS/summary.md, logs: $RESULTS/logs/"
exit 1
