#!/usr/bin/env bash
# System calls and context switches per transaction, PgBouncer beside Tidepool (gateway and
# pooler counted apart), pgbench -S on a warm pool. Unlike CPU time these counts hardly depend on
# what else the 2 shared cores are doing, so they show what a change to the hot path bought even
# on a busy machine. Appends a table to perf/RESULTS.md.
#
#   sudo perf/syscalls.sh                           # 4 and 40 clients, -M prepared, 8 s each
#   CLIENTS="40 200" MODE=simple perf/syscalls.sh
#
# Env: CLIENTS ("4 40"), MODE (prepared), DURATION (8), SCALE (10), TIDEPOOL_BIN,
#      TIDEPOOL_POOLER_ARGS / TIDEPOOL_GATEWAY_ARGS (extra flags), RESULTS (file to append to).

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CLIENTS=${CLIENTS:-4 40}
MODE=${MODE:-prepared}
DURATION=${DURATION:-8}
SCALE=${SCALE:-10}
RESULTS=${RESULTS:-$REPO/perf/RESULTS.md}
# The calls that matter on this path; "all" is every system call (raw_syscalls).
CALLS=(sendto recvfrom io_uring_enter epoll_wait read write futex membarrier)

[ "$(id -u)" -eq 0 ] || die "run as root"
need perf pgbench runuser "$PGBOUNCER" "$PGBIN/initdb"
make_workdir
FACTS=$(machine_facts)
max_clients=0
for c in $CLIENTS; do [ "$c" -gt "$max_clients" ] && max_clients=$c; done
start_pg $((max_clients * 2 + 50))
PGPASSWORD=$APP_PASSWORD pgbench -i -q -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" -U "$APP_USER" "$APP_DB" \
    >"$WORK/init.log" 2>&1 || die "pgbench -i failed"
# -M prepared through PgBouncer 1.18 needs session pooling (see pgbench_compare.sh).
[ "$MODE" = prepared ] && ! pgbouncer_supports_prepared && BOUNCER_POOL_MODE=session BOUNCER_POOL_SIZE=$max_clients
start_pgbouncer 1000
start_tidepool 1000 || die "Tidepool did not start"

events="-e raw_syscalls:sys_enter -e context-switches"
for c in "${CALLS[@]}"; do events="$events -e syscalls:sys_enter_$c"; done

# measure NAME PORT CLIENTS PID...: pgbench for DURATION s while perf counts each PID's events;
# prints one table row per PID.
measure() {
    local name=$1 port=$2 clients=$3 pid txns out
    shift 3
    PGPASSWORD=$APP_PASSWORD pgbench -S -n -M "$MODE" -c "$clients" -j 2 -T 2 -h 127.0.0.1 -p "$port" \
        -U "$APP_USER" "$APP_DB" >/dev/null 2>&1 || true
    for pid in "$@"; do
        # shellcheck disable=SC2086
        perf stat -x, $events -p "$pid" -o "$WORK/stat-$pid" -- sleep "$DURATION" &
    done
    PGPASSWORD=$APP_PASSWORD pgbench -S -n -M "$MODE" -c "$clients" -j 2 -T "$DURATION" -h 127.0.0.1 \
        -p "$port" -U "$APP_USER" "$APP_DB" >"$WORK/pgbench-$name-$clients.log" 2>&1 || true
    wait
    txns=$(awk '/number of transactions actually processed/{print $NF}' "$WORK/pgbench-$name-$clients.log" | cut -d/ -f1)
    for pid in "$@"; do
        out="| $clients | $(ps -o comm= -p "$pid" | sed 's/tidepool-//') | $txns"
        for ev in raw_syscalls:sys_enter context-switches "${CALLS[@]/#/syscalls:sys_enter_}"; do
            out="$out | $(awk -F, -v e="$ev" -v n="$txns" '$3 == e { printf "%.2f", $1 / n }' "$WORK/stat-$pid")"
        done
        echo "$out |"
    done
}

{
    echo
    echo "## System calls per transaction, pgbench -S -M $MODE — $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    printf '| clients | process | transactions | all | context switches |'
    printf ' %s |' "${CALLS[@]}"
    echo
    printf '| ---: | --- | ---: | ---: | ---: |'
    printf ' ---: |%.0s' "${CALLS[@]}"
    echo
    for c in $CLIENTS; do
        measure pgbouncer "$BOUNCER_PORT" "$c" "$BOUNCER_PID"
        measure tidepool "$GATEWAY_PORT" "$c" "$GATEWAY_PID" "$POOLER_PID"
    done
    echo
    echo "- command: \`CLIENTS=\"$CLIENTS\" MODE=$MODE DURATION=$DURATION perf/syscalls.sh\`; counts from \`perf stat -e raw_syscalls:sys_enter -e context-switches -e syscalls:sys_enter_CALL -p PID\` over a $DURATION s pgbench run on a warm pool, divided by its transactions"
    echo "- PgBouncer: pool_mode ${BOUNCER_POOL_MODE:-transaction}; Tidepool: --pool-size 20${TIDEPOOL_GATEWAY_ARGS:+, gateway $TIDEPOOL_GATEWAY_ARGS}${TIDEPOOL_POOLER_ARGS:+, pooler $TIDEPOOL_POOLER_ARGS}"
    echo "$FACTS"
} | tee -a "$RESULTS"
