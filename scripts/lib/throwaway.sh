# shellcheck shell=bash
# A throwaway PostgreSQL 15 cluster and a Tidepool pooler + gateway in front of it, on free
# loopback ports, for scripts that run a test suite both ways (pg_regress.sh, app_suite.sh).
# Sourced, not run. The caller sets, before `start_cluster`:
#   PG_BIN BIN_DIR CORES POOL_SIZE   binaries and pooler sizing; MAX_BACKENDS (optional)
#   CLUSTER_ADMIN                    the bootstrap superuser (initdb -U; peer-mapped from root
#                                    and postgres; the pooler's admin role)
#   RUN_PREFIX                       mktemp prefix of the run directory under /tmp
#   PG_MAX_CONNECTIONS PG_EXTRA_CONF max_connections, and more postgresql.conf lines
#   RESULTS                          where the logs are copied at exit
# and defines log() and die(). The caller's suite runs as process group $SUITE_PID (killed at
# exit if still running).

RUN_DIR=
PG_STARTED=0
POOLER_PID=
GATEWAY_PID=
SUITE_PID=
TAKEN_PORTS=" "

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

free_port() {
    local p tries=0
    while ((tries++ < 1000)); do
        p=$((20000 + RANDOM % 12000))
        [[ $TAKEN_PORTS == *" $p "* ]] && continue
        # ss also sees ports bound without accepting (or behind another test's firewall rule).
        if ! port_in_use "$p" && [[ -z $(ss -Htan "sport = :$p" 2>/dev/null) ]]; then
            TAKEN_PORTS+="$p "
            echo "$p"
            return
        fi
    done
    die "no free port found"
}

wait_accepting() { # port what pid deadline-seconds
    local i
    for ((i = 0; i < $4 * 5; i++)); do
        port_in_use "$1" && return 0
        if [[ -n $3 ]] && ! kill -0 "$3" 2>/dev/null; then
            tail -n 30 "$RUN_DIR/$2.log" >&2 || true
            die "$2 exited before accepting on port $1"
        fi
        sleep 0.2
    done
    tail -n 30 "$RUN_DIR/$2.log" >&2 || true
    die "$2 not accepting on port $1 after $4 s"
}

as_postgres() { runuser -u postgres -- "$@"; }

