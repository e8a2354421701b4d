# Shared pieces of the perf/ benchmark scripts (sourced, not run): a throwaway Postgres 15,
# PgBouncer and Tidepool on free loopback ports, CPU and memory readings of their processes,
# and cleanup of exactly what was started. Everything runs on 127.0.0.1.
#
# Needs: root (to run Postgres and PgBouncer as the `postgres` OS user via runuser), Postgres 15
# in $PGBIN, /usr/sbin/pgbouncer, pgbench, jq.

set -euo pipefail

PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
PGBOUNCER=${PGBOUNCER:-/usr/sbin/pgbouncer}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TIDEPOOL_BIN=${TIDEPOOL_BIN:-$REPO/target/release}
CLK_TCK=$(getconf CLK_TCK)
APP_USER=alice
APP_PASSWORD=alice-pw
APP_DB=app

# Filled in by the start_* functions.
WORK=""
PG_PORT=""
BOUNCER_PORT=""
BOUNCER_PID=""
GATEWAY_PORT=""
GATEWAY_PID=""
GATEWAY_PIDS=""
LINK_PORT=""
POOLER_PID=""

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

need() {
    for tool in "$@"; do
        command -v "$tool" >/dev/null 2>&1 || [ -x "$tool" ] || die "missing tool: $tool"
    done
}

# A TCP port on 127.0.0.1 that nothing listens on (and that we have not handed out yet).
_PORTS_GIVEN=" "
free_port() {
    local p
    for _ in $(seq 1 200); do
        p=$((20000 + RANDOM % 20000))
        case "$_PORTS_GIVEN" in *" $p "*) continue ;; esac
        if ! ss -Htln "sport = :$p" | grep -q .; then
            _PORTS_GIVEN="$_PORTS_GIVEN$p "
            echo "$p"
            return 0
        fi
    done
    die "no free port found"
}

# Waits until 127.0.0.1:$1 accepts connections (at most $2 seconds, default 30).
wait_port() {
    local port=$1 limit=${2:-30} i
    for i in $(seq 1 $((limit * 10))); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    return 1
}

make_workdir() {
    WORK=$(mktemp -d /tmp/tidepool-perf.XXXXXX)
    chmod 0755 "$WORK"
    chown postgres: "$WORK"
    trap cleanup EXIT
    log "work dir $WORK"
}

as_pg() { runuser -u postgres -- "$@"; }

# start_pg MAX_CONNECTIONS: a fresh cluster with role alice (SCRAM) owning database app.
# pg_hba and pg_ident follow docs/CONTRACTS.md (the pooler reads pg_authid over the socket).
start_pg() {
    local max_conn=${1:-200}
    PG_PORT=$(free_port)
    echo "postgres-pw" >"$WORK/pwfile"
    chown postgres: "$WORK/pwfile"
    as_pg "$PGBIN/initdb" -D "$WORK/data" -U postgres -E UTF8 --no-sync \
        --auth-local=peer --auth-host=scram-sha-256 --pwfile="$WORK/pwfile" >"$WORK/initdb.log" 2>&1 ||
        die "initdb failed: see $WORK/initdb.log"
    # As docs/CONTRACTS.md: md5 host lines (a SCRAM verifier still gets SCRAM under md5).
    cat >"$WORK/data/pg_hba.conf" <<EOF
local all postgres peer map=tidepool
local all all scram-sha-256
# 127.0.0.0/8: firehose --source-addrs spreads its clients over 127.0.0.x.
host all all 127.0.0.0/8 md5
EOF
    cat >"$WORK/data/pg_ident.conf" <<EOF
tidepool root postgres
tidepool postgres postgres
EOF
    # Same settings for every target; durability is relaxed so that the disk (shared with other
    # work on this machine) is not what gets measured.
    cat >>"$WORK/data/postgresql.conf" <<EOF
port = $PG_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
max_connections = $max_conn
shared_buffers = 256MB
synchronous_commit = off
fsync = off
full_page_writes = off
log_min_messages = warning
EOF
    # The port was free when picked; other work on this machine may take it before Postgres
    # binds it: then try another one (twice at most).
    local attempt
    for attempt in 1 2 3; do
        if as_pg "$PGBIN/pg_ctl" -D "$WORK/data" -l "$WORK/postgres.log" -w -t 60 start >/dev/null; then
            break
        fi
        grep -q "could not bind\|Address already in use" "$WORK/postgres.log" && [ "$attempt" -lt 3 ] ||
            die "Postgres did not start: $(tail -3 "$WORK/postgres.log" | tr '\n' ' ')"
        PG_PORT=$(free_port)
        log "port taken meanwhile; Postgres on $PG_PORT instead"
        sed -i "s/^port = .*/port = $PG_PORT/" "$WORK/data/postgresql.conf"
    done
    as_pg "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$WORK" -p "$PG_PORT" -U postgres -d postgres <<EOF
SET password_encryption = 'scram-sha-256';
CREATE ROLE $APP_USER LOGIN PASSWORD '$APP_PASSWORD';
CREATE DATABASE $APP_DB OWNER $APP_USER;
EOF
    log "Postgres $("$PGBIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PG_PORT (max_connections $max_conn)"
}

