#!/usr/bin/env bash
# What the scheduler adds to a request: the same chat completion sent straight to a fast
# local mock upstream and through `flotilla_gateway::Scheduler` in front of it, in
# interleaved rounds, reporting medians (see shared/ANCHORS.md, "How to benchmark fairly").
#
#   scripts/bench-gateway.sh
#
# Non-streaming: wrk at each concurrency, direct and via alternating for BENCH_ROUNDS rounds;
# the table shows the per-metric median over rounds. Each round also measures two bare
# forwarders in front of the same mock (testkit's `forwarder` example: hyper server + hyper
# client, and axum + reqwest), so the scheduler's throughput reads as a fraction of what a
# forwarder doing nothing else reaches on the same cores in the same run. Streaming: the stream_probe example,
# sequential streams alternating direct/via, time to first chunk and inter-chunk gap.
# Ends with the CPU, the core count and the scheduler's peak RSS (VmHWM).
#
# Knobs (environment):
#   BENCH_DURATION=10s      wrk duration per measurement
#   BENCH_ROUNDS=3          rounds per concurrency (each round: one direct, one via run);
#                           odd is best: an even count averages the middle two
#   BENCH_CONCURRENCY="1 16 64"
#   BENCH_WARMUP=2s         discarded wrk run against each side before measuring
#   BENCH_STREAMS=200       streams per side for the streaming probe
#   BENCH_CHUNKS=32         content chunks per streamed answer
#   BENCH_EVENT_PAUSE_MS=0  mock's pause before each SSE event; with 0 events coalesce into
#                           few reads, so the gap shows batching; with 1+ each event is its
#                           own read and the added gap is the relay's per-chunk cost
#   BENCH_SKIP_BUILD=1      use the binaries already in $CARGO_TARGET_DIR/release
#   BENCH_NO_INSTALL=1      exit instead of installing wrk when it is missing
#   BENCH_KEEP=1            keep the work directory (logs, wrk outputs) after success
#   FLOTILLA_LOG=info       the scheduler's log filter, as `flotilla scheduler` reads it
#   BENCH_SCHED_WORKERS=N   the scheduler's tokio worker threads (default: one per core)
#   CARGO_TARGET_DIR=target/bench   release build kept apart from the dev build
set -euo pipefail

DURATION=${BENCH_DURATION:-10s}
ROUNDS=${BENCH_ROUNDS:-3}
CONCURRENCY=${BENCH_CONCURRENCY:-"1 16 64"}
WARMUP=${BENCH_WARMUP:-2s}
STREAMS=${BENCH_STREAMS:-200}
CHUNKS=${BENCH_CHUNKS:-32}
EVENT_PAUSE_MS=${BENCH_EVENT_PAUSE_MS:-0}
export FLOTILLA_LOG=${FLOTILLA_LOG:-info}

cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/bench}
BIN="$CARGO_TARGET_DIR/release"

die() {
    echo "bench-gateway: $*" >&2
    exit 1
}
# shellcheck source=scripts/lib.sh
source scripts/lib.sh # (the working directory is the repository root)

[[ "$ROUNDS" =~ ^[0-9]+$ && "$ROUNDS" -ge 2 ]] || die "BENCH_ROUNDS must be at least 2 (got $ROUNDS)"
for conc in $CONCURRENCY; do
    [[ "$conc" =~ ^[1-9][0-9]*$ ]] || die "BENCH_CONCURRENCY must list positive integers (got '$CONCURRENCY')"
done

# --- load generator ---------------------------------------------------------------------
if ! command -v wrk >/dev/null; then
    echo "bench-gateway: wrk is not installed; it is the load generator this script drives."
    [[ "${BENCH_NO_INSTALL:-}" == 1 ]] && die "install it (Debian: apt-get install -y wrk) and rerun"
    SUDO=()
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null || die "not root and no sudo: install wrk (apt-get install -y wrk) and rerun"
        SUDO=(sudo)
    fi
    echo "bench-gateway: installing it now: ${SUDO[*]} apt-get install -y wrk"
    if ! "${SUDO[@]}" apt-get install -y wrk; then
        echo "bench-gateway: retrying after ${SUDO[*]} apt-get update"
        "${SUDO[@]}" apt-get update
        "${SUDO[@]}" apt-get install -y wrk
    fi
    command -v wrk >/dev/null || die "wrk still not found after installing it"
fi

# --- build --------------------------------------------------------------------------------
if [[ "${BENCH_SKIP_BUILD:-}" != 1 ]]; then
    echo "building release binaries into $CARGO_TARGET_DIR ..." >&2
    cargo build --release --quiet \
        -p flotilla-testkit --bin flotilla-mock-upstream --example stream_probe --example forwarder \
        -p flotilla-gateway --example scheduler