admin_psql() { # db sql
    (cd /tmp && PGOPTIONS="-c client_min_messages=warning" as_postgres "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 \
        -h "$RUN_DIR/sock" -p "$PG_PORT" -U "$CLUSTER_ADMIN" -d "$1" -c "$2")
}

stop_tidepool() {
    local pid i
    for pid in "$GATEWAY_PID" "$POOLER_PID"; do
        [[ -n $pid ]] || continue
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "$GATEWAY_PID" "$POOLER_PID"; do
        [[ -n $pid ]] || continue
        for ((i = 0; i < 50; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    GATEWAY_PID=
    POOLER_PID=
}

# Ends the suite's process group: TERM, then KILL 3 s later.
kill_suite() {
    kill -TERM -- "-$SUITE_PID" 2>/dev/null
    sleep 3
    kill -KILL -- "-$SUITE_PID" 2>/dev/null
}

cleanup() {
    local rc=$?
    set +e
    [[ -n $SUITE_PID ]] && kill -KILL -- "-$SUITE_PID" 2>/dev/null
    stop_tidepool
    if [[ $PG_STARTED -eq 1 ]]; then
        (cd /tmp && as_postgres "$PG_BIN/pg_ctl" -D "$RUN_DIR/data" -m immediate -w stop >/dev/null 2>&1)
    fi
    if [[ -n $RUN_DIR && -d $RUN_DIR ]]; then
        mkdir -p "$RESULTS/logs"
        cp "$RUN_DIR"/*.log "$RESULTS/logs/" 2>/dev/null
        if [[ ${TIDEPOOL_KEEP_TEST_DIRS:-} == 1 ]]; then
            log "kept $RUN_DIR"
        else
            rm -rf "$RUN_DIR"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 2' INT TERM HUP

start_cluster() {
    RUN_DIR=$(mktemp -d "/tmp/$RUN_PREFIX.XXXXXX")
    chmod 755 "$RUN_DIR"
    chown postgres: "$RUN_DIR"
    as_postgres mkdir "$RUN_DIR/sock"
    PG_PORT=$(free_port)
    log "initdb ($RUN_DIR/data), Postgres on 127.0.0.1:$PG_PORT"
    (cd /tmp && as_postgres "$PG_BIN/initdb" -D "$RUN_DIR/data" -U "$CLUSTER_ADMIN" --no-sync --no-instructions \
        --encoding=UTF8 --locale=C --auth=trust) >"$RUN_DIR/initdb.log" 2>&1 || {
        cat "$RUN_DIR/initdb.log" >&2
        die "initdb failed"
    }
    printf '%s\n' "# TYPE  DATABASE  USER      ADDRESS        METHOD" \
        "local   all       $CLUSTER_ADMIN                 peer map=tidepool" \
        "local   all       all                      scram-sha-256" \
        "host    all       all       127.0.0.1/32   md5" |
        as_postgres tee "$RUN_DIR/data/pg_hba.conf" >/dev/null
    printf '%s\n' "# MAPNAME  SYSTEM-USERNAME  PG-USERNAME" \
        "tidepool   root             $CLUSTER_ADMIN" \
        "tidepool   postgres         $CLUSTER_ADMIN" |
        as_postgres tee "$RUN_DIR/data/pg_ident.conf" >/dev/null
    as_postgres tee -a "$RUN_DIR/data/postgresql.conf" >/dev/null <<EOF

# $(basename "$0")
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$RUN_DIR/sock'
max_connections = $PG_MAX_CONNECTIONS
max_prepared_transactions = 10
fsync = off
synchronous_commit = off
full_page_writes = off
lc_messages = 'C'
log_min_messages = warning
log_line_prefix = '%m [%p] %u@%d %a '
${PG_EXTRA_CONF:-}
EOF
    (cd /tmp && as_postgres "$PG_BIN/pg_ctl" -D "$RUN_DIR/data" -l "$RUN_DIR/postgres.log" -w -t 60 start) \
        >/dev/null 2>&1 || {
        tail -n 30 "$RUN_DIR/postgres.log" >&2
        die "pg_ctl start failed"
    }
    PG_STARTED=1
}

start_tidepool() {
    local max=()
    [[ -n ${MAX_BACKENDS:-} ]] && max=(--max-backends "$MAX_BACKENDS")
    POOLER_PORT=$(free_port)
    GATEWAY_PORT=$(free_port)
    log "tidepool-pooler on 127.0.0.1:$POOLER_PORT (--pool-size $POOL_SIZE${MAX_BACKENDS:+, --max-backends $MAX_BACKENDS}," \
        "--cores $CORES), tidepool-gateway on 127.0.0.1:$GATEWAY_PORT"
    # The link secret both prove to each other: 32 random bytes as hex, mode 600 from the start.
    (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$RUN_DIR/link.key")
    set -m # own process groups, so that a kill reaches anything they start
    NO_COLOR=1 "$BIN_DIR/tidepool-pooler" --listen "127.0.0.1:$POOLER_PORT" --cores "$CORES" \
        --link-secret-file "$RUN_DIR/link.key" \
        --pg-host 127.0.0.1 --pg-port "$PG_PORT" --admin-socket-dir "$RUN_DIR/sock" \
        --admin-user "$CLUSTER_ADMIN" --pool-size "$POOL_SIZE" "${max[@]}" \
        </dev/null >"$RUN_DIR/pooler.log" 2>&1 &
    POOLER_PID=$!
    set +m
    wait_accepting "$POOLER_PORT" pooler "$POOLER_PID" 30
    set -m
    NO_COLOR=1 "$BIN_DIR/tidepool-gateway" --listen "127.0.0.1:$GATEWAY_PORT" --cores "$CORES" \
        --pooler "127.0.0.1:$POOLER_PORT" --link-secret-file "$RUN_DIR/link.key" \
        </dev/null >"$RUN_DIR/gateway.log" 2>&1 &
    GATEWAY_PID=$!
    set +m
    wait_accepting "$GATEWAY_PORT" gateway "$GATEWAY_PID" 30
}
