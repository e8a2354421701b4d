#!/usr/bin/env bash
# Runs PostgreSQL 15's own regression suite (src/test/regress, `parallel_schedule`, as
# `make installcheck-parallel` runs it) twice against a throwaway cluster:
#   (a) Postgres directly, over TCP;
#   (b) through tidepool-gateway → tidepool-pooler with pooling active (`--pool-size 8`,
#       while the schedule's parallel groups run up to 20 psql sessions at once);
# then lists every test whose outcome differs between the two, with the diffs.
#
# NOT part of scripts/test.sh: it takes many minutes and downloads Debian's postgresql-15
# source package. Run it by hand (as root, Debian 12, PostgreSQL 15 installed):
#
#   scripts/pg_regress.sh                 the whole schedule, both runs
#   scripts/pg_regress.sh TEST...         only test_setup + these tests (still both runs)
#
# Environment:
#   TIDEPOOL_REGRESS_DIR       work directory (default /tmp/tidepool-regress). The source tree,
#                              the built regress.so and the results stay there between runs
#                              (the source is downloaded once); the cluster is removed on exit.
#   TIDEPOOL_BIN_DIR           tidepool-gateway / tidepool-pooler binaries (default target/debug
#                              of this checkout; build them first: cargo build -p
#                              tidepool-gateway -p tidepool-pooler).
#   TIDEPOOL_REGRESS_POOL_SIZE pooler --pool-size (default 8).
#   TIDEPOOL_REGRESS_CORES     --cores of pooler and gateway (default 2).
#   TIDEPOOL_REGRESS_MAX_CONNECTIONS  pg_regress --max-connections for both runs (default: none,
#                              groups run fully parallel); 1 runs the tests one at a time as
#                              `make installcheck` does, which separates what concurrency causes.
#   TIDEPOOL_REGRESS_TIMEOUT   seconds allowed per pg_regress run (default 3600); a run that
#                              takes longer is killed and its unfinished tests count as failed.
#   TIDEPOOL_KEEP_TEST_DIRS=1  keep the cluster directory (data, logs) after exit.
#
# How it works:
#   - Source: `apt-get source postgresql-15=<installed version>` with deb-src entries derived
#     from this machine's apt sources (/etc/apt/sources.list{,.d/*.list}, sources.list.d/*.sources)
#     into a private apt state under the work directory (the system's apt lists are untouched).
#   - regress.so: built with PGXS from postgresql-server-dev-15 (installed with apt at the
#     server's version when missing); autoinc.so/refint.so (contrib/spi) beside it.
#   - Cluster: initdb as the `postgres` OS user (UTF8, C locale, fsync off), free loopback
#     ports, pg_hba per docs/CONTRACTS.md (`host all all 127.0.0.1/32 md5`, peer over the socket
#     for root and postgres through the `tidepool` ident map). The superuser the tests run as is
#     the cluster's bootstrap superuser, named `regress` (initdb -U regress), with a SCRAM
#     password: both runs log in as it over TCP with PGPASSWORD (the gateway does SCRAM
#     passthrough), and the pooler's admin connection uses it over the socket. (A second,
#     non-bootstrap superuser would fail `sequence` even directly: it expects the test user to
#     own the system catalogs, as installcheck's initdb user does.)
#   - Each run gets a fresh `regression` database made as pg_regress's own create_database()
#     makes it, then pg_regress --use-existing.
#   - pg_regress: the one shipped by postgresql-15 (lib/pgxs/src/test/regress/pg_regress),
#     --schedule parallel_schedule --max-concurrent-tests=20 --dlpath --inputdir --outputdir.
#
# Output (in $TIDEPOOL_REGRESS_DIR/results):
#   direct/, tidepool/          pg_regress output dirs (results/*.out, regression.out/.diffs)
#   differing/TEST.direct-vs-tidepool.diff   what Postgres printed vs what Tidepool printed
#   differing/TEST.regression.diffs          that test's excerpt of tidepool/regression.diffs
#   differing/TEST.direct.regression.diffs   (when it failed directly too) the direct excerpt
#   summary.md                  counts, command, differing tests with the first lines of diff
#   logs/                       postgres.log, pooler.log, gateway.log
# Exit status: 0 when no test differs, 1 when some do, 2 when something else failed.
set -euo pipefail

