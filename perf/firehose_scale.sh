#!/usr/bin/env bash
# firehose at scale: CONNS (default 50,000) client connections held at once, which no single
# process here can accept (hard open-file limit 20,000), in front of one Postgres:
#   TARGET=tidepool  — GATEWAYS tidepool-gateway processes sharing one port (SO_REUSEPORT),
#                      --cores GATEWAY_CORES each, one tidepool-pooler (--pool-size 20); clients
#                      log in as bob (md5 verifier: one MD5 per login, so the run measures
#                      holding connections rather than SCRAM's PBKDF2 in the load generator);
#   TARGET=pgbouncer — BOUNCERS PgBouncers sharing one port (SO_REUSEPORT, trust auth for
#                      clients, transaction pooling, 20 server connections each).
# firehose spreads its clients over ceil(CONNS / 15000) worker processes and 16 source
# addresses. For the run, the ephemeral port range is widened (PORT_RANGE) and the listening
# ports are reserved (net.ipv4.ip_local_reserved_ports) so that no outgoing connection takes
# one; both sysctls are restored on exit. With TARGET_URL set nothing is started: only
# firehose runs, against a table that must already exist (firehose --init once).
#
#   sudo perf/firehose_scale.sh                                  # Tidepool, 50,000 connections
#   CONNS=10000 GATEWAYS=4 perf/firehose_scale.sh                 # scaled down first
#   TARGET=pgbouncer perf/firehose_scale.sh
#   TARGET_URL=postgres://alice:alice-pw@127.0.0.1:15432/app perf/firehose_scale.sh
#
# Env: CONNS (50000), DURATION (60), RAMP (30; or CONNECT_RATE connects/s: RAMP = CONNS /
#      CONNECT_RATE), READ_QPS (5000), WRITE_QPS (1000), CHURN (100), TARGET (tidepool),
#      GATEWAYS (4), GATEWAY_CORES (1), BOUNCERS (4), PORT_RANGE ("10000 65000"), TARGET_URL,
#      FIREHOSE, TIDEPOOL_BIN, RESULTS, KEEP=1,
#      POOL (20): Postgres connections in all, the same for both targets (Tidepool's
#      --pool-size; each PgBouncer's default_pool_size is POOL / BOUNCERS). Before 2026-12-07
#      every PgBouncer had 20, four times Tidepool's backends.

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CONNS=${CONNS:-50000}
DURATION=${DURATION:-60}
if [ -n "${CONNECT_RATE:-}" ]; then
    RAMP=$(((CONNS + CONNECT_RATE - 1) / CONNECT_RATE))
else
    RAMP=${RAMP:-30}
fi
READ_QPS=${READ_QPS:-5000}
WRITE_QPS=${WRITE_QPS:-1000}
CHURN=${CHURN:-100}
TARGET=${TARGET:-tidepool}
GATEWAYS=${GATEWAYS:-4}
GATEWAY_CORES=${GATEWAY_CORES:-1}
BOUNCERS=${BOUNCERS:-4}
POOL=${POOL:-20}
BOUNCER_POOL=$(((POOL + BOUNCERS - 1) / BOUNCERS))
PORT_RANGE=${PORT_RANGE:-10000 65000}
FIREHOSE=${FIREHOSE:-$REPO/target/release/firehose}
RESULTS=${RESULTS:-$REPO/perf/RESULTS.md}
STAMP=$(date -u +%Y-%m-%dT%H%M%SZ)
OUT=$REPO/perf/out/scale-$STAMP

[ "$(id -u)" -eq 0 ] || die "run as root"
need jq ss runuser sysctl "$PGBOUNCER"
if [ ! -x "$FIREHOSE" ]; then
    (cd "$REPO" && cargo build --release -p firehose) || die "cannot build firehose"
fi
[ "$RAMP" -lt "$DURATION" ] || die "ramp-up ($RAMP s) must be shorter than DURATION ($DURATION s)"
mkdir -p "$OUT"
FACTS_LOAD=$(cut -d' ' -f1-3 /proc/loadavg)

