#!/usr/bin/env bash
# pgbench -S (select-only) against Postgres directly, through PgBouncer and through Tidepool
# (gateway + pooler, --pool-size 20), all started fresh on loopback, in each query mode and at
# each client count. Records in perf/RESULTS.md, per run: TPS and its ratio to PgBouncer and to
# direct, the proxies' CPU per transaction (utime+stime from /proc/PID/stat; Tidepool's split
# gateway + pooler), the Postgres backends opened during the run (pg_stat_database.sessions), and
# latency p50/p99 (pgbench's per-transaction log, sampled).
#
#   sudo perf/pgbench_compare.sh                       # 15 s per run, the full matrix
#   DURATION=10 CLIENTS="40" MODES=simple perf/pgbench_compare.sh
#
# Env: DURATION (s, default 15), CLIENTS ("4 40 200"), THREADS (pgbench -j, 2), SCALE (10),
#      TARGETS ("direct pgbouncer tidepool"), MODES ("simple extended prepared"),
#      TIDEPOOL_BIN (dir with tidepool-gateway and tidepool-pooler, default target/release),
#      TIDEPOOL_CORES (--cores of gateway and pooler; default as `tidepool up`: a quarter of the cores, at least one),
#      RESULTS (file to append to, default perf/RESULTS.md), KEEP=1 (keep the temp dir).
#
# PgBouncer 1.18 (Debian 12) cannot keep protocol-level prepared statements in transaction
# pooling (max_prepared_statements is 1.21+): for -M prepared a second PgBouncer runs in session
# pooling with one server connection per client, and the table says so. Tidepool and PgBouncer
# otherwise both pool 20 server connections.
# Exit status: 0 when every requested run worked, 1 otherwise (the results are written anyway).

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DURATION=${DURATION:-15}
CLIENTS=${CLIENTS:-4 40 200}
THREADS=${THREADS:-2}
SCALE=${SCALE:-10}
TARGETS=${TARGETS:-direct pgbouncer tidepool}
MODES=${MODES:-simple extended prepared}
RESULTS=${RESULTS:-$REPO/perf/RESULTS.md}
STAMP=$(date -u +%Y-%m-%dT%H%M%SZ)
OUT=$REPO/perf/out/pgbench-$STAMP
# Fraction of transactions pgbench logs for the latency percentiles.
SAMPLING=${SAMPLING:-0.05}

[ "$(id -u)" -eq 0 ] || die "run as root (Postgres and PgBouncer run as the postgres user via runuser)"
need pgbench ss runuser "$PGBOUNCER" "$PGBIN/initdb"
mkdir -p "$OUT"
chmod 0777 "$OUT"
make_workdir
FACTS=$(machine_facts)
max_clients=0
for c in $CLIENTS; do [ "$c" -gt "$max_clients" ] && max_clients=$c; done

start_pg $((max_clients * 2 + 50))
log "pgbench -i -s $SCALE"
PGPASSWORD=$APP_PASSWORD pgbench -i -q -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" -U "$APP_USER" "$APP_DB" \
    >"$OUT/init.log" 2>&1 || die "pgbench -i failed: see $OUT/init.log"

declare -A PORT PIDS NOTE TPS TXNS CPU STATUS OPENED P50 P99
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
            if ! pgbouncer_supports_prepared && [[ " $MODES " == *" prepared "* ]]; then
                main_port=$BOUNCER_PORT main_pid=$BOUNCER_PID
                BOUNCER_POOL_MODE=session BOUNCER_POOL_SIZE=$max_clients start_pgbouncer 1000
                PORT[pgbouncer-session]=$BOUNCER_PORT
                PIDS[pgbouncer-session]=$BOUNCER_PID
                EXTRA_BOUNCER_PIDS="${EXTRA_BOUNCER_PIDS:-} $BOUNCER_PID"
                BOUNCER_PORT=$main_port BOUNCER_PID=$main_pid
                NOTE[pgbouncer]="PgBouncer $(pgbouncer_version) has no max_prepared_statements (1.21+): its -M prepared rows are session pooling with one server connection per client (default_pool_size $max_clients); simple and extended are transaction pooling, 20 server connections"
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

