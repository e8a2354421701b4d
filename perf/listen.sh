#!/usr/bin/env bash
# LISTEN/NOTIFY through Tidepool against Postgres directly: LISTENERS idle psql sessions listen on
# one channel while pgbench runs, with CLIENTS clients, (a) `LISTEN c; UNLISTEN c` cycles (the
# read-back and the listener round trip of each), (b) `NOTIFY` to the listeners (fan-out), (c)
# `SELECT 1` for reference. Records TPS, ratios, and the peak of alice's backends (directly:
# one per session; through Tidepool: the listeners hold none).
#
#   sudo perf/listen.sh                      # 20 s per run
#   TIDEPOOL_BIN=target/debug DURATION=5 RESULTS=/tmp/listen.md perf/listen.sh
#
# Env: DURATION (s, default 20), CLIENTS (10), LISTENERS (50), TARGETS ("direct tidepool"),
#      TIDEPOOL_BIN (default target/release), RESULTS (default perf/RESULTS.md), KEEP=1.

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DURATION=${DURATION:-20}
CLIENTS=${CLIENTS:-10}
LISTENERS=${LISTENERS:-50}
TARGETS=${TARGETS:-direct tidepool}
RESULTS=${RESULTS:-$REPO/perf/RESULTS.md}

[ "$(id -u)" -eq 0 ] || die "run as root (Postgres runs as the postgres user via runuser)"
need pgbench psql ss runuser "$PGBIN/initdb"
make_workdir
FACTS=$(machine_facts)
start_pg 300
printf 'LISTEN perf_cycle;\nUNLISTEN perf_cycle;\n' >"$WORK/cycle.sql"
printf "NOTIFY perf_fan, 'x';\n" >"$WORK/notify.sql"
printf 'SELECT 1;\n' >"$WORK/select.sql"

declare -A PORT TPS PEAK
PORT[direct]=$PG_PORT
for target in $TARGETS; do
    if [ "$target" = tidepool ]; then
        start_tidepool 1000 || die "Tidepool did not start"
        PORT[tidepool]=$GATEWAY_PORT
    fi
    port=${PORT[$target]}
    # Idle listeners: psql reading a FIFO we hold open, so they stay idle until we close it.
    fds=()
    pids=()
    for i in $(seq 1 "$LISTENERS"); do
        mkfifo "$WORK/l-$target-$i"
        PGPASSWORD=$APP_PASSWORD psql -X -q -h 127.0.0.1 -p "$port" -U "$APP_USER" "$APP_DB" \
            <"$WORK/l-$target-$i" >/dev/null 2>&1 &
        pids+=($!)
        exec {fd}>"$WORK/l-$target-$i"
        fds+=("$fd")
        echo "LISTEN perf_fan;" >&"$fd"
    done
    sleep 2
    for script in cycle notify select; do
        peak=0
        (
            for _ in $(seq 1 $((DURATION * 2))); do
                pg_sql "SELECT count(*) FROM pg_stat_activity WHERE usename = '$APP_USER'"
                sleep 0.5
            done
        ) >"$WORK/backends-$target-$script" 2>/dev/null &
        sampler=$!
        log "pgbench -f $script.sql -c $CLIENTS -T $DURATION via $target ($LISTENERS listening)"
        PGPASSWORD=$APP_PASSWORD timeout $((DURATION + 60)) pgbench -n -f "$WORK/$script.sql" \
            -c "$CLIENTS" -j 2 -T "$DURATION" -h 127.0.0.1 -p "$port" -U "$APP_USER" "$APP_DB" \
            >"$WORK/$script-$target.log" 2>&1 || log "  pgbench failed: $(tail -2 "$WORK/$script-$target.log" | tr '\n' ' ')"
        kill "$sampler" 2>/dev/null || true
        wait "$sampler" 2>/dev/null || true
        peak=$(sort -n "$WORK/backends-$target-$script" | tail -1)
        TPS[$script/$target]=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p' "$WORK/$script-$target.log" | head -1)
        PEAK[$script/$target]=${peak:--}
        log "  tps ${TPS[$script/$target]:-?}, peak backends of $APP_USER ${PEAK[$script/$target]}"
    done
    for fd in "${fds[@]}"; do exec {fd}>&-; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    [ "$target" = tidepool ] && stop_tidepool
done

ratio() { awk -v a="${1:-}" -v b="${2:-}" 'BEGIN { if (a > 0 && b > 0) printf "%.2f", a / b; else print "-" }'; }
{
    echo
    echo "## LISTEN/NOTIFY, $LISTENERS idle listeners, $CLIENTS pgbench clients — $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "| script | target | TPS | vs direct | peak backends of $APP_USER |"
    echo "| --- | --- | ---: | ---: | ---: |"
    for script in cycle notify select; do
        for target in $TARGETS; do
            t=${TPS[$script/$target]:-}
            echo "| $script | $target | ${t:--} | $(ratio "$t" "${TPS[$script/direct]:-}") | ${PEAK[$script/$target]:--} |"
        done
    done
    echo
    echo "- cycle: \`LISTEN perf_cycle; UNLISTEN perf_cycle\` (two statements); notify: \`NOTIFY perf_fan, 'x'\` heard by the $LISTENERS listeners; select: \`SELECT 1\`; \`pgbench -n -c $CLIENTS -j 2 -T $DURATION\`, run by \`perf/listen.sh\`"
    echo "- Tidepool: --pool-size 20; the listeners are idle psql sessions (LISTEN, then waiting)"
    echo "$FACTS"
} >>"$RESULTS"
log "results appended to $RESULTS"
