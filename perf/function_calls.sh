#!/usr/bin/env bash
# What following settings changed by user functions costs (issue 4, point 5): a statement that
# calls a function that is not built-in is followed by a settings read-back (one round trip),
# a statement that calls only built-ins is not. pgbench, directly and through Tidepool:
#   builtin  `SELECT lower('x'), now(), length('abc')`  (no read-back expected)
#   noop     `SELECT noop_fn()`, a plpgsql function that does nothing (one read-back each)
#   set_wm   `SELECT set_wm('4MB')`, a plpgsql set_config (one read-back each; the value is the
#            same each time, so no sync follows)
# each with -M simple and -M prepared (Parse once, then Bind: the Bind carries the flags).
#
#   sudo perf/function_calls.sh                          # 10 s per run
#   TIDEPOOL_BIN=target/debug DURATION=5 RESULTS=/tmp/fn.md perf/function_calls.sh
#
# Env: DURATION (s, default 10), CLIENTS (8), TARGETS ("direct tidepool"),
#      TIDEPOOL_BIN (default target/release), RESULTS (default perf/RESULTS.md), KEEP=1.

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-8}
TARGETS=${TARGETS:-direct tidepool}
RESULTS=${RESULTS:-$REPO/perf/RESULTS.md}
SCRIPTS="builtin noop set_wm"
MODES="simple prepared"

[ "$(id -u)" -eq 0 ] || die "run as root (Postgres runs as the postgres user via runuser)"
need pgbench psql runuser "$PGBIN/initdb"
make_workdir
FACTS=$(machine_facts)
start_pg 100
pg_sql "CREATE FUNCTION noop_fn() RETURNS int LANGUAGE plpgsql AS \$\$ BEGIN RETURN 1; END \$\$;
CREATE FUNCTION set_wm(v text) RETURNS text LANGUAGE plpgsql AS
  \$\$ BEGIN RETURN set_config('work_mem', v, false); END \$\$;" "$APP_DB"
printf "SELECT lower('x'), now(), length('abc');\n" >"$WORK/builtin.sql"
printf 'SELECT noop_fn();\n' >"$WORK/noop.sql"
printf "SELECT set_wm('4MB');\n" >"$WORK/set_wm.sql"

declare -A PORT TPS
PORT[direct]=$PG_PORT
for target in $TARGETS; do
    if [ "$target" = tidepool ]; then
        start_tidepool 100 || die "Tidepool did not start"
        PORT[tidepool]=$GATEWAY_PORT
    fi
    port=${PORT[$target]}
    for mode in $MODES; do
        for script in $SCRIPTS; do
            key=$script/$mode/$target
            log "pgbench -f $script.sql -M $mode -c $CLIENTS -T $DURATION via $target"
            PGPASSWORD=$APP_PASSWORD timeout $((DURATION + 60)) pgbench -n -f "$WORK/$script.sql" \
                -M "$mode" -c "$CLIENTS" -j 2 -T "$DURATION" -h 127.0.0.1 -p "$port" \
                -U "$APP_USER" "$APP_DB" >"$WORK/$script-$mode-$target.log" 2>&1 ||
                log "  pgbench failed: $(tail -2 "$WORK/$script-$mode-$target.log" | tr '\n' ' ')"
            TPS[$key]=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p' \
                "$WORK/$script-$mode-$target.log" | head -1)
            log "  tps ${TPS[$key]:-?}"
        done
    done
    [ "$target" = tidepool ] && stop_tidepool
done

ratio() { awk -v a="${1:-}" -v b="${2:-}" 'BEGIN { if (a > 0 && b > 0) printf "%.2f", a / b; else print "-" }'; }
{
    echo
    echo "## User function calls and the settings read-back, $CLIENTS pgbench clients — $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "| script | mode | direct TPS | Tidepool TPS | Tidepool / direct | vs builtin through Tidepool |"
    echo "| --- | --- | ---: | ---: | ---: | ---: |"
    for mode in $MODES; do
        for script in $SCRIPTS; do
            d=${TPS[$script/$mode/direct]:-}
            t=${TPS[$script/$mode/tidepool]:-}
            echo "| $script | $mode | ${d:--} | ${t:--} | $(ratio "$t" "$d") | $(ratio "$t" "${TPS[builtin/$mode/tidepool]:-}") |"
        done
    done
    echo
    echo "- builtin: \`SELECT lower('x'), now(), length('abc')\`; noop: \`SELECT noop_fn()\` (plpgsql, does nothing); set_wm: \`SELECT set_wm('4MB')\` (plpgsql set_config); \`pgbench -n -c $CLIENTS -j 2 -T $DURATION\`, run by \`perf/function_calls.sh\`"
    echo "$FACTS"
} >>"$RESULTS"
log "results appended to $RESULTS"