fi
MOCK_BIN="$BIN/flotilla-mock-upstream"
SCHED_BIN="$BIN/examples/scheduler"
PROBE_BIN="$BIN/examples/stream_probe"
FWD_BIN="$BIN/examples/forwarder"
for b in "$MOCK_BIN" "$SCHED_BIN" "$PROBE_BIN" "$FWD_BIN"; do
    [[ -x "$b" ]] || die "$b is missing: build it or unset BENCH_SKIP_BUILD"
done

# --- servers ------------------------------------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/bench-gateway.XXXXXX")
PIDS=()
OK=0
cleanup() {
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ $OK == 1 && "${BENCH_KEEP:-}" != 1 ]]; then
        rm -rf "$WORK"
    else
        echo "bench-gateway: logs and wrk outputs kept in $WORK" >&2
        if [[ $OK != 1 ]]; then
            for f in "$WORK"/*.err; do
                # Per-request INFO lines would hide the warning or error that matters.
                if [[ -s "$f" ]]; then
                    echo "--- $f (INFO lines left out)" >&2
                    { grep -v ' INFO ' "$f" || true; } | tail -n 20 >&2
                fi
            done
        fi
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$MOCK_BIN" --listen 127.0.0.1:0 --chunks "$CHUNKS" --event-pause-ms "$EVENT_PAUSE_MS" >"$WORK/mock.out" 2>"$WORK/mock.err" &
MOCK_PID=$!
PIDS+=("$MOCK_PID")
MOCK_URL=$(wait_listening "mock upstream" "$MOCK_PID" "$WORK/mock.out")

cat >"$WORK/scheduler.toml" <<EOF
[scheduler]
listen = "127.0.0.1:0"
auth = "none"

# Every request is written to the ledger, priced, as in production.
[scheduler.ledger]
url = "sqlite://$WORK/ledger.db"

[[scheduler.providers]]
name = "mock"
base_url = "$MOCK_URL/v1"
prices = { "bench" = { input_usd_per_mtok = 0.15, output_usd_per_mtok = 0.60 } }

[[scheduler.models]]
name = "bench"
cloud = [{ provider = "mock", model = "bench" }]
EOF
# BENCH_SCHED_WORKERS sets the scheduler's tokio worker threads (TOKIO_WORKER_THREADS) only,
# not the mock's or the probe's; unset = one per core, as `flotilla scheduler` runs.
if [[ -n "${BENCH_SCHED_WORKERS:-}" ]]; then
    TOKIO_WORKER_THREADS="$BENCH_SCHED_WORKERS" "$SCHED_BIN" "$WORK/scheduler.toml" \
        >"$WORK/scheduler.out" 2>"$WORK/scheduler.err" &
else
    "$SCHED_BIN" "$WORK/scheduler.toml" >"$WORK/scheduler.out" 2>"$WORK/scheduler.err" &
fi
SCHED_PID=$!
PIDS+=("$SCHED_PID")
SCHED_URL=$(wait_listening "scheduler" "$SCHED_PID" "$WORK/scheduler.out")

"$FWD_BIN" hyper "$MOCK_URL" >"$WORK/fwd-hyper.out" 2>"$WORK/fwd-hyper.err" &
PIDS+=("$!")
HYPER_URL=$(wait_listening "hyper forwarder" "$!" "$WORK/fwd-hyper.out")
"$FWD_BIN" axum-reqwest "$MOCK_URL" >"$WORK/fwd-axum.out" 2>"$WORK/fwd-axum.err" &
PIDS+=("$!")
AXUM_URL=$(wait_listening "axum+reqwest forwarder" "$!" "$WORK/fwd-axum.out")

BODY='{"model":"bench","messages":[{"role":"user","content":"Say something short."}],"max_tokens":64}'
for url in "$MOCK_URL" "$SCHED_URL"; do
    code=$(curl -sS -o "$WORK/check.json" -w '%{http_code}' -H 'content-type: application/json' \
        -d "$BODY" "$url/v1/chat/completions") || die "POST $url/v1/chat/completions failed"
    [[ "$code" == 200 ]] || die "POST $url/v1/chat/completions answered $code: $(cat "$WORK/check.json")"
    grep -q '"chat.completion"' "$WORK/check.json" || die "$url answered no chat completion: $(cat "$WORK/check.json")"
done

# --- non-streaming: wrk -------------------------------------------------------------------
cat >"$WORK/post.lua" <<EOF
wrk.method = "POST"
wrk.body = '$BODY'
wrk.headers["Content-Type"] = "application/json"

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH rps=%.1f p50_us=%.0f p99_us=%.0f requests=%d status_errors=%d socket_errors=%d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50), latency:percentile(99),
    summary.requests, e.status, e.connect + e.read + e.write + e.timeout))
end
EOF

# run_wrk NAME URL CONC DURATION: prints "rps p50_us p99_us"; fails on any error response.
run_wrk() {
    local name=$1 url=$2 conc=$3 dur=$4 threads out line
    threads=$((conc < 2 ? conc : 2))
    out="$WORK/wrk-$name.txt"
    wrk -t "$threads" -c "$conc" -d "$dur" --latency -s "$WORK/post.lua" \
        "$url/v1/chat/completions" >"$out" 2>&1 || die "wrk failed: $(cat "$out")"
    line=$(grep '^BENCH ' "$out") || die "wrk printed no summary: $(cat "$out")"
    if grep -q 'Non-2xx' "$out" || [[ ! "$line" =~ status_errors=0\ socket_errors=0 ]]; then
        die "$name: errors under load: $line (full output: $out)"
    fi
    awk '{ for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] } }
         END { print v["rps"], v["p50_us"], v["p99_us"] }' <<<"$line"
}

# Anything else running on these cores shows up in both sides' figures, unevenly.
LOAD_BEFORE=$(cut -d' ' -f1 /proc/loadavg)
if awk -v l="$LOAD_BEFORE" 'BEGIN { exit !(l > 0.5) }'; then
    echo "bench-gateway: warning: load average is $LOAD_BEFORE before starting; figures will be noisy" >&2
fi
echo "warming up both sides ($WARMUP each) ..." >&2
run_wrk warmup-direct "$MOCK_URL" 16 "$WARMUP" >/dev/null
run_wrk warmup-via "$SCHED_URL" 16 "$WARMUP" >/dev/null

RESULTS="$WORK/results.txt" # conc side round rps p50_us p99_us
: >"$RESULTS"
for conc in $CONCURRENCY; do
    for round in $(seq "$ROUNDS"); do
        # Alternate which side goes first, so neither always follows the other's load.
        if ((round % 2)); then order="direct hyper via axum"; else order="axum via hyper direct"; fi
        for side in $order; do
            case $side in
                direct) url=$MOCK_URL ;;
                via) url=$SCHED_URL ;;
                hyper) url=$HYPER_URL ;;
                axum) url=$AXUM_URL ;;
            esac
            res=$(run_wrk "c$conc-r$round-$side" "$url" "$conc" "$DURATION")
            read -r rps p50 p99 <<<"$res"
            echo "c=$conc round $round/$ROUNDS $side: $rps req/s, p50 $p50 µs, p99 $p99 µs" >&2
            echo "$conc $side $round $rps $p50 $p99" >>"$RESULTS"
        done
    done
done

# median CONC SIDE FIELD (4 rps, 5 p50, 6 p99): the median over rounds.
# ratio CONC SIDE: the median over rounds of via rps / SIDE rps within the same round.
ratio() {
    awk -v c="$1" -v s="$2" '$1 == c && $2 == "via" { v[$3] = $4 } $1 == c && $2 == s { b[$3] = $4 }
        END { for (r in v) if (b[r] > 0) print v[r] / b[r] }' "$RESULTS" | sort -g |
        awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
median() {
    awk -v c="$1" -v s="$2" -v f="$3" '$1 == c && $2 == s { print $f }' "$RESULTS" | sort -g |
        awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

FORWARDER_TABLE=$(
    echo "| concurrency | hyper forwarder req/s | axum + reqwest forwarder req/s | scheduler req/s | scheduler / hyper | scheduler / axum + reqwest |"
    echo "|---:|---:|---:|---:|---:|---:|"
    for conc in $CONCURRENCY; do
        awk -v c="$conc" -v h="$(median "$conc" hyper 4)" -v a="$(median "$conc" axum 4)" -v v="$(median "$conc" via 4)" \
            -v rh="$(ratio "$conc" hyper)" -v ra="$(ratio "$conc" axum)" \
            'BEGIN { printf "| %d | %.0f | %.0f | %.0f | %.2f | %.2f |\n", c, h, a, v, rh, ra }'
    done
)

# What each front adds to direct's latency, in the same rounds: the scheduler beside what a
# forwarder doing nothing else adds (the floor any proxy on these cores pays for its hop).
ADDED_TABLE=$(
    echo "| concurrency | hyper forwarder added p50 / p99 (µs) | axum + reqwest forwarder added p50 / p99 (µs) | scheduler added p50 / p99 (µs) |"
    echo "|---:|---:|---:|---:|"
    for conc in $CONCURRENCY; do
        d50=$(median "$conc" direct 5); d99=$(median "$conc" direct 6)
        awk -v c="$conc" -v d50="$d50" -v d99="$d99" \
            -v h50="$(median "$conc" hyper 5)" -v h99="$(median "$conc" hyper 6)" \
            -v a50="$(median "$conc" axum 5)" -v a99="$(median "$conc" axum 6)" \
            -v v50="$(median "$conc" via 5)" -v v99="$(median "$conc" via 6)" \
            'BEGIN { printf "| %d | %+.0f / %+.0f | %+.0f / %+.0f | %+.0f / %+.0f |\n", c, h50 - d50, h99 - d99, a50 - d50, a99 - d99, v50 - d50, v99 - d99 }'
    done
)

NONSTREAM_TABLE=$(
    echo "| concurrency | direct req/s | via req/s | direct p50 / p99 (µs) | via p50 / p99 (µs) | added p50 / p99 (µs) |"
    echo "|---:|---:|---:|---:|---:|---:|"
    for conc in $CONCURRENCY; do
        d_rps=$(median "$conc" direct 4); v_rps=$(median "$conc" via 4)
        d50=$(median "$conc" direct 5); d99=$(median "$conc" direct 6)
        v50=$(median "$conc" via 5); v99=$(median "$conc" via 6)
        awk -v c="$conc" -v dr="$d_rps" -v vr="$v_rps" -v d50="$d50" -v d99="$d99" -v v50="$v50" -v v99="$v99" \
            'BEGIN { printf "| %d | %.0f | %.0f | %.0f / %.0f | %.0f / %.0f | %+.0f / %+.0f |\n", c, dr, vr, d50, d99, v50, v99, v50 - d50, v99 - d99 }'
    done
)

# --- streaming: stream_probe --------------------------------------------------------------
echo "streaming: $STREAMS streams per side ..." >&2
STREAM_TABLE=$("$PROBE_BIN" --direct "$MOCK_URL" --via "$SCHED_URL" --streams "$STREAMS" --model bench) ||
    die "stream_probe failed"

SCHED_HWM=$(awk '/^VmHWM/ { print $2, $3 }' "/proc/$SCHED_PID/status")
MOCK_HWM=$(awk '/^VmHWM/ { print $2, $3 }' "/proc/$MOCK_PID/status")
kill -0 "$SCHED_PID" 2>/dev/null || die "the scheduler died during the run"

# Every request routed must be in the ledger: give the writer a flush interval, then read its
# counters from /metrics.
sleep 1
LEDGER=$(curl -sf "$SCHED_URL/metrics" | awk '/^flotilla_scheduler_ledger_rows_total/ { sub(/.*result="/, ""); sub(/"}/, ""); printf "%s%s", sep, $0; sep=", " }')
[[ -n "$LEDGER" ]] || die "no ledger counters on /metrics"

CPU=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)
REV=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD 2>/dev/null || REV="$REV (with uncommitted changes)"

cat <<EOF

## Gateway overhead: scheduler vs direct mock upstream

- command: \`scripts/bench-gateway.sh\` (BENCH_DURATION=$DURATION BENCH_ROUNDS=$ROUNDS BENCH_CONCURRENCY="$CONCURRENCY" BENCH_STREAMS=$STREAMS BENCH_CHUNKS=$CHUNKS BENCH_EVENT_PAUSE_MS=$EVENT_PAUSE_MS FLOTILLA_LOG=$FLOTILLA_LOG BENCH_SCHED_WORKERS=${BENCH_SCHED_WORKERS:-})
- commit: $REV; $(wrk -v 2>&1 | head -n 1 || true)
- CPU: $CPU, $(nproc) cores (wrk, mock and scheduler share them); 1-min load average before the run $LOAD_BEFORE
- non-streaming: POST /v1/chat/completions, wrk -t min(c,2) -c c -d $DURATION, $ROUNDS interleaved rounds, median per column

$NONSTREAM_TABLE

- the same rounds, two bare forwarders in front of the same mock (no routing, health, metrics, ledger or logs); ratios are per round, then the median

$FORWARDER_TABLE

- latency each front adds over direct (medians over rounds)

$ADDED_TABLE

- streaming: stream_probe, sequential chat streams alternating direct/via; a chunk is one \`data:\` event

$STREAM_TABLE

- peak RSS (VmHWM): scheduler $SCHED_HWM, mock upstream $MOCK_HWM
- ledger (SQLite, every request priced and written): rows $LEDGER
EOF
OK=1