# Backends started in the app database (read from another one, so as not to count the reader).
sessions() { pg_sql "SELECT sessions FROM pg_stat_database WHERE datname = '$APP_DB'" postgres; }

# percentile FILE P: the P-th percentile (0-100) of pgbench log latencies (3rd field, µs), in ms.
percentile() {
    awk '{print $3}' "$1" | sort -n | awk -v p="$2" '{a[NR]=$1} END { if (NR == 0) { print "-"; exit } i = int(NR * p / 100); if (i < 1) i = 1; if (i > NR) i = NR; printf "%.2f", a[i] / 1000 }'
}

for clients in $CLIENTS; do
    threads=$THREADS
    [ "$clients" -lt "$threads" ] && threads=$clients
    for mode in $MODES; do
        for target in $TARGETS; do
            key="$clients/$mode/$target"
            via=$target
            if [ "$target" = pgbouncer ] && [ "$mode" = prepared ] && [ -n "${PORT[pgbouncer-session]:-}" ]; then
                via=pgbouncer-session
            fi
            if [ -z "${PORT[$via]:-}" ]; then
                STATUS[$key]="not run"
                continue
            fi
            log "pgbench -S -M $mode -c $clients -T $DURATION via $via"
            rm -rf "$OUT/log-$clients-$mode-$target"
            mkdir -p "$OUT/log-$clients-$mode-$target"
            chmod 0777 "$OUT/log-$clients-$mode-$target"
            declare -A before_each=()
            for pid in ${PIDS[$via]}; do before_each[$pid]=$(cpu_ticks "$pid"); done
            before=$(cpu_ticks ${PIDS[$via]})
            opened_before=$(sessions)
            set +e
            (cd "$OUT/log-$clients-$mode-$target" &&
                PGPASSWORD=$APP_PASSWORD timeout $((DURATION + 120)) pgbench -S -n -M "$mode" -c "$clients" \
                    -j "$threads" -T "$DURATION" -l --sampling-rate "$SAMPLING" \
                    -h 127.0.0.1 -p "${PORT[$via]}" -U "$APP_USER" "$APP_DB") \
                >"$OUT/$clients-$mode-$target.log" 2>&1
            rc=$?
            set -e
            after=$(cpu_ticks ${PIDS[$via]})
            sleep 1.2 # a backend reports its connection within a second
            OPENED[$key]=$(($(sessions) - opened_before))
            log_file="$OUT/$clients-$mode-$target.log"
            TPS[$key]=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p' "$log_file" | head -1)
            TXNS[$key]=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$log_file" | head -1)
            cat "$OUT/log-$clients-$mode-$target"/pgbench_log.* >"$OUT/lat-$clients-$mode-$target.txt" 2>/dev/null || true
            P50[$key]=$(percentile "$OUT/lat-$clients-$mode-$target.txt" 50)
            P99[$key]=$(percentile "$OUT/lat-$clients-$mode-$target.txt" 99)
            rm -rf "$OUT/log-$clients-$mode-$target" "$OUT/lat-$clients-$mode-$target.txt"
            if [ -n "${PIDS[$via]}" ]; then
                CPU[$key]=$(us_per $((after - before)) "${TXNS[$key]:-0}")
                set -- ${PIDS[$via]}
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
                [ "$via" = pgbouncer-session ] && STATUS[$key]="ok (session pooling)"
            else
                err=$(grep -m1 -E 'error|ERROR|FATAL' "$log_file" | cut -c1-140 || true)
                STATUS[$key]="FAILED (rc $rc): ${err:-see log}"
                failed=1
            fi
            log "  tps ${TPS[$key]:-?}, proxy CPU ${CPU[$key]} us/txn, opened ${OPENED[$key]}, p50/p99 ${P50[$key]}/${P99[$key]} ms, ${STATUS[$key]}"
        done
    done
