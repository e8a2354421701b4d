#!/usr/bin/env bash
# Installs what Tidepool needs to build, run and test, on Debian 12 (bookworm).
#
#   scripts/setup.sh            as root, or as a user with sudo
#
# Idempotent and quick when everything is there: it asks dpkg what is installed and only
# runs `apt-get update` (once) and `apt-get install` for what is missing, so CI can call it
# on every run. Needs no stdin (CI=true, no terminal).
#
# What it does not do, on purpose:
# - It leaves a Debian default Postgres cluster (15/main on port 5432) and the pgbouncer/etcd
#   services alone: Tidepool's ports differ (Postgres 5433, gateway 15432, pooler 15433 by
#   default; tests take free ports). It only warns if something already holds a default port.
# - No sysctl changes: the tests need none. Benchmark tuning (e.g. a wider
#   net.ipv4.ip_local_port_range for many client connections) belongs to perf/, per run.
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- privileges -----------------------------------------------------------------------------
if [[ $(id -u) -eq 0 ]]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo -n)
    "${SUDO[@]}" true 2>/dev/null || SUDO=(sudo)
else
    die "run as root or install sudo"
fi

if [[ -r /etc/os-release ]]; then
    # shellcheck disable=SC1091
    . /etc/os-release
    if [[ ${ID:-} != debian || ${VERSION_ID:-} != 12 ]]; then
        log "warning: written for Debian 12; this is ${PRETTY_NAME:-unknown}. Trying anyway."
    fi
fi

# --- Debian packages ------------------------------------------------------------------------
PACKAGES=(
    # Rust builds: C toolchain for pg_query (libpg_query) and io-uring, libclang for bindgen.
    build-essential pkg-config clang libclang-dev
    git ca-certificates curl
    # PostgreSQL 15 server, client, contrib; the pooler to compare against; backups; topology.
    postgresql-15 postgresql-client-15 postgresql-contrib
    pgbouncer pgbackrest etcd-server etcd-client
    # The etcd-client crate compiles etcd's .proto files when it builds.
    protobuf-compiler
    # runuser, setsid, prlimit (util-linux), ps/sysctl (procps), coreutils' timeout.
    util-linux procps coreutils
    # HA tests cut the control process off a node's agent with a firewall rule on its port.
    iptables
    # Driver tests (gateway/tests/drivers.rs): pgjdbc.
    libpostgresql-jdbc-java
)

APT_UPDATED=0
apt_install() {
    local missing=() p
    for p in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
            missing+=("$p")
        fi
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        return 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    local opts=(-y -q -o DPkg::Lock::Timeout=600 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    if [[ $APT_UPDATED -eq 0 ]]; then
        log "apt-get update"
        "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get "${opts[@]}" update >/dev/null
        APT_UPDATED=1
    fi
    log "installing: ${missing[*]}"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get "${opts[@]}" install --no-install-recommends "${missing[@]}" >/dev/null
}

command -v dpkg-query >/dev/null 2>&1 || die "dpkg-query not found: this script is for Debian"
# A JDK to compile the JDBC check, and node for node-postgres, unless the machine has them.
command -v javac >/dev/null 2>&1 || PACKAGES+=(default-jdk-headless)
command -v node >/dev/null 2>&1 || PACKAGES+=(nodejs npm)
apt_install "${PACKAGES[@]}"

PG_BIN=/usr/lib/postgresql/15/bin
for prog in initdb pg_ctl postgres psql; do
    [[ -x $PG_BIN/$prog ]] || die "$PG_BIN/$prog missing after installing postgresql-15"
done
id postgres >/dev/null 2>&1 || die "the postgres OS user is missing (postgresql-common creates it)"

# --- Rust -----------------------------------------------------------------------------------
# Only when cargo is missing: rustup into ~/.cargo (a machine with cargo keeps its own).
if ! command -v cargo >/dev/null 2>&1 && [[ -x $HOME/.cargo/bin/cargo ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
    log "cargo not found: installing the stable Rust toolchain with rustup"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --component clippy,rustfmt
    export PATH="$HOME/.cargo/bin:$PATH"
fi
RUST_NEED=1.80
rust_have=$(rustc --version | awk '{print $2}')
if [[ $(printf '%s\n%s\n' "$RUST_NEED" "$rust_have" | sort -V | head -n1) != "$RUST_NEED" ]]; then
    if command -v rustup >/dev/null 2>&1; then
        log "rustc $rust_have is older than $RUST_NEED: rustup update stable"
        rustup update stable
    else
        die "rustc $rust_have is older than $RUST_NEED (the workspace's rust-version)"
    fi
fi

# --- Python driver for the tests ------------------------------------------------------------
# psycopg 3 for whatever `python3` is first on PATH (a pyenv one here). Debian's own python3
# is "externally managed" (PEP 668): there the Debian package is the way.
if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import psycopg' >/dev/null 2>&1; then
    if python3 - <<'PY' >/dev/null 2>&1
import os, sys, sysconfig
sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)
PY
    then
        apt_install python3-psycopg
    else
        python3 -m pip --version >/dev/null 2>&1 || python3 -m ensurepip --upgrade >/dev/null
        log "pip install 'psycopg[binary]' for $(command -v python3)"
        python3 -m pip install --quiet 'psycopg[binary]'
    fi
    python3 -c 'import psycopg' || die "psycopg still not importable by $(command -v python3)"
fi
# asyncpg, likewise (gateway/tests/drivers.rs).
if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import asyncpg' >/dev/null 2>&1; then
    if python3 -c 'import os, sys, sysconfig; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)' >/dev/null 2>&1; then
        apt_install python3-asyncpg
    else
        log "pip install asyncpg for $(command -v python3)"
        python3 -m pip install --quiet asyncpg
    fi
    python3 -c 'import asyncpg' || die "asyncpg still not importable by $(command -v python3)"
fi

# --- ports ----------------------------------------------------------------------------------
# Warn only: a Debian default cluster on 5432 is fine, but `tidepool up`'s defaults must be free.
for port in 5433 15432 15433; do
    if timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$port" 2>/dev/null; then
        log "warning: something listens on 127.0.0.1:$port; a 'tidepool up' of another state directory?" \
            "If not, give 'tidepool up' other ports (--pg-port/--port/--pooler-port)"
    fi
done

log "ok: $(rustc --version), PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}'), $(pgbouncer --version 2>/dev/null | head -n1), $(pgbackrest version 2>/dev/null), etcd $(etcd --version 2>/dev/null | awk 'NR==1{print $3}')"
