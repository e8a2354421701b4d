#!/usr/bin/env bash
# Brings up a local Tidepool cluster and prints its postgres:// URL as the last line.
#
#   scripts/up.sh [tidepool up flags...]     e.g. scripts/up.sh --port 25432 --dir /srv/tp
#
# Installs what is missing (scripts/setup.sh), builds the three binaries in release mode,
# then runs `tidepool up` (state in ./.tidepool of the repository by default). Run it again
# at any time: what runs is kept, the URL is printed again. Stop with
# `target/release/tidepool down`.
#
# TIDEPOOL_PROFILE=dev builds and runs the debug binaries instead (faster to build).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh
if ! command -v cargo >/dev/null 2>&1; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi

profile=${TIDEPOOL_PROFILE:-release}
case $profile in
    release) out=target/release ;;
    dev | debug) profile=dev out=target/debug ;;
    *) out=target/$profile ;;
esac
cargo build --profile "$profile" -p tidepool -p tidepool-gateway -p tidepool-pooler >&2
exec "$out/tidepool" up "$@"
