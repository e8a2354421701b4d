#!/usr/bin/env bash
# Failover time, over repeated kills: a `tidepool up --standbys 2` cluster, one writer through
# the gateway (psycopg 3, one INSERT per transaction, as fast as it is answered), and KILLS
# times: kill -9 of the whole primary node (its pooler, which would restart Postgres, and
# every Postgres process), then the time until the first write succeeds again through the
# gateway, the writer's errors by SQLSTATE, and whether every acknowledged commit is on the
# new primary. The killed node is brought back (its pooler restarted; the control process
# rewinds it and it follows) before the next kill. Results appended to perf/RESULTS.md.
#
#   perf/failover.sh              # KILLS=5
#   KILLS=10 perf/failover.sh
#
# Env: KILLS (5), SETTLE (5: seconds of writes before each kill), TIDEPOOL_BIN (target/release),
#      RESULTS, KEEP=1 (keep the state directory).

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

KILLS=${KILLS:-5}
SETTLE=${SETTLE:-5}
RESULTS=${RESULTS:-$REPO/perf/RESULTS.md}
[ "$(id -u)" -eq 0 ] || die "run as root"
need jq python3
[ -x "$TIDEPOOL_BIN/tidepool" ] || (cd "$REPO" && cargo build --release -p tidepool -p tidepool-gateway -p tidepool-pooler) || die "build failed"
python3 -c 'import psycopg' 2>/dev/null || die "psycopg 3 missing (scripts/setup.sh installs it)"

DIR=$(mktemp -d /tmp/tp-failover.XXXXXX)
chmod 755 "$DIR"
BASE=$((20000 + RANDOM % 10000))
TP() { TIDEPOOL_BIN_DIR="$TIDEPOOL_BIN" "$TIDEPOOL_BIN/tidepool" --dir "$DIR" "$@"; }
WRITER=""
finish() {
    touch "$DIR/stop"
    [ -n "$WRITER" ] && kill "$WRITER" 2>/dev/null || true
    TP down --stop-timeout-secs 5 >/dev/null 2>&1 || true
    if [ "${KEEP:-}" = 1 ]; then log "kept $DIR"; else rm -rf "$DIR"; fi
}
trap finish EXIT