BOUNCER_PIDS=""
stop_bouncers() {
    local pid
    for pid in $BOUNCER_PIDS; do kill "$pid" 2>/dev/null || true; done
    BOUNCER_PIDS=""
}

# The ephemeral port range and the reserved ports as they were; restored on exit.
OLD_RANGE=$(sysctl -n net.ipv4.ip_local_port_range | tr '\t' ' ')
OLD_RESERVED=$(sysctl -n net.ipv4.ip_local_reserved_ports)
SYSCTL_CHANGED=0
restore_sysctls() {
    if [ "$SYSCTL_CHANGED" = 1 ]; then
        sysctl -q -w net.ipv4.ip_local_port_range="$OLD_RANGE" || log "could not restore ip_local_port_range ($OLD_RANGE)"
        sysctl -q -w net.ipv4.ip_local_reserved_ports="$OLD_RESERVED" || log "could not restore ip_local_reserved_ports ($OLD_RESERVED)"
        SYSCTL_CHANGED=0
        log "restored ip_local_port_range $OLD_RANGE, ip_local_reserved_ports '$OLD_RESERVED'"
    fi
}
# widen_ports PORT...: the wide range, with these listening ports (and the usual Postgres and
# Tidepool defaults, which other work on this machine may want to bind) kept out of it.
widen_ports() {
    local reserved
    reserved=$(printf '%s\n' 5432 15432 15433 "$@" ${OLD_RESERVED//,/ } | grep -v '^$' | sort -nu | paste -sd, -)
    SYSCTL_CHANGED=1
    sysctl -q -w net.ipv4.ip_local_reserved_ports="$reserved" || die "cannot set ip_local_reserved_ports"
    sysctl -q -w net.ipv4.ip_local_port_range="$PORT_RANGE" || die "cannot set ip_local_port_range"
    log "ip_local_port_range $PORT_RANGE, reserved $reserved (was: $OLD_RANGE, '$OLD_RESERVED')"
}

PROXY_PIDS=""
if [ -n "${TARGET_URL:-}" ]; then
    trap restore_sysctls EXIT
    url=$TARGET_URL
    target="$TARGET_URL (given)"
    init=""
    widen_ports "$(echo "$url" | sed -n 's/.*:\([0-9][0-9]*\)\/.*/\1/p')"
else
    make_workdir
    trap 'stop_bouncers; cleanup; restore_sysctls' EXIT
    case $TARGET in
        pgbouncer) start_pg $((BOUNCERS * 20 + 50)) ;;
        tidepool) start_pg 150 ;;
        *) die "unknown TARGET $TARGET (tidepool, pgbouncer)" ;;
    esac
fi

if [ -z "${TARGET_URL:-}" ] && [ "$TARGET" = pgbouncer ]; then
    port=$(free_port)
    dir="$WORK/bouncers"
    mkdir -p "$dir"
    # A plaintext password lets PgBouncer log in to Postgres (SCRAM) for trust-auth clients.
    printf '"%s" "%s"\n' "$APP_USER" "$APP_PASSWORD" >"$dir/userlist.txt"
    for i in $(seq 1 "$BOUNCERS"); do
        cat >"$dir/b$i.ini" <<EOF
