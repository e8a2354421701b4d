#!/usr/bin/env bash
# pgbench -S (select-only) with 40 clients, simple and prepared protocol, against Postgres
# directly, through PgBouncer (transaction pooling, 20 server connections) and through Tidepool
# (gateway + pooler, --pool-size 20), all started fresh on loopback. Records TPS, ratios, and the
# proxies' CPU time per transaction (utime+stime from /proc/PID/stat) in perf/RESULTS.md.
#
#   sudo perf/pgbench_compare.sh                # 30 s per run, all three targets
#   DURATION=10 TARGETS="direct pgbouncer" perf/pgbench_compare.sh
#
# Env: DURATION (s, default 30), CLIENTS (40), THREADS (pgbench -j, 2), SCALE (pgbench -i -s, 10),
#      TARGETS ("direct pgbouncer tidepool"), MODES ("simple prepared"),
#      TIDEPOOL_BIN (dir with tidepool-gateway and tidepool-pooler, default target/release),
#      TIDEPOOL_CORES (--cores of gateway and pooler; default all cores),
#      RESULTS (file to append to, default perf/RESULTS.md), KEEP=1 (keep the temp dir).
# Exit status: 0 when every requested run worked, 1 otherwise (the results are written anyway;
# a Tidepool whose binaries are missing is reported as such).

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DURATION=${DURATION:-30}
CLIENTS=${CLIENTS:-40}
THREADS=${THREADS:-2}
SCALE=${SCALE:-10}
TARGETS=${TARGETS:-direct pgbouncer tidepool}
MODES=${MODES:-simple prepared}
RESULTS=${RESULTS:-$REPO/perf/RESULTS.md}
STAMP=$(date -u +%Y-%m-%dT%H%M%SZ)
OUT=$REPO/perf/out/pgbench-$STAMP

[ "$(id -u)" -eq 0 ] || die "run as root (Postgres and PgBouncer run as the postgres user via runuser)"
need pgbench jq ss runuser "$PGBOUNCER" "$PGBIN/initdb"
mkdir -p "$OUT"
make_workdir
FACTS=$(machine_facts)

start_pg 200
log "pgbench -i -s $SCALE"
PGPASSWORD=$APP_PASSWORD pgbench -i -q -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" -U "$APP_USER" "$APP_DB" \
    >"$OUT/init.log" 2>&1 || die "pgbench -i failed: see $OUT/init.log"

declare -A PORT PIDS NOTE TPS TXNS CPU STATUS
PORT[direct]=$PG_PORT
PIDS[direct]=""
failed=0
for target in $TARGETS; do
    case $target in
        direct) ;;
        pgbouncer)
            start_pgbouncer 1000
            PORT[pgbouncer]=$BOUNCER_PORT
            PIDS[pgbouncer]=$BOUNCER_PID
            if ! pgbouncer_supports_prepared; then
                NOTE[pgbouncer]="PgBouncer $(pgbouncer_version) has no max_prepared_statements (1.21+): -M prepared fails through it in transaction mode"
            fi
            ;;
        tidepool)
            if start_tidepool 1000; then
                PORT[tidepool]=$GATEWAY_PORT
                PIDS[tidepool]="$GATEWAY_PID $POOLER_PID"
            else
                NOTE[tidepool]="not run: $(tidepool_available && echo "did not start (see logs)" || echo "binaries missing in $TIDEPOOL_BIN (cargo build --release -p tidepool-gateway -p tidepool-pooler)")"
                failed=1
            fi
            ;;
        *) die "unknown target $target (direct, pgbouncer, tidepool)" ;;
    esac
done

