#!/usr/bin/env bash
# Memory per idle client: K authenticated connections held open (and nearly idle: all of them
# together run one read per second) to ONE tidepool-gateway process, then the growth of its
# resident set (VmRSS from /proc/PID/status) divided by K; the same for the pooler behind it
# and, for comparison, for one PgBouncer holding the same K clients. Each step starts the
# proxies afresh, so every delta is measured from a clean baseline (taken after a short warm-up
# run, so that start-up allocations are not counted as per-client cost).
#
#   sudo perf/idle_memory.sh                       # 5,000 then 15,000 idle clients
#   STEPS="2000" TARGETS=tidepool perf/idle_memory.sh
#
# Env: STEPS ("5000 15000"; each under the 20,000 open-file limit of one process),
#      TARGETS ("tidepool pgbouncer"), RAMP (s to open them, 20; a proxy slower than K/RAMP
#      logins per second gets up to HOLD_MAX more seconds, default 90),
#      TIDEPOOL_BIN, FIREHOSE, RESULTS (perf/RESULTS.md), KEEP=1.
# Exit status: 0 when every step held all K connections without errors, 1 otherwise.

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

STEPS=${STEPS:-5000 15000}
TARGETS=${TARGETS:-tidepool pgbouncer}
RAMP=${RAMP:-20}
HOLD_MAX=${HOLD_MAX:-90}
FIREHOSE=${FIREHOSE:-$REPO/target/release/firehose}
RESULTS=${RESULTS:-$REPO/perf/RESULTS.md}
STAMP=$(date -u +%Y-%m-%dT%H%M%SZ)
OUT=$REPO/perf/out/idle-$STAMP

[ "$(id -u)" -eq 0 ] || die "run as root (Postgres and PgBouncer run as the postgres user via runuser)"
need jq ss runuser "$PGBOUNCER" "$PGBIN/initdb" "$FIREHOSE"
max_step=0
for k in $STEPS; do
    [ "$k" -le 18000 ] || die "step $k: one process cannot hold more than ~18,000 clients here (open-file limit 20,000)"
    [ "$k" -gt "$max_step" ] && max_step=$k
done
mkdir -p "$OUT"
make_workdir
FACTS=$(machine_facts)

start_pg 200
URL_BASE="postgres://$APP_USER:$APP_PASSWORD@127.0.0.1"
"$FIREHOSE" --url "$URL_BASE:$PG_PORT/$APP_DB" --init --init-only --rows 1000 >"$OUT/init.log" 2>&1 ||
    die "firehose --init failed: see $OUT/init.log"

rss_kb() { awk '/^VmRSS:/{print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
established() { ss -Htn state established "( sport = :$1 )" | wc -l; }
kib_per() { awk -v d="$1" -v n="$2" 'BEGIN { if (n > 0) printf "%.2f", d / n; else print "-" }'; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

# The proxy of one step: sets PORT, MAIN_PID (the process holding the clients), SIDE_PID (the
# pooler, or empty).
start_target() {
    case $1 in
        tidepool)
            start_tidepool $((max_step + 1000)) || return 1
            PORT=$GATEWAY_PORT MAIN_PID=$GATEWAY_PID SIDE_PID=$POOLER_PID
            ;;
        pgbouncer)
            start_pgbouncer $((max_step + 1000))
            PORT=$BOUNCER_PORT MAIN_PID=$BOUNCER_PID SIDE_PID=""
            ;;
        *) die "unknown target $1 (tidepool, pgbouncer)" ;;
    esac
}

stop_target() {
    case $1 in
        tidepool) stop_tidepool ;;
        pgbouncer)
            kill "$BOUNCER_PID" 2>/dev/null || true
            for _ in $(seq 1 50); do kill -0 "$BOUNCER_PID" 2>/dev/null || break; sleep 0.1; done
            BOUNCER_PID=""
            ;;
    esac
}

# hold_round TARGET K ROUND: opens K clients, waits until the proxy has all of them
# established (bounded: RAMP + HOLD_MAX s), waits 2 s more for the last logins, reads the
# resident sets into R_MAIN/R_SIDE (kB) and the established count into R_HELD, then stops
# firehose (SIGINT: it still writes its report) and sets R_RC and R_JSON.
hold_round() {
    local target=$1 k=$2 round=$3 fh
    R_JSON="$OUT/$target-$k-r$round.json"
    timeout $((RAMP + HOLD_MAX + 120)) "$FIREHOSE" --url "$URL_BASE:$PORT/$APP_DB" \
        --connections "$k" --ramp-up "$RAMP" --duration $((RAMP + HOLD_MAX)) --source-addrs 16 \
        --write-ratio 0 --read-qps 1 --rows 1000 --connect-timeout 60 --quiet \
        --json "$R_JSON" >"$OUT/$target-$k-r$round.log" 2>&1 &
    fh=$!
    R_HELD=0
    for _ in $(seq 1 $(((RAMP + HOLD_MAX) * 4))); do
        R_HELD=$(established "$PORT")
        [ "$R_HELD" -ge "$k" ] && break
        kill -0 "$fh" 2>/dev/null || break
        sleep 0.25
    done
    sleep 2
    R_HELD=$(established "$PORT")
    R_MAIN=$(rss_kb "$MAIN_PID")
    R_SIDE=0
    [ -n "$SIDE_PID" ] && R_SIDE=$(rss_kb "$SIDE_PID")
    kill -INT "$fh" 2>/dev/null || true
    R_RC=0
    wait "$fh" || R_RC=$?
    # Give the proxy a moment to see every client go.
    for _ in $(seq 1 40); do
        [ "$(established "$PORT")" -eq 0 ] && break
        sleep 0.25
    done
}