[databases]
$APP_DB = host=127.0.0.1 port=$PG_PORT dbname=$APP_DB
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
so_reuseport = 1
listen_backlog = 4096
unix_socket_dir =
auth_type = trust
auth_file = $dir/userlist.txt
pool_mode = transaction
default_pool_size = $BOUNCER_POOL
max_client_conn = 19000
logfile = $dir/b$i.log
pidfile = $dir/b$i.pid
log_connections = 0
log_disconnections = 0
EOF
    done
    chown -R postgres: "$dir"
    chmod 0600 "$dir/userlist.txt"
    for i in $(seq 1 "$BOUNCERS"); do
        as_pg bash -c "ulimit -n \$(ulimit -Hn); exec '$PGBOUNCER' -d -q '$dir/b$i.ini'" ||
            die "PgBouncer $i did not start: see $dir/b$i.log"
        # -d returns before the daemon writes its pidfile.
        for _ in $(seq 1 100); do [ -s "$dir/b$i.pid" ] && break; sleep 0.1; done
        [ -s "$dir/b$i.pid" ] || die "PgBouncer $i wrote no pidfile: see $dir/b$i.log"
        BOUNCER_PIDS="$BOUNCER_PIDS $(cat "$dir/b$i.pid")"
    done
    wait_port "$port" 20 || die "PgBouncers not listening"
    widen_ports "$PG_PORT" "$port"
    PROXY_PIDS=$BOUNCER_PIDS
    url="postgres://$APP_USER@127.0.0.1:$port/$APP_DB"
    target="$BOUNCERS x PgBouncer $(pgbouncer_version) (SO_REUSEPORT, trust, transaction pooling, $BOUNCER_POOL server connections each)"
    init="--init"
elif [ -z "${TARGET_URL:-}" ]; then
    # bob: an md5 verifier, so that a login costs one MD5 on each side (pg_hba: md5).
    pg_sql "SET password_encryption = 'md5'; CREATE ROLE bob LOGIN PASSWORD 'bob-pw'" >/dev/null
    pg_sql "GRANT USAGE, CREATE ON SCHEMA public TO bob" "$APP_DB" >/dev/null
    per_gateway=$(((CONNS + GATEWAYS - 1) / GATEWAYS))
    # Room for SO_REUSEPORT's uneven spread over the gateways (a hash of the 4-tuple), within
    # one process' open-file limit.
    max_clients=$((per_gateway * 3 / 2 + 1000))
    [ "$max_clients" -le 19000 ] || max_clients=19000
    TIDEPOOL_POOL_SIZE=$POOL start_tidepool "$max_clients" "$GATEWAYS" "$GATEWAY_CORES" ||
        die "Tidepool did not start: see $WORK/pooler.log and $WORK/gateway-*.log"
    widen_ports "$PG_PORT" "$GATEWAY_PORT" "$LINK_PORT"
    PROXY_PIDS="$GATEWAY_PIDS $POOLER_PID"
    # The table is made directly in Postgres; the run through Tidepool only reads and inserts.
    "$FIREHOSE" --url "postgres://bob:bob-pw@127.0.0.1:$PG_PORT/$APP_DB" --init --init-only \
        >"$OUT/init.log" 2>&1 || die "firehose --init failed: see $OUT/init.log"
    url="postgres://bob:bob-pw@127.0.0.1:$GATEWAY_PORT/$APP_DB"
    target="$GATEWAYS x tidepool-gateway (SO_REUSEPORT, --cores $GATEWAY_CORES, --auth-method md5, --max-clients $max_clients) + 1 tidepool-pooler (--pool-size $POOL, --cores $(tidepool_cores)); clients log in as bob (md5)"
    init=""
fi

