#!/usr/bin/env bash
# Soak: the scheduler (ledger on, every request priced and written) in front of a fast mock
# upstream, driven open-loop at a fixed rate for a fixed time by testkit's `soak_load`
# example. Passes when no request failed, the scheduler's RSS shows no growth trend over the
# second half of the run, and its open file descriptors return to where they were before
# the load. Prints the figures BENCHMARKS.md records.
#
#   scripts/soak.sh
#
# Knobs (environment):
#   SOAK_RATE=5000          requests per second
#   SOAK_DURATION=60        seconds of load
#   SOAK_STREAM=0           1: streamed answers (8 chunks each)
#   SOAK_MAX_GROWTH_MIB=8   most RSS growth allowed between the second quarter's median and
#                           the last quarter's median, MiB
#   SOAK_FD_WAIT=200        seconds descriptors get to return to the baseline after the load
#                           (the upstream pool reaps idle connections every 90 s, so a
#                           connection last used at the end may live up to 180 s)
#   SOAK_SKIP_BUILD=1       use the binaries already in $CARGO_TARGET_DIR/release
#   SOAK_KEEP=1             keep the work directory (logs, samples) after success
#   CARGO_TARGET_DIR=target/bench   release build kept apart from the dev build
set -euo pipefail

RATE=${SOAK_RATE:-5000}
DURATION=${SOAK_DURATION:-60}
STREAM=${SOAK_STREAM:-0}
MAX_GROWTH_MIB=${SOAK_MAX_GROWTH_MIB:-8}
export FLOTILLA_LOG=${FLOTILLA_LOG:-warn}

cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/bench}
BIN="$CARGO_TARGET_DIR/release"

die() {
    echo "soak: FAILED: $*" >&2
    exit 1
}
# shellcheck source=scripts/lib.sh
source scripts/lib.sh # (the working directory is the repository root)

if [[ "${SOAK_SKIP_BUILD:-}" != 1 ]]; then
    echo "soak: building release binaries into $CARGO_TARGET_DIR ..." >&2
    cargo build --release --quiet \
        -p flotilla-testkit --bin flotilla-mock-upstream --example soak_load \
        -p flotilla-gateway --example scheduler
fi
MOCK_BIN="$BIN/flotilla-mock-upstream"
SCHED_BIN="$BIN/examples/scheduler"
LOAD_BIN="$BIN/examples/soak_load"
for b in "$MOCK_BIN" "$SCHED_BIN" "$LOAD_BIN"; do
    [[ -x "$b" ]] || die "$b is missing: build it or unset SOAK_SKIP_BUILD"
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/soak.XXXXXX")
PIDS=()
OK=0
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [[ $OK == 1 && "${SOAK_KEEP:-}" != 1 ]]; then
        rm -rf "$WORK"
    else
        echo "soak: logs and samples kept in $WORK" >&2
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$MOCK_BIN" --listen 127.0.0.1:0 --chunks 8 >"$WORK/mock.out" 2>"$WORK/mock.err" &
PIDS+=("$!")
MOCK_URL=$(wait_listening "mock upstream" "$!" "$WORK/mock.out")

cat >"$WORK/scheduler.toml" <<EOF
[scheduler]
listen = "127.0.0.1:0"
auth = "none"

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
"$SCHED_BIN" "$WORK/scheduler.toml" >"$WORK/scheduler.out" 2>"$WORK/scheduler.err" &
SCHED_PID=$!
PIDS+=("$SCHED_PID")
SCHED_URL=$(wait_listening "scheduler" "$SCHED_PID" "$WORK/scheduler.out")

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$SCHED_PID/status"; }
fds() { ls "/proc/$SCHED_PID/fd" | wc -l; }

# A short warm-up (connection pools, allocator arenas, the ledger's first pages), then
# the baseline the load is measured against.
"$LOAD_BIN" --url "$SCHED_URL" --rate "$RATE" --duration 3 --stream "$STREAM" >"$WORK/warmup.out" \
    || die "the warm-up failed: $(tail -n 3 "$WORK/warmup.out")"
sleep 2
FDS_BEFORE=$(fds)
RSS_BEFORE=$(rss_kib)

