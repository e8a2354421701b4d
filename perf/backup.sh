#!/usr/bin/env bash
# Backup and restore throughput: a SIZE_MB database in a throwaway Postgres 15 (DATA=pgbench:
# pgbench's tables, which zst shrinks about 20:1; DATA=random: rows of 1000 random bytes, which
# no compression shrinks),
# backed up and restored with pgBackRest (compress-type=zst, process-max 1 and 2, as Tidepool
# configures it), beside plain pg_basebackup (-X stream, uncompressed, into a directory: that
# copy is its own restore). MB/s = database size (pg_database_size of every database) / time.
# Results appended to perf/RESULTS.md.
#
#   perf/backup.sh                 # SIZE_MB=1024
#   SIZE_MB=256 DATA=random perf/backup.sh
#
# Env: SIZE_MB (1024), DATA (pgbench), NICE (15: everything runs under nice, the machine is shared), RESULTS,
#      KEEP=1 (keep the work directory).

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SIZE_MB=${SIZE_MB:-1024}
DATA=${DATA:-pgbench}
NICE=${NICE:-15}
RESULTS=${RESULTS:-$REPO/perf/RESULTS.md}
[ "$(id -u)" -eq 0 ] || die "run as root"
need pgbackrest pgbench
renice -n "$NICE" $$ >/dev/null

make_workdir
start_pg 50
CONF="$WORK/pgbackrest.conf"
STANZA=bench
mkdir -p "$WORK/repo" "$WORK/pblog" "$WORK/pblock"
chown postgres: "$WORK/repo" "$WORK/pblog" "$WORK/pblock"
pb_conf() { # process-max, pg1-path
    cat >"$CONF" <<EOF
[global]
repo1-path=$WORK/repo
log-path=$WORK/pblog
lock-path=$WORK/pblock
compress-type=zst
process-max=$1
start-fast=y
repo1-retention-full=9
[$STANZA]
pg1-path=$2
pg1-port=$PG_PORT
pg1-socket-path=$WORK
pg1-user=postgres
EOF
    chown postgres: "$CONF"
}
pb() { as_pg pgbackrest --config="$CONF" --stanza=$STANZA "$@"; }
pb_conf 1 "$WORK/data"
cat >>"$WORK/data/postgresql.conf" <<EOF
archive_mode = on
archive_command = 'pgbackrest --config=$CONF --stanza=$STANZA archive-push %p'
max_wal_size = 4GB
EOF
echo "local replication postgres peer map=tidepool" >>"$WORK/data/pg_hba.conf"
as_pg "$PGBIN/pg_ctl" -D "$WORK/data" -l "$WORK/postgres.log" -w -t 60 restart >/dev/null

case "$DATA" in
pgbench)
    # pgbench: scale 1 is about 15 MB with its indexes.
    SCALE=$(( (SIZE_MB + 14) / 15 ))
    DATA_TEXT="pgbench -i -s $SCALE"
    log "pgbench -i -s $SCALE (~$SIZE_MB MB)"
    as_pg "$PGBIN/pgbench" -i -q -s "$SCALE" -h "$WORK" -p "$PG_PORT" -U postgres postgres >"$WORK/pgbench.log" 2>&1 ||
        die "pgbench -i failed: $(tail -3 "$WORK/pgbench.log")"
    ;;
random)
    # 1000 random bytes a row (pgcrypto), ~1070 bytes on disk: incompressible.
    ROWS_N=$(( SIZE_MB * 980 ))
    DATA_TEXT="$ROWS_N rows of gen_random_bytes(1000)"
    log "$DATA_TEXT (~$SIZE_MB MB)"
    pg_sql "CREATE EXTENSION IF NOT EXISTS pgcrypto"
    pg_sql "CREATE TABLE noise AS SELECT g, gen_random_bytes(1000) AS b FROM generate_series(1, $ROWS_N) g"
    ;;
*) die "DATA must be pgbench or random" ;;
esac
pg_sql "CHECKPOINT"
DB_BYTES=$(pg_sql "SELECT sum(pg_database_size(datname)) FROM pg_database")
DB_MB=$(awk -v b="$DB_BYTES" 'BEGIN{printf "%.0f", b/1048576}')
log "databases: $DB_MB MB"
pb stanza-create >/dev/null

now() { date +%s.%N; }
rate() { awk -v mb="$DB_MB" -v s="$1" 'BEGIN{printf "%.1f", mb/s}'; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.1f", b-a}'; }
ROWS=""
for pmax in 1 2; do
    pb_conf "$pmax" "$WORK/data"
    log "pgbackrest backup --type=full, process-max $pmax"
    t0=$(now)
    pb backup --type=full >"$WORK/backup-$pmax.log" 2>&1 || die "backup failed: $(tail -3 "$WORK/backup-$pmax.log")"
    t1=$(now)
    stored=$(pb info --output=json | jq '.[0].backup[-1].info.repository.delta')
    stored_mb=$(awk -v b="$stored" 'BEGIN{printf "%.0f", b/1048576}')
    target="$WORK/restore-$pmax"
    mkdir -p "$target" && chown postgres: "$target" && chmod 700 "$target"
    pb_conf "$pmax" "$target"
    log "pgbackrest restore, process-max $pmax"
    t2=$(now)
    pb restore >"$WORK/restore-$pmax.log" 2>&1 || die "restore failed: $(tail -3 "$WORK/restore-$pmax.log")"
    t3=$(now)
    rm -rf "$target"
    ROWS+="| pgBackRest, zst, process-max $pmax | $(secs "$t0" "$t1") | $(rate "$(secs "$t0" "$t1")") | $stored_mb | $(secs "$t2" "$t3") | $(rate "$(secs "$t2" "$t3")") |"$'\n'
done

log "pg_basebackup -X stream (plain)"
mkdir -p "$WORK/basebackup" && chown postgres: "$WORK/basebackup" && chmod 700 "$WORK/basebackup"
t0=$(now)
as_pg "$PGBIN/pg_basebackup" -D "$WORK/basebackup" -h "$WORK" -p "$PG_PORT" -U postgres -X stream -c fast >"$WORK/basebackup.log" 2>&1 ||
    die "pg_basebackup failed: $(tail -3 "$WORK/basebackup.log")"
t1=$(now)
bb_mb=$(du -sm "$WORK/basebackup" | cut -f1)
rm -rf "$WORK/basebackup"
ROWS+="| pg_basebackup -X stream, plain | $(secs "$t0" "$t1") | $(rate "$(secs "$t0" "$t1")") | $bb_mb | - | - |"$'\n'

{
    echo
    echo "## Backup and restore throughput, $DB_MB MB of $DATA data — $(date -u '+%Y-%m-%d %H:%M') UTC"
    echo
    echo "| tool | backup s | backup MB/s | stored MB | restore s | restore MB/s |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: |"
    printf '%s' "$ROWS"
    echo
    echo "- database: $DATA_TEXT, $DB_MB MB over every database (pg_database_size); MB/s = that size / wall time"
    echo "- pgBackRest $(pgbackrest version | awk '{print $2}'): \`backup --type=full\` with start-fast, from the primary, repository on the same disk; \`restore\` into an empty directory"
    echo "- pg_basebackup: plain format into a directory, WAL streamed, fast checkpoint: its copy needs no restore"
    echo "- Postgres: fsync off (lib.sh), archive_mode on with pgBackRest archive-push; everything under nice $NICE; run by \`SIZE_MB=$SIZE_MB DATA=$DATA perf/backup.sh\`"
    machine_facts
} | tee -a "$RESULTS"