done

# TPS of a run that succeeded, as an integer; empty otherwise.
ok_tps() {
    case "${STATUS[$1]:-}" in ok*) echo "${TPS[$1]%.*}" ;; esac
}

ratio() { # ratio A B -> A/B as x.xx, or -
    awk -v a="${1:-}" -v b="${2:-}" 'BEGIN { if (a > 0 && b > 0) printf "%.2f", a / b; else print "-" }'
}

[ -f "$RESULTS" ] || printf '# Tidepool performance results\n\nWritten by the perf/ scripts; newest at the end.\n' >"$RESULTS"
{
    echo
    echo "## pgbench -S, $CLIENTS clients, ${MODES// /\/} — $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "| clients | mode | target | TPS | vs direct | vs PgBouncer | proxy CPU µs/txn | CPU vs PgBouncer | backends opened | p50 / p99 ms | status |"
    echo "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    for clients in $CLIENTS; do
        for mode in $MODES; do
            for target in $TARGETS; do
                key="$clients/$mode/$target"
                t=$(ok_tps "$key")
                shown=${t:--}
                # A failed run's TPS counts only the clients that survived: in parentheses.
                if [ -z "$t" ] && [ -n "${TPS[$key]:-}" ]; then shown="(${TPS[$key]%.*})"; fi
                cpu_ratio=$(ratio "${CPU[$key]%% *}" "${CPU[$clients/$mode/pgbouncer]%% *}")
                [ "$target" = pgbouncer ] && cpu_ratio="1.00"
                [ "${CPU[$key]:--}" = "-" ] && cpu_ratio="-"
                echo "| $clients | $mode | $target | $shown | $(ratio "$t" "$(ok_tps "$clients/$mode/direct")") | $(ratio "$t" "$(ok_tps "$clients/$mode/pgbouncer")") | ${CPU[$key]:--} | $cpu_ratio | ${OPENED[$key]:--} | ${P50[$key]:--} / ${P99[$key]:--} | ${STATUS[$key]:-} |"
            done
        done
    done
    echo
    echo "- command: \`pgbench -S -n -M MODE -c CLIENTS -j $THREADS -T $DURATION -l --sampling-rate $SAMPLING\` (scale $SCALE) as alice (SCRAM) on 127.0.0.1; run by \`DURATION=$DURATION CLIENTS=\"$CLIENTS\" MODES=\"$MODES\" perf/pgbench_compare.sh\`"
    echo "- Postgres: max_connections $((max_clients * 2 + 50)), shared_buffers 256MB, fsync/synchronous_commit off; PgBouncer: pool_mode transaction, default_pool_size 20; Tidepool: --pool-size 20, --auth-method md5, --cores $(tidepool_cores) for gateway and pooler each (of $(nproc); TIDEPOOL_CORES, by default as tidepool up gives them)"
    if [ -n "${TIDEPOOL_POOLER_ARGS:-}${TIDEPOOL_GATEWAY_ARGS:-}" ]; then
        echo "- Tidepool extra flags: pooler \`${TIDEPOOL_POOLER_ARGS:-}\`, gateway \`${TIDEPOOL_GATEWAY_ARGS:-}\`"
    fi
    echo "- proxy CPU: utime+stime of pgbouncer, or of tidepool-gateway + tidepool-pooler (each in parentheses, gateway first), over the run, divided by transactions; CPU vs PgBouncer < 1 means cheaper"
    echo "- backends opened: growth of pg_stat_database.sessions over the run (every target runs warm: the pool kept from the previous run)"
    echo "- latency: pgbench's per-transaction log (a $SAMPLING sample), connection time excluded"
    for target in $TARGETS; do
        if [ -n "${NOTE[$target]:-}" ]; then echo "- $target: ${NOTE[$target]}"; fi
    done
    echo "$FACTS"
} >>"$RESULTS"
log "results appended to $RESULTS (raw output in $OUT)"
exit "$failed"