log() { printf 'pg_regress.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 2; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${TIDEPOOL_REGRESS_DIR:-/tmp/tidepool-regress}
BIN_DIR=${TIDEPOOL_BIN_DIR:-$REPO/target/debug}
POOL_SIZE=${TIDEPOOL_REGRESS_POOL_SIZE:-8}
CORES=${TIDEPOOL_REGRESS_CORES:-2}
RUN_TIMEOUT=${TIDEPOOL_REGRESS_TIMEOUT:-3600}
MAX_PARALLEL=20
MAX_CONNECTIONS=${TIDEPOOL_REGRESS_MAX_CONNECTIONS:-}
PG_BIN=/usr/lib/postgresql/15/bin
PG_CONFIG=$PG_BIN/pg_config
PG_REGRESS=/usr/lib/postgresql/15/lib/pgxs/src/test/regress/pg_regress
REGRESS_USER=regress
REGRESS_PASSWORD=regress-pw
REGRESS_DB=regression
ONLY_TESTS=("$@")
COMMAND_LINE="scripts/pg_regress.sh${*:+ $*}"
for v in TIDEPOOL_REGRESS_POOL_SIZE TIDEPOOL_REGRESS_CORES TIDEPOOL_REGRESS_MAX_CONNECTIONS; do
    [[ -n ${!v:-} ]] && COMMAND_LINE="$v=${!v} $COMMAND_LINE"
done

[[ $(id -u) -eq 0 ]] || die "run as root (Postgres runs as the postgres OS user through runuser)"
command -v dpkg-query >/dev/null || die "dpkg-query not found: this script is for Debian"
id postgres >/dev/null 2>&1 || die "no postgres OS user: install postgresql-15"
for b in initdb pg_ctl psql; do
    [[ -x $PG_BIN/$b ]] || die "$PG_BIN/$b missing: install postgresql-15"
done
[[ -x $PG_REGRESS ]] || die "$PG_REGRESS missing (shipped by postgresql-15)"
for b in tidepool-gateway tidepool-pooler; do
    [[ -x $BIN_DIR/$b ]] || die "$BIN_DIR/$b missing: cargo build -p tidepool-gateway -p tidepool-pooler"
done

export LC_ALL=C LANG=C
export DEBIAN_FRONTEND=noninteractive

PG_VERSION=$(dpkg-query -W -f='${Version}' postgresql-15 2>/dev/null) \
    || die "postgresql-15 is not installed"
PG_UPSTREAM=${PG_VERSION%-*}   # 15.18-0+deb12u1 → 15.18
log "postgresql-15 $PG_VERSION; work directory $WORK"

mkdir -p "$WORK"
chmod 755 "$WORK"

APT_OPTS=(-q -o DPkg::Lock::Timeout=600)

# --- 1. the source package -------------------------------------------------------------------

# deb-src entries for every enabled `deb` entry of the machine's apt configuration (deb822).
derive_deb_src() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -r $f ]] || continue
        # deb822 paragraphs: keep those whose Types has `deb` and that are not disabled, with
        # Types replaced by deb-src and Architectures dropped (continuation lines included).
        awk '
            function flush() {
                if (n > 0 && has_deb && !disabled) {
                    print "Types: deb-src"
                    for (i = 1; i <= n; i++) print buf[i]
                    print ""
                }
                n = 0; has_deb = 0; disabled = 0; skip = 0
            }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            /^[ \t]/ { if (!skip) buf[++n] = $0; next }
            {
                split($0, kv, ":"); key = tolower(kv[1]); val = substr($0, index($0, ":") + 1)
                skip = 0
                if (key == "types") {
                    if (val ~ /(^|[ \t])deb([ \t]|$)/) has_deb = 1
                    skip = 1; next
                }
                if (key == "enabled" && val ~ /no/) disabled = 1
                if (key == "architectures") { skip = 1; next }
                buf[++n] = $0
            }
            END { flush() }
        ' "$f"
    done
}

# The one-line form: `deb [options] uri suite components` → `deb-src …`.
derive_deb_src_lines() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -r $f ]] || continue
        sed -n -E 's/^[[:space:]]*deb([[:space:]]+)/deb-src\1/p' "$f"
    done
}