rss_mib() { awk '/^VmRSS:/{printf "%.0f", $2/1024}' "/proc/$1/status" 2>/dev/null || echo "-"; }
# Open descriptors of a process: its clients, give or take listeners, links and backends.
fds() { find "/proc/$1/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }

log "firehose: $CONNS connections against $target"
before=0
[ -n "$PROXY_PIDS" ] && before=$(cpu_ticks $PROXY_PIDS)
# shellcheck disable=SC2086 # $init is empty or one flag
timeout $((DURATION + 300)) "$FIREHOSE" --url "$url" $init --connections "$CONNS" --source-addrs 16 \
    --ramp-up "$RAMP" --duration "$DURATION" --read-qps "$READ_QPS" --write-qps "$WRITE_QPS" \
    --churn "$CHURN" --json "$OUT/scale.json" --html "$OUT/scale.html" >"$OUT/scale.log" 2>&1 &
fh=$!
# Halfway through the steady part: how the clients spread over the proxy processes, and their
# resident sets.
# Postgres backends of the load's role, every 5 s for the whole run (the proxy must keep them
# at its budget however many clients churn): the peak is recorded.
BACKENDS_FILE="$OUT/backends.txt"
: >"$BACKENDS_FILE"
if [ -z "${TARGET_URL:-}" ]; then
    (
        for _ in $(seq 1 $(((DURATION + 300) / 5))); do
            kill -0 "$fh" 2>/dev/null || break
            pg_sql "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND usename <> 'postgres'" >>"$BACKENDS_FILE" 2>/dev/null || true
            sleep 5
        done
    ) &
fi
spread=""
if [ -n "$PROXY_PIDS" ]; then
    at=$((RAMP + (DURATION - RAMP) / 2))
    sleep "$at"
    for pid in $PROXY_PIDS; do
        spread="$spread${spread:+, }pid $pid: $(fds "$pid") fds, $(rss_mib "$pid") MiB"
    done
    log "at $at s: $spread"
fi
rc=0
wait "$fh" || rc=$?
cpu="-"
if [ -n "$PROXY_PIDS" ] && [ -s "$OUT/scale.json" ]; then
    cpu=$(us_per $(($(cpu_ticks $PROXY_PIDS) - before)) "$(jq '.queries_ok' "$OUT/scale.json")")
fi
[ -s "$OUT/scale.json" ] || die "firehose failed (rc $rc): $(tail -3 "$OUT/scale.log")"
errors=$(jq -r '[.errors | to_entries | sort_by(-.value) | .[:4][] | "\(.key)=\(.value)"] | join(" ")' "$OUT/scale.json")
row=$(jq -r --arg cpu "$cpu" '.steady as $s | def ms: if . == null then "-" else (. * 100 | round / 100 | tostring) end;
    "| \(.config.connections) | \(.config.processes) | \(.peak_conns_open) | \(.totals.connects_ok) | \(.error_total) | \($s.reads_per_s + $s.writes_per_s | round) | \($s.latency.read.p50_ms | ms) / \($s.latency.read.p99_ms | ms) | \($s.latency.write.p99_ms | ms) | \($s.connects_per_s * 10 | round / 10) | \($cpu) |"' "$OUT/scale.json")
what=${TARGET_URL:+given URL}
what=${what:-$TARGET}
[ -f "$RESULTS" ] || printf '# Tidepool performance results\n' >"$RESULTS"
{
    echo
    echo "## firehose scale: $CONNS connections, $what — $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "| connections | firehose processes | peak open | connects | errors | steady queries/s | steady read p50 / p99 ms | steady write p99 ms | steady connects/s | proxy CPU µs/query |"
    echo "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    echo "$row"
    echo
    echo "- target: $target"
    if [ -n "$spread" ]; then echo "- proxy processes halfway through the steady part (descriptors ≈ clients; RSS): $spread"; fi
    if [ -s "$BACKENDS_FILE" ]; then echo "- Postgres client backends (all roles but postgres), sampled every 5 s: peak $(sort -n "$BACKENDS_FILE" | tail -1), $(wc -l <"$BACKENDS_FILE") samples"; fi
    if [ -n "$errors" ]; then echo "- errors: $errors"; fi
    echo "- \`firehose --connections $CONNS --source-addrs 16 --ramp-up $RAMP --duration $DURATION --read-qps $READ_QPS --write-qps $WRITE_QPS --churn $CHURN\`; run by \`CONNS=$CONNS TARGET=$what ${CONNECT_RATE:+CONNECT_RATE=$CONNECT_RATE }perf/firehose_scale.sh\`; reports in perf/out/scale-$STAMP/ (not committed)"
    echo "- proxy CPU: utime+stime of every proxy process over the run / queries answered"
    echo "- ip_local_port_range $PORT_RANGE with the listening ports reserved during the run (restored after: $OLD_RANGE)"
    echo "- machine: $(nproc) cores, kernel $(uname -r), load average at start $FACTS_LOAD (shared machine); $(tidepool_build)"
} >>"$RESULTS"
log "$row"
exit $((rc != 0))