pg_sql() {
    as_pg "$PGBIN/psql" -X -q -At -v ON_ERROR_STOP=1 -h "$WORK" -p "$PG_PORT" -U postgres -d "${2:-postgres}" -c "$1"
}

pgbouncer_version() { "$PGBOUNCER" --version | awk 'NR==1{print $2}'; }

# Whether the installed PgBouncer can keep prepared statements in transaction mode (1.21+).
pgbouncer_supports_prepared() {
    local v major minor
    v=$(pgbouncer_version)
    major=${v%%.*}
    minor=${v#*.}
    minor=${minor%%.*}
    [ "$major" -gt 1 ] || { [ "$major" -eq 1 ] && [ "$minor" -ge 21 ]; }
}

# start_pgbouncer MAX_CLIENTS: transaction pooling, 20 server connections per (user, db),
# clients authenticated with alice's SCRAM verifier (auth_file), which PgBouncer then also
# uses to log in to Postgres. BOUNCER_POOL_MODE and BOUNCER_POOL_SIZE override the pooling; a
# second PgBouncer started this way gets a directory of its own.
start_pgbouncer() {
    local max_clients=${1:-1000} dir="$WORK/pgbouncer" verifier prepared=""
    [ -d "$dir" ] && dir="$WORK/pgbouncer-$RANDOM"
    BOUNCER_PORT=$(free_port)
    mkdir -p "$dir"
    verifier=$(pg_sql "SELECT rolpassword FROM pg_authid WHERE rolname = '$APP_USER'")
    printf '"%s" "%s"\n' "$APP_USER" "$verifier" >"$dir/userlist.txt"
    if pgbouncer_supports_prepared; then prepared="max_prepared_statements = 200"; fi
    cat >"$dir/pgbouncer.ini" <<EOF
[databases]
$APP_DB = host=127.0.0.1 port=$PG_PORT dbname=$APP_DB

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $dir/userlist.txt
pool_mode = ${BOUNCER_POOL_MODE:-transaction}
default_pool_size = ${BOUNCER_POOL_SIZE:-20}
max_client_conn = $max_clients
max_db_connections = 0
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
log_connections = 0
log_disconnections = 0
$prepared
EOF
    chown -R postgres: "$dir"
    chmod 0600 "$dir/userlist.txt"
    # PgBouncer needs one descriptor per client and server connection.
    as_pg bash -c "ulimit -n \$(ulimit -Hn); exec '$PGBOUNCER' -d -q '$dir/pgbouncer.ini'" ||
        die "PgBouncer did not start: see $dir/pgbouncer.log"
    # -d returns before the daemon writes its pidfile.
    for _ in $(seq 1 100); do [ -s "$dir/pgbouncer.pid" ] && break; sleep 0.1; done
    [ -s "$dir/pgbouncer.pid" ] || die "PgBouncer wrote no pidfile: see $dir/pgbouncer.log"
    BOUNCER_PID=$(cat "$dir/pgbouncer.pid")
    wait_port "$BOUNCER_PORT" 20 || die "PgBouncer not listening: see $dir/pgbouncer.log"
    log "PgBouncer $(pgbouncer_version) on 127.0.0.1:$BOUNCER_PORT (pid $BOUNCER_PID)"
}

tidepool_available() {
    [ -x "$TIDEPOOL_BIN/tidepool-pooler" ] && [ -x "$TIDEPOOL_BIN/tidepool-gateway" ]
}

# start_tidepool MAX_CLIENTS [GATEWAYS [GATEWAY_CORES]]: pooler (budget 20 per user/db) and
# GATEWAYS (default 1) gateway processes sharing one port (SO_REUSEPORT), each accepting
# MAX_CLIENTS; flags per CONTRACTS.md. The gateway authenticates as pg_hba's md5 does (SCRAM for
# a SCRAM verifier, md5 for an md5 one); the pooler reads pg_authid over the cluster's socket
# ($WORK) as postgres (peer, pg_ident map tidepool). TIDEPOOL_CORES is the --cores of both
# processes; default: what `tidepool up` gives each on this machine (a quarter of the cores, at
# least one: consensus/src/config.rs `default_cores`), so runs measure the configuration users
# get; TIDEPOOL_CORES=$(nproc) for every core each. GATEWAY_CORES overrides it for the gateways.
# TIDEPOOL_POOLER_ARGS and TIDEPOOL_GATEWAY_ARGS add flags (e.g. "--spin-before-park-us 0").
# Sets GATEWAY_PORT, GATEWAY_PID (the first gateway), GATEWAY_PIDS (all), LINK_PORT, POOLER_PID.
# The --cores of gateway and pooler in these runs (see start_tidepool).
tidepool_cores() {
    echo "${TIDEPOOL_CORES:-$((($(nproc) + 3) / 4))}"
}

start_tidepool() {
    local max_clients=${1:-1000} gateways=${2:-1} gw_cores=${3:-$(tidepool_cores)} cores=() gcores=() i pid
    cores=(--cores "$(tidepool_cores)")
    gcores=(--cores "$gw_cores")
    tidepool_available || {
        log "ERROR: Tidepool binaries missing: $TIDEPOOL_BIN/tidepool-pooler and tidepool-gateway"
        log "       build them with: cargo build --release -p tidepool-pooler -p tidepool-gateway"
        return 1
    }
    LINK_PORT=$(free_port)
    GATEWAY_PORT=$(free_port)
    # The link secret pooler and gateways prove to each other (mode 600 from the start).
    (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$WORK/link.key")
    (
        ulimit -n "$(ulimit -Hn)"
        # TIDEPOOL_POOLER_WRAP: a command to run the pooler under (e.g. "heaptrack -o F").
        exec ${TIDEPOOL_POOLER_WRAP:-} "$TIDEPOOL_BIN/tidepool-pooler" --listen "127.0.0.1:$LINK_PORT" \
            --link-secret-file "$WORK/link.key" \
            --pg-host 127.0.0.1 --pg-port "$PG_PORT" --admin-socket-dir "$WORK" \
            --admin-user postgres --pool-size "${TIDEPOOL_POOL_SIZE:-20}" "${cores[@]}" ${TIDEPOOL_POOLER_ARGS:-}
    ) >"$WORK/pooler.log" 2>&1 &
    POOLER_PID=$!
    wait_port "$LINK_PORT" 30 || { log "ERROR: pooler not listening: see $WORK/pooler.log"; return 1; }
    GATEWAY_PIDS=""
    for i in $(seq 1 "$gateways"); do
        (
            ulimit -n "$(ulimit -Hn)"
            # TIDEPOOL_GATEWAY_WRAP: a command to run the gateway under (e.g. "heaptrack -o F").
            exec ${TIDEPOOL_GATEWAY_WRAP:-} "$TIDEPOOL_BIN/tidepool-gateway" --listen "127.0.0.1:$GATEWAY_PORT" \
                --pooler "127.0.0.1:$LINK_PORT" --link-secret-file "$WORK/link.key" --auth-method md5 --max-clients "$max_clients" "${gcores[@]}" ${TIDEPOOL_GATEWAY_ARGS:-}
        ) >"$WORK/gateway-$i.log" 2>&1 &
        pid=$!
        GATEWAY_PIDS="$GATEWAY_PIDS${GATEWAY_PIDS:+ }$pid"
        # The first one must be up before the next binds the same port with SO_REUSEPORT.
        wait_port "$GATEWAY_PORT" 30 || { log "ERROR: gateway $i not listening: see $WORK/gateway-$i.log"; return 1; }
        kill -0 "$pid" 2>/dev/null || { log "ERROR: gateway $i exited: see $WORK/gateway-$i.log"; return 1; }
    done
    GATEWAY_PID=${GATEWAY_PIDS%% *}
    ln -sf gateway-1.log "$WORK/gateway.log"
    log "Tidepool: $gateways gateway(s) on 127.0.0.1:$GATEWAY_PORT (pids $GATEWAY_PIDS), pooler pid $POOLER_PID"
}

stop_tidepool() {
    local pid
    for pid in ${GATEWAY_PIDS:-$GATEWAY_PID} $POOLER_PID; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in ${GATEWAY_PIDS:-$GATEWAY_PID} $POOLER_PID; do
        wait "$pid" 2>/dev/null || true
    done
    GATEWAY_PID=""
    GATEWAY_PIDS=""
    POOLER_PID=""
}

# cpu_ticks PID...: user+system CPU time of the processes (all their threads), in clock ticks.
cpu_ticks() {
    local total=0 pid f
    for pid in "$@"; do
        [ -r "/proc/$pid/stat" ] || continue
        # Fields after the ")" that closes the command name: utime is the 12th, stime the 13th.
        f=$(sed 's/.*) //' "/proc/$pid/stat")
        total=$((total + $(echo "$f" | awk '{print $12 + $13}')))
    done
    echo "$total"
}

# peak_rss_kb PID...: sum of the processes' peak resident set (VmHWM), in kB.
peak_rss_kb() {
    local total=0 pid v
    for pid in "$@"; do
        v=$(awk '/^VmHWM:/{print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
        total=$((total + ${v:-0}))
    done
    echo "$total"
}

# us_per DELTA_TICKS COUNT: CPU microseconds per unit.
us_per() {
    awk -v t="$1" -v n="$2" -v hz="$CLK_TCK" 'BEGIN { if (n > 0) printf "%.1f", t / hz * 1e6 / n; else print "-" }'
}

# Which Tidepool was measured: the binaries' build time (they may predate HEAD's commits).
tidepool_build() {
    local when="not built"
    [ -x "$TIDEPOOL_BIN/tidepool-gateway" ] && when="built $(date -u -r "$TIDEPOOL_BIN/tidepool-gateway" '+%Y-%m-%d %H:%M UTC')"
    echo "tidepool binaries $when in $TIDEPOOL_BIN (HEAD at the run: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?'))"
}

machine_facts() {
    echo "- machine: $(nproc) cores ($(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo)), $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo), kernel $(uname -r)"
    echo "- Postgres $("$PGBIN/postgres" --version | awk '{print $3}'), PgBouncer $(pgbouncer_version), pgbench $(pgbench --version | awk '{print $3}'), $(tidepool_build)"
    echo "- load average at start: $(cut -d' ' -f1-3 /proc/loadavg) (the 2 cores are shared with other work: numbers are indicative)"
}

cleanup() {
    set +e
    stop_tidepool
    for pid in $BOUNCER_PID ${EXTRA_BOUNCER_PIDS:-}; do
        kill "$pid" 2>/dev/null
    done
    BOUNCER_PID=""
    if [ -n "$WORK" ] && [ -f "$WORK/data/postmaster.pid" ]; then
        as_pg "$PGBIN/pg_ctl" -D "$WORK/data" -m fast -w stop >/dev/null 2>&1
    fi
    if [ -n "$WORK" ] && [ "${KEEP:-0}" != 1 ]; then
        rm -rf "$WORK"
    elif [ -n "$WORK" ]; then
        log "kept $WORK"
    fi
}
