#!/usr/bin/env bash
# The same firehose profiles against Postgres directly, through PgBouncer and through Tidepool:
#   steady — CONNS connections held open (ramped up), a throttled read/write mix, slow churn;
#   churn  — CHURN_CONNS clients that connect, run one query and disconnect, as fast as they go.
# Records connections held, connects/s, errors, p50/p99, the proxy's peak RSS and CPU per
# request in perf/RESULTS.md; JSON and HTML reports of every run go to perf/out/.
#
#   sudo perf/firehose_compare.sh                      # 2,000 connections, 30 s per run
#   CONNS=10000 DURATION=60 TARGETS="pgbouncer tidepool" perf/firehose_compare.sh
#
# Rates and latencies are those of the steady window (after WARMUP seconds: direct Postgres
# takes longer than the ramp-up to fork its backends); totals and errors cover the whole run.
#
# Env: CONNS (2000), DURATION (s, 30), RAMP (s, 5), WARMUP (s, 10), READ_QPS (4000), WRITE_QPS (1000),
#      CHURN (connections replaced per second in steady, 20), CHURN_CONNS (50),
#      PROFILES ("steady churn"), TARGETS ("direct pgbouncer tidepool"), SOURCE_ADDRS (16),
#      FIREHOSE (binary; default target/release/firehose, built if missing), TIDEPOOL_BIN,
#      TIDEPOOL_CORES (--cores of gateway and pooler; default as `tidepool up`: a quarter of the cores, at least one),
#      RESULTS (perf/RESULTS.md), KEEP=1.
# Exit status: 0 when every requested run worked without errors, 1 otherwise.

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CONNS=${CONNS:-2000}
DURATION=${DURATION:-30}
RAMP=${RAMP:-5}
WARMUP=${WARMUP:-10}
READ_QPS=${READ_QPS:-4000}
WRITE_QPS=${WRITE_QPS:-1000}
CHURN=${CHURN:-20}
CHURN_CONNS=${CHURN_CONNS:-50}
PROFILES=${PROFILES:-steady churn}
TARGETS=${TARGETS:-direct pgbouncer tidepool}
SOURCE_ADDRS=${SOURCE_ADDRS:-16}
FIREHOSE=${FIREHOSE:-$REPO/target/release/firehose}
RESULTS=${RESULTS:-$REPO/perf/RESULTS.md}
STAMP=$(date -u +%Y-%m-%dT%H%M%SZ)
OUT=$REPO/perf/out/firehose-$STAMP

[ "$(id -u)" -eq 0 ] || die "run as root (Postgres and PgBouncer run as the postgres user via runuser)"
need jq ss runuser "$PGBOUNCER" "$PGBIN/initdb"
if [ ! -x "$FIREHOSE" ]; then
    log "building firehose (release)"
    (cd "$REPO" && cargo build --release -p firehose) || die "cannot build firehose"
fi
mkdir -p "$OUT"
make_workdir
FACTS=$(machine_facts)

max_clients=$((CONNS > CHURN_CONNS ? CONNS : CHURN_CONNS))
# Direct Postgres must hold every client itself.
start_pg $((max_clients + 100))
URL_BASE="postgres://$APP_USER:$APP_PASSWORD@127.0.0.1"
"$FIREHOSE" --url "$URL_BASE:$PG_PORT/$APP_DB" --init --init-only --rows 10000 ||
    die "firehose --init failed"

declare -A PORT PIDS NOTE
PORT[direct]=$PG_PORT
PIDS[direct]=""
failed=0
for target in $TARGETS; do
    case $target in
        direct) ;;
        pgbouncer)
            start_pgbouncer $((max_clients + 100))
            PORT[pgbouncer]=$BOUNCER_PORT
            PIDS[pgbouncer]=$BOUNCER_PID
            ;;
        tidepool)
            if start_tidepool $((max_clients + 100)); then
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