URL=$(TP up --standbys 2 --port "$BASE" --pooler-port $((BASE + 1)) --pg-port $((BASE + 7)) --cores 1 --pool-size 5 2>"$DIR/up.log" | tail -1)
[[ $URL == postgres://* ]] || die "tidepool up failed: $(tail -5 "$DIR/up.log")"
log "cluster up in $DIR: $URL"

# The writer: one line per event on stdout: "ok <id> <answered_ms> <sent_ms>" or
# "err <sqlstate> <answered_ms> <sent_ms>".
cat >"$DIR/writer.py" <<'PY'
import sys, time, psycopg
url, stop_file = sys.argv[1], sys.argv[2]
i = 0
conn = None
sent = 0
import os
while not os.path.exists(stop_file):
    try:
        if conn is None or conn.closed:
            conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
            conn.execute("CREATE TABLE IF NOT EXISTS acked (id bigint PRIMARY KEY)")
        i += 1
        sent = int(time.time()*1000)
        conn.execute("INSERT INTO acked (id) VALUES (%s)", (i,))
        print(f"ok {i} {int(time.time()*1000)} {sent}", flush=True)
    except psycopg.Error as e:
        code = getattr(e, "sqlstate", None) or type(e).__name__
        print(f"err {code} {int(time.time()*1000)} {sent}", flush=True)
        try:
            if conn is not None and conn.closed:
                conn = None
        except Exception:
            conn = None
        time.sleep(0.02)
PY
python3 "$DIR/writer.py" "$URL" "$DIR/stop" >"$DIR/writes.log" 2>"$DIR/writer.err" &
WRITER=$!

# `status` exits non-zero while a node is down: only its JSON matters here.
node_json() { TP status --json 2>/dev/null || true; }
primary_index() { node_json | jq -r '[.nodes | to_entries[] | select(.value.role == "primary")] | max_by(.value.primary_term) | .key // empty'; }

ROWS=""
for k in $(seq 1 "$KILLS"); do
    sleep "$SETTLE"
    p=$(primary_index)
    [ -n "$p" ] || die "no primary before kill $k"
    state=$(cat "$DIR/state.json")
    name=$(echo "$state" | jq -r ".nodes[$p].name")
    data=$(echo "$state" | jq -r ".nodes[$p].data_dir")
    if [ "$p" = 0 ]; then ppid=$(echo "$state" | jq -r '.processes[] | select(.name == "pooler") | .pid'); else ppid=$(echo "$state" | jq -r ".nodes[$p].pooler_pid"); fi
    pgpid=$(head -1 "$data/postmaster.pid")
    kill -9 "$ppid" 2>/dev/null || true
    kill -9 "$pgpid" $(pgrep -P "$pgpid") 2>/dev/null || true
    # The node is dead from here on.
    t0=$(date +%s%3N)
    log "kill $k: $name (pooler $ppid, postmaster $pgpid)"
    # The first write sent after the kill and acknowledged (one in flight at the kill may
    # still be answered by the dying primary: it does not show the new one works).
    t1=""
    for _ in $(seq 1 600); do
        t1=$(awk -v t0="$t0" '$1 == "ok" && $4 > t0 {print $3; exit}' "$DIR/writes.log")
        [ -n "$t1" ] && break
        sleep 0.1
    done
    [ -n "$t1" ] || die "writes did not resume within 60 s after kill $k"
    errs=$(awk -v t0="$t0" '$1 == "err" && $3 >= t0 {print $2}' "$DIR/writes.log" | sort | uniq -c | awk '{printf "%s%s=%s", (NR>1?" ":""), $2, $1}')
    newp=""
    for _ in $(seq 1 50); do newp=$(primary_index); [ -n "$newp" ] && break; sleep 0.1; done
    log "kill $k: writes again after $((t1 - t0)) ms on $(echo "$state" | jq -r ".nodes[$newp].name"); errors: ${errs:-none}"
    ROWS="$ROWS| $k | $name | $(echo "$state" | jq -r ".nodes[$newp].name") | $((t1 - t0)) | ${errs:-none} |"$'\n'
    # Bring the dead node back: `up` restarts its pooler, whose agent starts Postgres; the
    # control process rewinds it and it follows.
    # (Processes of the killed Postgres may take a moment to go: `up` is retried.)
    for _ in $(seq 1 10); do
        TP up >>"$DIR/up.log" 2>&1 && break
        log "up after kill $k failed, retrying: $(tail -1 "$DIR/up.log")"
        sleep 1
    done
    for _ in $(seq 1 120); do
        # Settled: one primary (an old one back but not yet rewound would be a second) and
        # two streaming standbys.
        n=$(node_json | jq -r '[([.nodes[] | select(.role == "primary")] | length), ([.nodes[] | select(.role == "standby" and .streaming == true)] | length)] | join(" ")')
        [ "$n" = "1 2" ] && break
        sleep 0.5
    done
done
touch "$DIR/stop"
wait "$WRITER" || true

# Every acknowledged id on the primary.
p=$(primary_index)
sock=$(jq -r ".nodes[$p].socket_dir" "$DIR/state.json")
port=$(jq -r ".nodes[$p].pg_port" "$DIR/state.json")
# comm needs both lists in the same (lexical) order.
awk '$1 == "ok" {print $2}' "$DIR/writes.log" | sort >"$DIR/acked.txt"
runuser -u postgres -- "$PGBIN/psql" -h "$sock" -p "$port" -d tidepool -XAtc "SELECT id FROM acked" | sort >"$DIR/have.txt"
missing=$(comm -23 "$DIR/acked.txt" "$DIR/have.txt" | wc -l)
acked=$(wc -l <"$DIR/acked.txt")
log "acknowledged $acked, missing on the primary: $missing"

{
    printf '\n## failover: kill -9 of the primary node, %s times — %s UTC\n\n' "$KILLS" "$(date -u '+%Y-%m-%d %H:%M')"
    echo "| kill | killed | promoted | first write after the kill (ms) | writer errors (SQLSTATE=count) |"
    echo "| ---: | --- | --- | ---: | --- |"
    printf '%s' "$ROWS"
    echo
    echo "- acknowledged commits: $acked; missing on the final primary: **$missing**"
    echo "- \`tidepool up --standbys 2\` (durability any 2, default timers), one psycopg writer through the gateway, one INSERT per transaction; kill -9 of the primary's pooler and every Postgres process of it; the node brought back with \`tidepool up\` between kills"
    echo "- run by \`KILLS=$KILLS perf/failover.sh\`; machine: 2 cores (shared), load $(cut -d' ' -f1-3 /proc/loadavg)"
} >>"$RESULTS"
[ "$missing" = 0 ] || die "$missing acknowledged commits lost"