for mode in $MODES; do
    for target in $TARGETS; do
        key="$mode/$target"
        if [ -z "${PORT[$target]:-}" ]; then
            STATUS[$key]="not run"
            continue
        fi
        log "pgbench -S -M $mode -c $CLIENTS -T $DURATION via $target"
        before=$(cpu_ticks ${PIDS[$target]})
        declare -A before_each=()
        for pid in ${PIDS[$target]}; do before_each[$pid]=$(cpu_ticks "$pid"); done
        set +e
        PGPASSWORD=$APP_PASSWORD timeout $((DURATION + 120)) pgbench -S -n -M "$mode" -c "$CLIENTS" \
            -j "$THREADS" -T "$DURATION" -h 127.0.0.1 -p "${PORT[$target]}" -U "$APP_USER" "$APP_DB" \
            >"$OUT/$mode-$target.log" 2>&1
        rc=$?
        set -e
        after=$(cpu_ticks ${PIDS[$target]})
        log_file="$OUT/$mode-$target.log"
        TPS[$key]=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p' "$log_file" | head -1)
        TXNS[$key]=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$log_file" | head -1)
        if [ -n "${PIDS[$target]}" ]; then
            CPU[$key]=$(us_per $((after - before)) "${TXNS[$key]:-0}")
            # Tidepool: also each process' share (gateway + pooler).
            set -- ${PIDS[$target]}
            if [ $# -gt 1 ]; then
                parts=""
                for pid in "$@"; do
                    parts="$parts${parts:+ + }$(us_per $(($(cpu_ticks "$pid") - before_each[$pid])) "${TXNS[$key]:-0}")"
                done
                CPU[$key]="${CPU[$key]} ($parts)"
            fi
        else
            CPU[$key]="-"
        fi
        if [ "$rc" -eq 0 ] && [ -n "${TPS[$key]}" ]; then
            STATUS[$key]="ok"
        else
            err=$(grep -m1 -E 'error|ERROR|FATAL' "$log_file" | cut -c1-140 || true)
            STATUS[$key]="FAILED (rc $rc): ${err:-see log}"
            failed=1
        fi
        log "  tps ${TPS[$key]:-?}, ${TXNS[$key]:-?} txns, proxy CPU ${CPU[$key]} us/txn, ${STATUS[$key]}"
    done
done

# TPS of a run that succeeded, as an integer; empty otherwise.
ok_tps() {
    if [ "${STATUS[$1]:-}" = ok ]; then echo "${TPS[$1]%.*}"; fi
}

ratio() { # ratio A B -> A/B as x.xx, or -
    awk -v a="${1:-}" -v b="${2:-}" 'BEGIN { if (a > 0 && b > 0) printf "%.2f", a / b; else print "-" }'
}

[ -f "$RESULTS" ] || printf '# Tidepool performance results\n\nWritten by perf/pgbench_compare.sh and perf/firehose_compare.sh; newest at the end.\n' >"$RESULTS"
{
    echo
    echo "## pgbench -S, $CLIENTS clients — $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "| mode | target | TPS | vs direct | vs PgBouncer | proxy CPU µs/txn | status |"
    echo "| --- | --- | ---: | ---: | ---: | ---: | --- |"
    for mode in $MODES; do
        for target in $TARGETS; do
            key="$mode/$target"
            t=$(ok_tps "$key")
            shown=${t:--}
            # A failed run's TPS counts only the clients that survived: shown in parentheses,
            # never compared.
            if [ -z "$t" ] && [ -n "${TPS[$key]:-}" ]; then shown="(${TPS[$key]%.*})"; fi
            echo "| $mode | $target | $shown | $(ratio "$t" "$(ok_tps "$mode/direct")") | $(ratio "$t" "$(ok_tps "$mode/pgbouncer")") | ${CPU[$key]:--} | ${STATUS[$key]:-} |"
        done
    done
    echo
    echo "- command: \`pgbench -S -n -M {simple,prepared} -c $CLIENTS -j $THREADS -T $DURATION\` (scale $SCALE) as alice (SCRAM) on 127.0.0.1; run by \`DURATION=$DURATION perf/pgbench_compare.sh\`"
    echo "- Postgres: max_connections 200, shared_buffers 256MB, fsync/synchronous_commit off; PgBouncer: pool_mode transaction, default_pool_size 20; Tidepool: --pool-size 20, --auth-method md5, --cores ${TIDEPOOL_CORES:-(all: $(nproc))} for gateway and pooler"
    echo "- proxy CPU: utime+stime of pgbouncer, or of tidepool-gateway + tidepool-pooler (each in parentheses, gateway first), over the run, divided by transactions"
    for target in $TARGETS; do
        if [ -n "${NOTE[$target]:-}" ]; then echo "- $target: ${NOTE[$target]}"; fi
    done
    echo "$FACTS"
} >>"$RESULTS"
log "results appended to $RESULTS (raw output in $OUT)"
exit "$failed"
