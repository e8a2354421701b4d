#!/usr/bin/env bash
# firehose at scale: CONNS (default 50,000) client connections held at once, which no single
# process here can accept (hard open-file limit 20,000). The target is BOUNCERS PgBouncers
# sharing one port with SO_REUSEPORT (trust auth for clients, so the run measures holding
# connections rather than SCRAM), in front of one Postgres. firehose spreads its clients over
# ceil(CONNS / 15000) worker processes and 16 source addresses. With TARGET_URL set (e.g. a
# running Tidepool gateway) nothing is started: only firehose runs, against a table that must
# already exist (firehose --init once).
#
#   sudo perf/firehose_scale.sh                         # 50,000 connections, 60 s
#   TARGET_URL=postgres://alice:alice-pw@127.0.0.1:15432/app perf/firehose_scale.sh
#
# Env: CONNS (50000), DURATION (60), RAMP (30), READ_QPS (5000), WRITE_QPS (1000), CHURN (100),
#      BOUNCERS (4), TARGET_URL (skip the local setup), FIREHOSE, RESULTS, KEEP=1.

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CONNS=${CONNS:-50000}
DURATION=${DURATION:-60}
RAMP=${RAMP:-30}
READ_QPS=${READ_QPS:-5000}
WRITE_QPS=${WRITE_QPS:-1000}
CHURN=${CHURN:-100}
BOUNCERS=${BOUNCERS:-4}
FIREHOSE=${FIREHOSE:-$REPO/target/release/firehose}
RESULTS=${RESULTS:-$REPO/perf/RESULTS.md}
STAMP=$(date -u +%Y-%m-%dT%H%M%SZ)
OUT=$REPO/perf/out/scale-$STAMP

[ "$(id -u)" -eq 0 ] || die "run as root"
need jq ss runuser "$PGBOUNCER"
if [ ! -x "$FIREHOSE" ]; then
    (cd "$REPO" && cargo build --release -p firehose) || die "cannot build firehose"
fi
mkdir -p "$OUT"
FACTS_LOAD=$(cut -d' ' -f1-3 /proc/loadavg)

BOUNCER_PIDS=""
stop_bouncers() {
    local pid
    for pid in $BOUNCER_PIDS; do kill "$pid" 2>/dev/null || true; done
    BOUNCER_PIDS=""
}

if [ -n "${TARGET_URL:-}" ]; then
    url=$TARGET_URL
    target="$TARGET_URL (given)"
    init=""
else
    make_workdir
    trap 'stop_bouncers; cleanup' EXIT
    start_pg $((BOUNCERS * 20 + 50))
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
default_pool_size = 20
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
    url="postgres://$APP_USER@127.0.0.1:$port/$APP_DB"
    target="$BOUNCERS x PgBouncer $(pgbouncer_version) (SO_REUSEPORT, trust, transaction pooling, 20 server connections each)"
    init="--init"
fi

log "firehose: $CONNS connections against $target"
set +e
timeout $((DURATION + 300)) "$FIREHOSE" --url "$url" $init --connections "$CONNS" --source-addrs 16 \
    --ramp-up "$RAMP" --duration "$DURATION" --read-qps "$READ_QPS" --write-qps "$WRITE_QPS" \
    --churn "$CHURN" --json "$OUT/scale.json" --html "$OUT/scale.html" >"$OUT/scale.log" 2>&1
rc=$?
set -e
[ -s "$OUT/scale.json" ] || die "firehose failed (rc $rc): $(tail -3 "$OUT/scale.log")"
row=$(jq -r '.steady as $s | def ms: if . == null then "-" else (. * 100 | round / 100 | tostring) end;
    "| \(.config.connections) | \(.config.processes) | \(.peak_conns_open) | \(.totals.connects_ok) | \(.error_total) | \($s.reads_per_s + $s.writes_per_s | round) | \($s.latency.read.p50_ms | ms) / \($s.latency.read.p99_ms | ms) | \($s.connects_per_s * 10 | round / 10) |"' "$OUT/scale.json")
[ -f "$RESULTS" ] || printf '# Tidepool performance results\n' >"$RESULTS"
{
    echo
    echo "## firehose scale: $CONNS connections — $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "| connections | firehose processes | peak open | connects | errors | steady queries/s | steady read p50 / p99 ms | steady connects/s |"
    echo "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    echo "$row"
    echo
    echo "- target: $target"
    echo "- \`firehose --connections $CONNS --source-addrs 16 --ramp-up $RAMP --duration $DURATION --read-qps $READ_QPS --write-qps $WRITE_QPS --churn $CHURN\`; run by \`perf/firehose_scale.sh\`"
    echo "- machine: $(nproc) cores, kernel $(uname -r), load average at start $FACTS_LOAD (shared machine)"
} >>"$RESULTS"
log "$row"
exit $((rc != 0))