: >"$WORK/samples.tsv"
(
    t=0
    while kill -0 "$SCHED_PID" 2>/dev/null; do
        printf '%s\t%s\t%s\n' "$t" "$(rss_kib)" "$(fds)" >>"$WORK/samples.tsv"
        sleep 1
        t=$((t + 1))
    done
) &
SAMPLER=$!
PIDS+=("$SAMPLER")

echo "soak: $RATE req/s for ${DURATION}s against $SCHED_URL (stream=$STREAM)" >&2
LOAD_OK=1
"$LOAD_BIN" --url "$SCHED_URL" --rate "$RATE" --duration "$DURATION" --stream "$STREAM" \
    >"$WORK/load.out" 2>"$WORK/load.err" || LOAD_OK=0
kill "$SAMPLER" 2>/dev/null || true
# Connections to the upstream opened at peaks sit idle in the pool until its idle timeout
# (90 s, checked every 90 s): descriptors must be back to the baseline by then.
FD_WAIT=0
while (( $(fds) > FDS_BEFORE + 2 && FD_WAIT < ${SOAK_FD_WAIT:-200} )); do
    sleep 1
    FD_WAIT=$((FD_WAIT + 1))
done
FDS_AFTER=$(fds)
RSS_AFTER=$(rss_kib)
SUMMARY=$(sed -n 's/^SUMMARY //p' "$WORK/load.out")
[[ -n "$SUMMARY" ]] || die "the load generator printed no summary: $(tail -n 5 "$WORK/load.err")"

python3 - "$WORK/samples.tsv" "$DURATION" "$MAX_GROWTH_MIB" "$RSS_BEFORE" "$RSS_AFTER" \
    "$FDS_BEFORE" "$FDS_AFTER" "$SUMMARY" "$LOAD_OK" "$FD_WAIT" <<'PY'
import json, statistics, sys
path, duration, max_growth = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
rss_before, rss_after = int(sys.argv[4]), int(sys.argv[5])
fds_before, fds_after = int(sys.argv[6]), int(sys.argv[7])
summary, load_ok = json.loads(sys.argv[8]), sys.argv[9] == "1"
fd_wait = int(sys.argv[10])
rows = [tuple(int(x) for x in l.split()) for l in open(path) if l.strip()]
rows = [r for r in rows if r[0] < duration]
mib = lambda kib: kib / 1024
rss = [mib(r[1]) for r in rows]
n = len(rss)
q2 = statistics.median(rss[n // 4 : n // 2]) if n >= 8 else float("nan")
q4 = statistics.median(rss[3 * n // 4 :]) if n >= 8 else float("nan")
# Least-squares slope over the second half, MiB per minute.
half = rows[n // 2 :]
if len(half) >= 2:
    xs = [r[0] for r in half]
    ys = [mib(r[1]) for r in half]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(1e-9, sum((x - mx) ** 2 for x in xs)) * 60
else:
    slope = float("nan")
lat = summary["latency_ms"]
errors = sum(summary["errors"].values())
print(f"rate {summary['rate']} req/s for {summary['duration_s']} s (stream={summary['stream']}): "
      f"sent {summary['sent']}, ok {summary['ok']}, errors {errors} {summary['errors']}, achieved {summary['achieved_rps']} req/s")
print(f"latency ms: p50 {lat['p50']:.2f}  p90 {lat['p90']:.2f}  p99 {lat['p99']:.2f}  p99.9 {lat['p99.9']:.2f}  max {lat['max']:.2f}")
print(f"RSS MiB: before {mib(rss_before):.1f}, during min {min(rss):.1f} / max {max(rss):.1f}, "
      f"2nd-quarter median {q2:.1f}, last-quarter median {q4:.1f}, second-half slope {slope:+.2f} MiB/min, after {mib(rss_after):.1f}")
print(f"file descriptors: before {fds_before}, during max {max(r[2] for r in rows)}, after {fds_after} "
      f"({fd_wait} s after the load: the upstream pool reaps connections idle 90 s, checking every 90 s)")
fails = []
if errors or not load_ok:
    fails.append(f"{errors} requests failed")
if not (q4 - q2 <= max_growth):
    fails.append(f"RSS grew {q4 - q2:.1f} MiB between the second and last quarter (limit {max_growth})")
if fds_after > fds_before + 2:
    fails.append(f"file descriptors not returned: {fds_before} before, {fds_after} after")
for f in fails:
    print("FAIL " + f)
sys.exit(1 if fails else 0)
PY
OK=1
echo "soak: ok" >&2
