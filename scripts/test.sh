#!/usr/bin/env bash
# Builds everything and runs every test of the workspace against real PostgreSQL 15,
# pgBackRest, etcd, psql and drivers (no mocks). Run as root (or as a sudoer for setup):
# the tests run Postgres as the postgres OS user.
#
#   scripts/test.sh [extra cargo test args...]     e.g. scripts/test.sh -p tidepool
#
# Exit code: cargo's (0 only if everything built and passed). TIDEPOOL_TEST_TIMEOUT (default
# 45m) bounds the test phase so a hung test fails the run instead of stalling CI.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh
if ! command -v cargo >/dev/null 2>&1; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi

start=$SECONDS
echo "test.sh: cargo build --workspace --bins" >&2
cargo build --workspace --bins

# The binaries just built are the ones the tests start (testkit and `tidepool up` find them in
# target/debug); say so explicitly so no test rebuilds them.
export TIDEPOOL_BIN_DIR="${TIDEPOOL_BIN_DIR:-$PWD/target/debug}"

echo "test.sh: cargo test --workspace --no-fail-fast $*" >&2
status=0
timeout --kill-after=60 "${TIDEPOOL_TEST_TIMEOUT:-45m}" \
    cargo test --workspace --no-fail-fast "$@" || status=$?
if [[ $status -eq 124 || $status -eq 137 ]]; then
    echo "test.sh: tests did not finish within ${TIDEPOOL_TEST_TIMEOUT:-45m}" >&2
fi
echo "test.sh: finished in $((SECONDS - start))s, exit $status" >&2
exit "$status"