fetch_source() {
    SRC_TOP=$WORK/src/postgresql-15-$PG_UPSTREAM
    if [[ -f $SRC_TOP/src/test/regress/parallel_schedule && -f $WORK/src/.complete-$PG_VERSION ]]; then
        log "source tree present: $SRC_TOP"
        return
    fi
    command -v dpkg-source >/dev/null || {
        log "installing dpkg-dev (apt-get source unpacks with dpkg-source)"
        apt-get "${APT_OPTS[@]}" -y install --no-install-recommends dpkg-dev >/dev/null
    }
    local apt_dir=$WORK/apt
    rm -rf "$apt_dir"
    mkdir -p "$apt_dir/sources.d" "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
    derive_deb_src >"$apt_dir/sources.d/tidepool-deb-src.sources"
    derive_deb_src_lines >"$apt_dir/sources.d/tidepool-deb-src.list"
    if [[ ! -s $apt_dir/sources.d/tidepool-deb-src.sources && ! -s $apt_dir/sources.d/tidepool-deb-src.list ]]; then
        die "no deb entries in /etc/apt/sources.list{,.d/*.list,.d/*.sources} to derive deb-src from"
    fi
    log "deb-src entries derived from the apt configuration:"
    cat "$apt_dir"/sources.d/tidepool-deb-src.* | sed 's/^/    /' >&2
    # A private apt state: only these sources, own lists and cache, so the system's package
    # lists are neither replaced nor cleaned.
    APT_SRC_OPTS=(
        -o Dir::Etc::SourceList=/dev/null
        -o Dir::Etc::SourceParts="$apt_dir/sources.d"
        -o Dir::State::Lists="$apt_dir/lists"
        -o Dir::Cache="$apt_dir/cache"
        -o APT::Sandbox::User=root
    )
    log "apt-get update (deb-src only, private lists)"
    # A third-party repository without sources makes update fail for that entry only; what
    # matters is whether the source package can be fetched below.
    apt-get "${APT_OPTS[@]}" "${APT_SRC_OPTS[@]}" update >"$apt_dir/update.log" 2>&1 \
        || log "apt-get update reported errors (see $apt_dir/update.log); trying anyway"
    rm -rf "$WORK/src"
    mkdir -p "$WORK/src"
    log "apt-get source postgresql-15=$PG_VERSION"
    (cd "$WORK/src" && apt-get "${APT_OPTS[@]}" "${APT_SRC_OPTS[@]}" source "postgresql-15=$PG_VERSION") \
        >"$apt_dir/source.log" 2>&1 || {
        tail -n 20 "$apt_dir/source.log" >&2
        die "apt-get source postgresql-15=$PG_VERSION failed (is that version still on the mirror?)"
    }
    [[ -f $SRC_TOP/src/test/regress/parallel_schedule ]] \
        || die "unpacked source has no $SRC_TOP/src/test/regress/parallel_schedule"
    touch "$WORK/src/.complete-$PG_VERSION"
    chmod -R a+rX "$WORK/src"
}

# --- 2. regress.so -------------------------------------------------------------------------------

