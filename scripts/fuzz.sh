#!/usr/bin/env bash
# Long fuzzing runs of the decoders a peer's bytes reach (issue 12): cargo-fuzz (libFuzzer) on
# the targets in fuzz/ — frontend (message framing and decoders), startup (the startup packet),
# scram (both sides of SCRAM-SHA-256), md5, link (frame header, OPEN, settings), agent (node
# agent requests, handshake, sealed lines).
#
#   scripts/fuzz.sh                 every target for FUZZ_SECONDS (default 60) each
#   scripts/fuzz.sh scram link      those targets only
#   FUZZ_SECONDS=3600 FUZZ_JOBS=2 scripts/fuzz.sh agent
#   FUZZ_DEV=1 scripts/fuzz.sh      dev profile (cargo fuzz --dev): no optimized build, slower runs
#
# Needs a nightly toolchain (`rustup toolchain install nightly`) and cargo-fuzz
# (`cargo install cargo-fuzz --locked`); the script installs cargo-fuzz when it is missing and
# says so when nightly is. Both were installable on the project's machine (Debian 12, clang and
# g++ present for libFuzzer's C++).
#
# Corpus: fuzz/corpus/TARGET/ (committed seeds: real messages of each kind; libFuzzer adds what
# it finds there — commit the interesting ones). A crash leaves its input in
# fuzz/artifacts/TARGET/ and fails the run: reproduce with
# `cargo +nightly fuzz run TARGET fuzz/artifacts/TARGET/crash-…`, then turn it into a
# regression test in shared/tests/decoders_proptest.rs (or beside the decoder) and fix it.
#
# CI does not run this (it needs nightly and minutes of CPU): the same properties run bounded
# in every CI run as property tests (shared/tests/decoders_proptest.rs, PROPTEST_CASES=N for
# more there). Never on a machine that is running benchmarks: it takes whole cores.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v cargo >/dev/null 2>&1; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz.sh: a nightly toolchain is needed: rustup toolchain install nightly" >&2
    exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

seconds=${FUZZ_SECONDS:-60}
profile=()
if [ -n "${FUZZ_DEV:-}" ]; then
    profile=(--dev)
fi
jobs=${FUZZ_JOBS:-1}
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cd fuzz && cargo +nightly fuzz list)
fi

failed=()
for t in "${targets[@]}"; do
    echo "fuzz.sh: $t for ${seconds}s (${jobs} job(s))" >&2
    mkdir -p "fuzz/corpus/$t"
    if ! (cd fuzz && cargo +nightly fuzz run "${profile[@]}" "$t" "corpus/$t" -- \
        -max_total_time="$seconds" -jobs="$jobs" -workers="$jobs" -max_len=4096 -print_final_stats=1); then
        failed+=("$t")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz.sh: crashes in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz.sh: no crash in ${targets[*]}" >&2