# Samples the summed RSS of PIDs every 0.5 s into FILE (its maximum), for at most LIMIT s.
rss_sampler() {
    local file=$1 limit=$2 max=0 cur pid i
    shift 2
    for i in $(seq 1 $((limit * 2))); do
        cur=0
        for pid in "$@"; do
            cur=$((cur + $(awk '/^VmRSS:/{print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)))
        done
        [ "$cur" -gt "$max" ] && max=$cur
        echo "$max" >"$file"
        sleep 0.5
    done
}

profile_args() {
    case $1 in
        steady) echo "--connections $CONNS --ramp-up $RAMP --warmup $WARMUP --read-qps $READ_QPS --write-qps $WRITE_QPS --churn $CHURN" ;;
        churn) echo "--profile churn --connections $CHURN_CONNS" ;;
    esac
}

declare -A ROW
for profile in $PROFILES; do
    for target in $TARGETS; do
        key="$profile/$target"
        if [ -z "${PORT[$target]:-}" ]; then
            ROW[$key]="| $profile | $target | - | - | - | - | - | - | - | - | not run |"
            continue
        fi
        json="$OUT/$profile-$target.json"
        log "firehose $profile via $target"
        before=$(cpu_ticks ${PIDS[$target]})
        sampler=""
        if [ -n "${PIDS[$target]}" ]; then
            rss_sampler "$OUT/$profile-$target.rss" $((DURATION + 60)) ${PIDS[$target]} &
            sampler=$!
        fi
        set +e
        # shellcheck disable=SC2046 # profile_args is a list of flags
        timeout $((DURATION + 120)) "$FIREHOSE" --url "$URL_BASE:${PORT[$target]}/$APP_DB" \
            $(profile_args "$profile") --duration "$DURATION" --source-addrs "$SOURCE_ADDRS" \
            --json "$json" --html "$OUT/$profile-$target.html" \
            >"$OUT/$profile-$target.log" 2>&1
        rc=$?
        set -e
        after=$(cpu_ticks ${PIDS[$target]})
        if [ -n "$sampler" ]; then
            kill "$sampler" 2>/dev/null || true
            wait "$sampler" 2>/dev/null || true
        fi
        if [ ! -s "$json" ]; then
            ROW[$key]="| $profile | $target | - | - | - | - | - | - | - | - | FAILED (rc $rc): $(tail -1 "$OUT/$profile-$target.log" | cut -c1-120) |"
            failed=1
            continue
        fi
        # Per request: a query in steady, a connect (with its one query) in churn; over the
        # whole run, like the CPU reading.
        if [ "$profile" = churn ]; then
            requests=$(jq '.totals.connects_ok' "$json")
            lat=connect
        else
            requests=$(jq '.queries_ok' "$json")
            lat=read
        fi
        cpu="-"
        rss="-"
        if [ -n "${PIDS[$target]}" ]; then
            cpu=$(us_per $((after - before)) "$requests")
            rss="$(awk '{printf "%.0f", $1/1024}' "$OUT/$profile-$target.rss") MiB"
        fi
        errors=$(jq -r '.error_total' "$json")
        top=$(jq -r '[.errors | to_entries | sort_by(-.value) | .[:3][] | "\(.key)=\(.value)"] | join(" ")' "$json")
        status=ok
        if [ "$rc" -ne 0 ] || [ "$errors" -ne 0 ]; then
            status="rc $rc, errors: ${top:-none}"
            failed=1
        fi
        ROW[$key]=$(jq -r --arg p "$profile" --arg t "$target" --arg cpu "$cpu" --arg rss "$rss" \
            --arg lat "$lat" --arg status "$status" '
            def ms: if . == null then "-" else (. * 100 | round / 100 | tostring) end;
            .steady as $s
            | "| \($p) | \($t) | \(.peak_conns_open) | \($s.connects_per_s * 10 | round / 10) | \($s.reads_per_s + $s.writes_per_s | round) | \(.error_total) | \($s.latency[$lat].p50_ms | ms) / \($s.latency[$lat].p99_ms | ms) | \($s.latency.write.p99_ms | ms) | \($rss) | \($cpu) | \($status) |"' "$json")
        log "  ${ROW[$key]}"
    done
done

[ -f "$RESULTS" ] || printf '# Tidepool performance results\n\nWritten by perf/pgbench_compare.sh and perf/firehose_compare.sh; newest at the end.\n' >"$RESULTS"
{
    echo
    echo "## firehose: steady $CONNS connections / churn $CHURN_CONNS clients — $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "| profile | target | peak conns | connects/s | queries/s | errors | p50 / p99 ms (steady: read, churn: connect) | write p99 ms | proxy peak RSS | proxy CPU µs/request | status |"
    echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    for profile in $PROFILES; do
        for target in $TARGETS; do
            echo "${ROW[$profile/$target]}"
        done
    done
    echo
    echo "- steady: \`firehose $(profile_args steady) --duration $DURATION --source-addrs $SOURCE_ADDRS\` (write ratio 0.2, simple protocol)"
    echo "- churn: \`firehose $(profile_args churn) --duration $DURATION --source-addrs $SOURCE_ADDRS\`: connect (SCRAM), one query, disconnect"
    echo "- run by \`CONNS=$CONNS DURATION=$DURATION perf/firehose_compare.sh\`; reports in perf/out/firehose-$STAMP/ (not committed)"
    echo "- connects/s, queries/s and latencies: steady window of each run (steady profile: after ${WARMUP}s warm-up; churn: whole run); errors: whole run"
    echo "- proxy: pgbouncer, or tidepool-gateway + tidepool-pooler; RSS sampled every 0.5 s; CPU = utime+stime over the run / requests (queries in steady, connects in churn)"
    echo "- Postgres: max_connections $((max_clients + 100)); PgBouncer: pool_mode transaction, default_pool_size 20; Tidepool: --pool-size 20, --auth-method md5, --cores $(tidepool_cores) for gateway and pooler each (of $(nproc); TIDEPOOL_CORES, by default as tidepool up gives them)"
    for target in $TARGETS; do
        if [ -n "${NOTE[$target]:-}" ]; then echo "- $target: ${NOTE[$target]}"; fi
    done
    echo "$FACTS"
} >>"$RESULTS"
log "results appended to $RESULTS (reports in $OUT)"
exit "$failed"