build_regress_lib() {
    LIB_DIR=$WORK/lib
    local dev_version
    dev_version=$(dpkg-query -W -f='${Status} ${Version}' postgresql-server-dev-15 2>/dev/null || true)
    if [[ $dev_version != "install ok installed "* ]]; then
        log "installing postgresql-server-dev-15=$PG_VERSION (PGXS, server headers)"
        apt-get "${APT_OPTS[@]}" -y install --no-install-recommends "postgresql-server-dev-15=$PG_VERSION" >/dev/null 2>&1 || {
            log "that exact version is not installable; installing the candidate postgresql-server-dev-15"
            apt-get "${APT_OPTS[@]}" -y install --no-install-recommends postgresql-server-dev-15 >/dev/null
        }
    elif [[ ${dev_version##* } != "$PG_VERSION" ]]; then
        log "warning: postgresql-server-dev-15 ${dev_version##* } differs from the server's $PG_VERSION (same major: ABI compatible)"
    fi
    [[ -x $PG_CONFIG ]] || die "$PG_CONFIG missing"
    local src=$SRC_TOP/src/test/regress/regress.c
    if [[ -f $LIB_DIR/regress.so && $LIB_DIR/regress.so -nt $src && -f $LIB_DIR/.built-$PG_VERSION ]]; then
        log "regress.so present: $LIB_DIR"
    else
        rm -rf "$LIB_DIR"
        mkdir -p "$LIB_DIR/build"
        cp "$src" "$LIB_DIR/build/"
        cat >"$LIB_DIR/build/Makefile" <<EOF
MODULES = regress
PG_CONFIG = $PG_CONFIG
PGXS := \$(shell \$(PG_CONFIG) --pgxs)
include \$(PGXS)
EOF
        log "building regress.so with PGXS"
        make -C "$LIB_DIR/build" >"$LIB_DIR/build/make.log" 2>&1 || {
            tail -n 30 "$LIB_DIR/build/make.log" >&2
            die "building regress.so failed"
        }
        cp "$LIB_DIR/build/regress.so" "$LIB_DIR/"
        touch "$LIB_DIR/.built-$PG_VERSION"
    fi
    # triggers.sql loads autoinc and refint (contrib/spi) from the same --dlpath.
    local pkglib m
    pkglib=$($PG_CONFIG --pkglibdir)
    for m in autoinc refint; do
        [[ -f $LIB_DIR/$m.so ]] && continue
        if [[ -f $pkglib/$m.so ]]; then
            cp "$pkglib/$m.so" "$LIB_DIR/"
        else
            log "building $m.so from contrib/spi with PGXS"
            make -C "$SRC_TOP/contrib/spi" USE_PGXS=1 PG_CONFIG="$PG_CONFIG" "$m.so" \
                >"$LIB_DIR/build/spi.log" 2>&1 || die "building $m.so failed"
            cp "$SRC_TOP/contrib/spi/$m.so" "$LIB_DIR/"
        fi
    done
    chmod -R a+rX "$LIB_DIR"
}

# --- 3. cluster and Tidepool ---------------------------------------------------------------------

RESULTS=$WORK/results
CLUSTER_ADMIN=$REGRESS_USER
RUN_PREFIX=tidepool-regress-run
PG_MAX_CONNECTIONS=200
PG_EXTRA_CONF="shared_buffers = 128MB"
# shellcheck source=lib/throwaway.sh
source "$REPO/scripts/lib/throwaway.sh"

# The cluster, with a SCRAM verifier (password_encryption's default) for the TCP logins.
start_regress_cluster() {
    start_cluster
    admin_psql postgres "ALTER ROLE $REGRESS_USER PASSWORD '$REGRESS_PASSWORD'"
}

# The regression database as pg_regress's create_database() makes it (it runs as the
# connecting user, here the regress role).
fresh_database() {
    admin_psql postgres "DROP DATABASE IF EXISTS $REGRESS_DB WITH (FORCE)"
    admin_psql postgres "CREATE DATABASE $REGRESS_DB OWNER $REGRESS_USER TEMPLATE=template0"
    admin_psql postgres "ALTER DATABASE $REGRESS_DB SET lc_messages TO 'C';
        ALTER DATABASE $REGRESS_DB SET lc_monetary TO 'C';
        ALTER DATABASE $REGRESS_DB SET lc_numeric TO 'C';
        ALTER DATABASE $REGRESS_DB SET lc_time TO 'C';
        ALTER DATABASE $REGRESS_DB SET bytea_output TO 'hex';
        ALTER DATABASE $REGRESS_DB SET timezone_abbreviations TO 'Default';"
}

# --- 4. pg_regress -------------------------------------------------------------------------------

SCHEDULE_TESTS=()
schedule_file() {
    local regress=$SRC_TOP/src/test/regress
    if [[ ${#ONLY_TESTS[@]} -eq 0 ]]; then
        SCHEDULE=$regress/parallel_schedule
    else
        SCHEDULE=$WORK/only_schedule
        { echo "test: test_setup"; echo "test: ${ONLY_TESTS[*]}"; } >"$SCHEDULE"
    fi
    # Every test of the schedule, in order (a test's name may contain dots).
    mapfile -t SCHEDULE_TESTS < <(sed -n -E 's/^test:[[:space:]]*//p' "$SCHEDULE" | tr -s ' \t' '\n' | sed '/^$/d')
}

SUITE_PID=
run_pg_regress() { # name port
    local name=$1 port=$2 out=$RESULTS/$1
    rm -rf "$out"
    mkdir -p "$out/results"
    # Server-side COPY TO / lo_export write into results/ as the postgres OS user.
    chmod 777 "$out" "$out/results"
    local cmd=(
        "$PG_REGRESS"
        --use-existing --host=127.0.0.1 --port="$port" --user="$REGRESS_USER" --dbname="$REGRESS_DB"
        --bindir="$PG_BIN" --inputdir="$SRC_TOP/src/test/regress" --outputdir="$out"
        --dlpath="$LIB_DIR" --schedule="$SCHEDULE" --max-concurrent-tests="$MAX_PARALLEL"
    )
    [[ -n $MAX_CONNECTIONS ]] && cmd+=(--max-connections="$MAX_CONNECTIONS")
    printf '%q ' "${cmd[@]}" | sed 's/ $//' >"$out/command"
    log "run $name: PGPASSWORD=… ${cmd[*]}"
    local started=$SECONDS timed_out=0
    set -m
    (cd "$out" && PGPASSWORD=$REGRESS_PASSWORD exec "${cmd[@]}") >"$out/pg_regress.log" 2>&1 &
    SUITE_PID=$!
    set +m
    local last_report=$SECONDS
    while kill -0 "$SUITE_PID" 2>/dev/null; do
        sleep 2
        if ((SECONDS - started > RUN_TIMEOUT)); then
            log "run $name: timed out after $RUN_TIMEOUT s; killing pg_regress and its psql sessions"
            timed_out=1
            kill_suite
            break
        fi
        if ((SECONDS - last_report >= 60)); then
            last_report=$SECONDS
            log "run $name: $(grep -cE '\.\.\. (ok|FAILED|failed)' "$out/pg_regress.log" || true) of ${#SCHEDULE_TESTS[@]} tests done after $((SECONDS - started)) s"
        fi
    done
    local rc=0
    wait "$SUITE_PID" || rc=$?
    SUITE_PID=
    echo "$timed_out" >"$out/timed_out"
    log "run $name: pg_regress exited $rc after $((SECONDS - started)) s"
    grep -E '^ *(All [0-9]+ tests passed|[0-9]+ of [0-9]+ tests)' "$out/pg_regress.log" >&2 || true
}

# status file: "test status" per schedule test (ok, FAILED, or "not-run" when no status line).
parse_status() { # name
    local out=$RESULTS/$1
    declare -A st=()
    local line t s
    while IFS= read -r line; do
        if [[ $line =~ ^(test[[:space:]]+|[[:space:]]+)([^[:space:]]+)[[:space:]]+\.\.\.[[:space:]]+(ok|FAILED|failed\ \(ignored\)) ]]; then
            t=${BASH_REMATCH[2]}
            s=${BASH_REMATCH[3]}
            [[ $s == "failed (ignored)" ]] && s=ignored
            [[ $line == *"test process"* ]] && s=FAILED
            st[$t]=$s
        fi
    done <"$out/pg_regress.log"
    : >"$out/status"
    for t in "${SCHEDULE_TESTS[@]}"; do
        echo "$t ${st[$t]:-not-run}" >>"$out/status"
    done
}

# That test's part of regression.diffs (each starts with "diff -U3 …/expected/T.out …/results/T.out"
# or "diff -U3 …/expected/T_1.out …").
diffs_excerpt() { # name test
    local f=$RESULTS/$1/regression.diffs
    [[ -f $f ]] || return 0
    awk -v t="$2" '
        /^diff / { n = split($NF, p, "/"); cur = p[n]; sub(/\.out$/, "", cur); keep = (cur == t) }
        keep { print }
    ' "$f"
}

count_passed() { awk '$2 == "ok" || $2 == "ignored" { n++ } END { print n + 0 }' "$RESULTS/$1/status"; }

# --- main ----------------------------------------------------------------------------------------

# Which Tidepool ran: the binaries' age and the checkout they were presumably built from.
BIN_VERSION="$BIN_DIR/tidepool-{gateway,pooler} built $(date -u -r "$BIN_DIR/tidepool-gateway" '+%Y-%m-%d %H:%M UTC')"
# The checkout the binaries' directory lies in (a worktree with its own target dir keeps the
# binaries stable while others change this checkout), else this one.
BIN_REPO=$REPO
git -C "$BIN_DIR" rev-parse --git-dir >/dev/null 2>&1 && BIN_REPO=$(git -C "$BIN_DIR" rev-parse --show-toplevel)
if git -C "$BIN_REPO" rev-parse --git-dir >/dev/null 2>&1; then
    BIN_VERSION+=", checkout $(git -C "$BIN_REPO" rev-parse --short HEAD) ($BIN_REPO)"
    if [[ -n $(git -C "$BIN_REPO" status --porcelain -- gateway pooler shared 2>/dev/null) ]]; then
        BIN_VERSION+=" with uncommitted changes in gateway/ pooler/ shared/"
    fi
fi

fetch_source
build_regress_lib
schedule_file
rm -rf "$RESULTS"
mkdir -p "$RESULTS/differing" "$RESULTS/logs"
start_regress_cluster

fresh_database
run_pg_regress direct "$PG_PORT"
parse_status direct

fresh_database
start_tidepool
run_pg_regress tidepool "$GATEWAY_PORT"
parse_status tidepool
stop_tidepool

TOTAL=${#SCHEDULE_TESTS[@]}
if [[ -n $MAX_CONNECTIONS ]]; then
    PARALLELISM="pg_regress --max-connections=$MAX_CONNECTIONS"
else
    PARALLELISM="up to $MAX_PARALLEL tests in parallel"
fi
DIRECT_PASSED=$(count_passed direct)
TIDEPOOL_PASSED=$(count_passed tidepool)

# Differing: the outcome differs, or both failed and printed different output.
DIFFERING=()
declare -A DIRECT_ST=() TP_ST=()
while read -r t s; do DIRECT_ST[$t]=$s; done <"$RESULTS/direct/status"
while read -r t s; do TP_ST[$t]=$s; done <"$RESULTS/tidepool/status"
for t in "${SCHEDULE_TESTS[@]}"; do
    d=${DIRECT_ST[$t]} p=${TP_ST[$t]}
    ok_d=0 ok_p=0
    [[ $d == ok || $d == ignored ]] && ok_d=1
    [[ $p == ok || $p == ignored ]] && ok_p=1
    if ((ok_d != ok_p)); then
        DIFFERING+=("$t")
    elif ((ok_d == 0)) && ! cmp -s "$RESULTS/direct/results/$t.out" "$RESULTS/tidepool/results/$t.out"; then
        DIFFERING+=("$t")
    fi
done

for t in "${DIFFERING[@]}"; do
    diff -u --label "direct/results/$t.out" --label "tidepool/results/$t.out" \
        "$RESULTS/direct/results/$t.out" "$RESULTS/tidepool/results/$t.out" \
        >"$RESULTS/differing/$t.direct-vs-tidepool.diff" 2>&1 || true
    diffs_excerpt tidepool "$t" >"$RESULTS/differing/$t.regression.diffs"
    if [[ ${DIRECT_ST[$t]} != ok && ${DIRECT_ST[$t]} != ignored ]]; then
        diffs_excerpt direct "$t" >"$RESULTS/differing/$t.direct.regression.diffs"
    fi
done

{
    echo "# PostgreSQL $PG_UPSTREAM regression suite: direct vs Tidepool"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- command: \`$COMMAND_LINE\` (postgresql-15 $PG_VERSION, pooler --pool-size $POOL_SIZE, --cores $CORES, $PARALLELISM)"
    echo "- pg_regress: \`$(cat "$RESULTS/tidepool/command")\`"
    echo "- binaries: $BIN_VERSION"
    echo "- direct:   $DIRECT_PASSED of $TOTAL tests passed$( [[ $(cat "$RESULTS/direct/timed_out") == 1 ]] && echo " (timed out)")"
    echo "- tidepool: $TIDEPOOL_PASSED of $TOTAL tests passed$( [[ $(cat "$RESULTS/tidepool/timed_out") == 1 ]] && echo " (timed out)")"
    echo "- differing tests: ${#DIFFERING[@]}"
    echo
    for t in "${DIFFERING[@]}"; do
        echo "## $t (direct: ${DIRECT_ST[$t]}, tidepool: ${TP_ST[$t]})"
        echo
        echo '```diff'
        head -n 40 "$RESULTS/differing/$t.direct-vs-tidepool.diff"
        echo '```'
        echo
    done
} >"$RESULTS/summary.md"

echo
echo "direct:   $DIRECT_PASSED of $TOTAL tests passed"
echo "tidepool: $TIDEPOOL_PASSED of $TOTAL tests passed (pool size $POOL_SIZE, $PARALLELISM)"
if [[ ${#DIFFERING[@]} -eq 0 ]]; then
    echo "no test differs"
    echo "results: $RESULTS"
    exit 0
fi
echo "${#DIFFERING[@]} tests differ (direct → tidepool):"
for t in "${DIFFERING[@]}"; do
    printf '  %-28s %s → %s\n' "$t" "${DIRECT_ST[$t]}" "${TP_ST[$t]}"
done
echo "diffs: $RESULTS/differing/, summary: $RESULTS/summary.md"
exit 1