failed=0
ROWS=""
for target in $TARGETS; do
    for k in $STEPS; do
        log "$target: $k idle clients"
        if ! start_target "$target"; then
            ROWS="$ROWS| $target | $k | - | - | - | - | - | - | - | not started |"$'\n'
            failed=1
            continue
        fi
        # Warm-up: a few hundred sessions come and go, so that thread-local caches, allocator
        # arenas and the pool's backends exist before the baseline.
        "$FIREHOSE" --url "$URL_BASE:$PORT/$APP_DB" --connections 200 --ramp-up 1 --duration 3 \
            --rows 1000 --quiet >"$OUT/$target-$k-warmup.log" 2>&1 || log "  warm-up failed: see $OUT/$target-$k-warmup.log"
        sleep 1
        base_main=$(rss_kb "$MAIN_PID")
        base_side=0
        [ -n "$SIDE_PID" ] && base_side=$(rss_kb "$SIDE_PID")

        hold_round "$target" "$k" 1
        with_main=$R_MAIN with_side=$R_SIDE held=$R_HELD rc=$R_RC json=$R_JSON
        sleep 2
        after_main=$(rss_kb "$MAIN_PID")
        # The same clients again on the same process: memory that the first round left behind
        # is either reused (a second round costs nothing: the allocator kept it) or not (the
        # resident set grows again: per-session state leaks).
        hold_round "$target" "$k" 2
        again_main=$R_MAIN
        [ "$R_RC" -ne 0 ] && rc=$R_RC
        [ "$R_HELD" -lt "$held" ] && held=$R_HELD
        # Queries in flight when firehose was stopped count as `aborted`: not the proxy's doing.
        errors=$(jq -r '[.errors | to_entries[] | select(.key | endswith("/aborted") | not) | .value] | add // 0' "$json" 2>/dev/null || echo "?")
        status=ok
        if [ "$rc" -ne 0 ] || [ "$errors" != 0 ] || [ "$held" -lt "$k" ]; then
            top=$(jq -r '[.errors | to_entries | sort_by(-.value) | .[:3][] | "\(.key)=\(.value)"] | join(" ")' "$json" 2>/dev/null || true)
            status="rc $rc, $held of $k held, errors: ${top:-$errors}"
            failed=1
        fi
        side_cell="-"
        [ -n "$SIDE_PID" ] && side_cell="$(mib "$base_side") → $(mib "$with_side") MiB, $(kib_per $((with_side - base_side)) "$held") KiB"
        row="| $target | $k | $held | $(mib "$base_main") | $(mib "$with_main") | **$(kib_per $((with_main - base_main)) "$held")** | $(mib "$after_main") | $(mib "$again_main") | $side_cell | $status |"
        log "  $row"
        ROWS="$ROWS$row"$'\n'
        stop_target "$target"
    done
done

[ -f "$RESULTS" ] || printf '# Tidepool performance results\n' >"$RESULTS"
{
    echo
    echo "## Idle clients: resident memory per connection — $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "| target | idle clients | held | RSS before MiB | RSS holding them MiB | **KiB per client** | RSS after they left MiB | RSS holding them again MiB | pooler (before → holding, per client) | status |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"
    printf '%s' "$ROWS"
    echo
    echo "- clients: \`firehose --connections K --ramp-up $RAMP --duration $((RAMP + HOLD_MAX)) --source-addrs 16 --write-ratio 0 --read-qps 1 --connect-timeout 60\` as alice (SCRAM), stopped (SIGINT) once the proxy held all K: authenticated sessions, one read per second among all of them; run by \`STEPS=\"$STEPS\" perf/idle_memory.sh\`"
    echo "- after they left: 2 s after the last client closed; again: a second identical round on the same process (equal to the first: the memory is kept and reused, not leaked)"
    echo "- RSS: VmRSS of the one process holding the clients (tidepool-gateway with --cores $(tidepool_cores), or pgbouncer), read after all K were established (ss) + 2 s; baseline after a 200-session warm-up on a freshly started proxy; held = established TCP connections on the proxy's port at the reading"
    echo "- Tidepool: gateway \`--max-clients $((max_step + 1000)) --auth-method md5\`, pooler \`--pool-size 20\`; PgBouncer: pool_mode transaction, default_pool_size 20"
    echo "$FACTS"
} >>"$RESULTS"
log "results appended to $RESULTS (raw output in $OUT)"
exit "$failed"
