#!/usr/bin/env bash
# Where Tidepool's CPU goes per request: pgbench -S through a fresh gateway + pooler (release
# build) while `perf record -e cpu-clock -g` samples each process (the software clock works
# without hardware counters). Prints each process' top functions, self and with children, and
# keeps perf.data files for `perf report -i`.
#
#   sudo perf/profile.sh                    # 40 clients, -M simple, 15 s
#   CLIENTS=200 MODE=prepared perf/profile.sh
#   CONNECT=1 CLIENTS=8 perf/profile.sh     # logins: pgbench -C, a new SCRAM connection per transaction
#
# Env: CLIENTS (40), MODE (simple), DURATION (15), SCALE (10), TOP (40 lines per report),
#      CONNECT (unset; 1: pgbench -C),
#      TIDEPOOL_BIN (default target/release). Output: perf/out/profile-<stamp>/.

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CLIENTS=${CLIENTS:-40}
MODE=${MODE:-simple}
DURATION=${DURATION:-15}
SCALE=${SCALE:-10}
TOP=${TOP:-40}
OUT=$REPO/perf/out/profile-$(date -u +%Y-%m-%dT%H%M%SZ)

[ "$(id -u)" -eq 0 ] || die "run as root"
need perf pgbench runuser "$PGBIN/initdb"
mkdir -p "$OUT"
make_workdir
start_pg $((CLIENTS + 50))
PGPASSWORD=$APP_PASSWORD pgbench -i -q -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" -U "$APP_USER" "$APP_DB" \
    >"$OUT/init.log" 2>&1 || die "pgbench -i failed"
start_tidepool 1000 || die "Tidepool did not start"
per_txn=()
[ -n "${CONNECT:-}" ] && per_txn=(-C)

# Warm the pool first, so that the profile is of the steady state.
PGPASSWORD=$APP_PASSWORD pgbench -S -n -M "$MODE" -c "$CLIENTS" -j 2 -T 3 -h 127.0.0.1 -p "$GATEWAY_PORT" \
    -U "$APP_USER" "$APP_DB" >/dev/null 2>&1 || true
perf record -e cpu-clock -F 2000 -g -o "$OUT/gateway.data" -p "$GATEWAY_PID" -- sleep "$DURATION" >/dev/null 2>&1 &
rec1=$!
perf record -e cpu-clock -F 2000 -g -o "$OUT/pooler.data" -p "$POOLER_PID" -- sleep "$DURATION" >/dev/null 2>&1 &
rec2=$!
PGPASSWORD=$APP_PASSWORD pgbench -S -n "${per_txn[@]}" -M "$MODE" -c "$CLIENTS" -j 2 -T "$DURATION" -h 127.0.0.1 \
    -p "$GATEWAY_PORT" -U "$APP_USER" "$APP_DB" >"$OUT/pgbench.log" 2>&1 || true
wait "$rec1" "$rec2" || true
grep -E '^tps' "$OUT/pgbench.log" || true
for p in gateway pooler; do
    echo "=== $p: self"
    perf report -i "$OUT/$p.data" --no-children --stdio --percent-limit 0.7 -g none 2>/dev/null |
        grep -v '^#' | grep -v '^$' | head -n "$TOP"
    echo "=== $p: with children"
    perf report -i "$OUT/$p.data" --children --stdio --percent-limit 2 -g none 2>/dev/null |
        grep -v '^#' | grep -v '^$' | head -n "$TOP"
done
log "perf data in $OUT"
