#!/usr/bin/env bash
# Fuzzes what reads untrusted input: request JSON and its validation and encoding
# (request_json), the SSE parser (sse), the Anthropic translation both ways (anthropic) and
# the scheduler's config loading (scheduler_config), each for a fixed time with libFuzzer
# through cargo-fuzz. A crash is copied into fuzz/regressions/TARGET/, where
# `cargo test -p flotilla-fuzz` (part of the README's test command) replays it from then on,
# and the script fails.
#
#   scripts/fuzz.sh                     # every target, FUZZ_SECONDS each
#   scripts/fuzz.sh sse anthropic       # some of them
#
# Knobs (environment):
#   FUZZ_SECONDS=60          time per target
#   FUZZ_SANITIZER=none      none | address (the code is safe Rust: panics are what is
#                            hunted; address adds the check on the unsafe code of dependencies)
#   FUZZ_NO_INSTALL=1        fail instead of installing cargo-fuzz or the nightly toolchain
# Needs a nightly toolchain (cargo-fuzz passes -Z flags); the corpus grows in fuzz/corpus/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

SECONDS_EACH=${FUZZ_SECONDS:-60}
SANITIZER=${FUZZ_SANITIZER:-none}
TARGETS=("$@")
[[ ${#TARGETS[@]} -gt 0 ]] || TARGETS=(request_json sse anthropic scheduler_config)

die() {
    echo "fuzz: FAILED: $*" >&2
    exit 1
}

if ! cargo +nightly --version >/dev/null 2>&1; then
    [[ "${FUZZ_NO_INSTALL:-}" == 1 ]] && die "no nightly toolchain (rustup toolchain install nightly)"
    echo "fuzz: installing the nightly toolchain" >&2
    rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    [[ "${FUZZ_NO_INSTALL:-}" == 1 ]] && die "cargo-fuzz is not installed (cargo install cargo-fuzz)"
    echo "fuzz: installing cargo-fuzz from crates.io" >&2
    cargo install cargo-fuzz --locked --quiet
fi

echo "fuzz: building ${TARGETS[*]} (sanitizer: $SANITIZER)" >&2
for t in "${TARGETS[@]}"; do
    cargo +nightly fuzz build -s "$SANITIZER" "$t" >/dev/null 2>build.err || {
        cat build.err >&2
        die "building $t"
    }
done
rm -f build.err

printf '| target | seconds | executions | exec/s | coverage (edges) | corpus | crashes |\n|---|---|---|---|---|---|---|\n'
FAILED=()
for t in "${TARGETS[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    log=$(mktemp)
    rc=0
    cargo +nightly fuzz run -s "$SANITIZER" "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$SECONDS_EACH" -rss_limit_mb=4096 -print_final_stats=1 >"$log" 2>&1 || rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 | awk '{print $2}')
    corpus=$(find "corpus/$t" -type f | wc -l)
    crashes=0
    if [[ $rc -ne 0 ]]; then
        crash=$(ls -t "artifacts/$t"/* 2>/dev/null | head -n 1 || true)
        if [[ -n "$crash" ]]; then
            mkdir -p "regressions/$t"
            cp "$crash" "regressions/$t/"
            crashes=1
            echo "fuzz: $t crashed; input saved as fuzz/regressions/$t/$(basename "$crash")" >&2
            grep -m 5 -E "panicked|ERROR" "$log" >&2 || true
        else
            tail -n 20 "$log" >&2
        fi
        FAILED+=("$t")
    fi
    rate=$(( ${execs:-0} / SECONDS_EACH ))
    printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$t" "$SECONDS_EACH" "${execs:-?}" "$rate" "${cov:-?}" "$corpus" "$crashes"
    rm -f "$log"
done
[[ ${#FAILED[@]} -eq 0 ]] || die "${FAILED[*]} (replay: cargo test -p flotilla-fuzz)"
echo "fuzz: ok" >&2
