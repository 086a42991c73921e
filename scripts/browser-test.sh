#!/usr/bin/env bash
# The dashboard in a real browser: starts `flotilla up` (the built-in model on a GPU the
# config describes, a mock cloud to spill to), sends traffic that runs locally and spills,
# loads /dashboard in headless Chromium, checks the DOM the page drew (charts with data
# points, the targets tables with their breakers, spillover, the GPU, the latest decisions,
# the savings) and saves a screenshot.
#
#   scripts/browser-test.sh            # CI runs it; installs Debian's chromium when missing
#
# Knobs: FLOTILLA_BIN (default target/debug/flotilla), MOCK_BIN (default
# target/debug/flotilla-mock-upstream), BROWSER_TEST_OUT (screenshot and DOM; default
# target/browser-test), BROWSER_NO_INSTALL=1 (fail instead of installing chromium).
set -euo pipefail
cd "$(dirname "$0")/.."

die() {
    echo "browser-test: FAILED: $*" >&2
    exit 1
}
# shellcheck source=scripts/lib.sh
source scripts/lib.sh # (the working directory is the repository root)

OUT=${BROWSER_TEST_OUT:-target/browser-test}
FLOTILLA_BIN=${FLOTILLA_BIN:-target/debug/flotilla}
MOCK_BIN=${MOCK_BIN:-target/debug/flotilla-mock-upstream}
mkdir -p "$OUT"

CHROME=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [[ -z "$CHROME" ]]; then
    [[ "${BROWSER_NO_INSTALL:-}" == 1 ]] && die "chromium is not installed (Debian: apt-get install -y chromium)"
    SUDO=()
    [[ $(id -u) -ne 0 ]] && SUDO=(sudo)
    echo "browser-test: installing chromium: ${SUDO[*]} apt-get install -y chromium"
    "${SUDO[@]}" apt-get install -y chromium >/dev/null || {
        "${SUDO[@]}" apt-get update >/dev/null
        "${SUDO[@]}" apt-get install -y chromium >/dev/null
    }
    CHROME=$(command -v chromium) || die "chromium still not found after installing it"
fi
if [[ ! -x "$FLOTILLA_BIN" || ! -x "$MOCK_BIN" ]]; then
    echo "browser-test: building flotilla and the mock upstream"
    cargo build --quiet -p flotilla-cli -p flotilla-testkit --bin flotilla --bin flotilla-mock-upstream
fi
[[ -x "$FLOTILLA_BIN" ]] || die "$FLOTILLA_BIN is missing"
[[ -x "$MOCK_BIN" ]] || die "$MOCK_BIN is missing"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/browser-test.XXXXXX")
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT


"$MOCK_BIN" --listen 127.0.0.1:0 --chunks 8 --latency-ms 20 >"$WORK/mock.out" 2>"$WORK/mock.err" &
PIDS+=("$!")
MOCK_URL=$(wait_listening "mock cloud" "$!" "$WORK/mock.out" 120)

cat >"$WORK/flotilla.toml" <<EOF
[scheduler]
max_queue_wait_ms = 60000

[[scheduler.providers]]
name = "mockcloud"
base_url = "$MOCK_URL/v1"
prices = { "cloud-model" = { input_usd_per_mtok = 2.5, output_usd_per_mtok = 10.0 } }

# The local model first; past one waiting request the cloud takes the rest.
[[scheduler.models]]
name = "tiny-llama"
strategy = "latency"
max_queue_depth = 1
cloud = [{ provider = "mockcloud", model = "cloud-model", expected_ttft_ms = 5000 }]

[agent]
[[agent.fixed_gpus]]
name = "NVIDIA H200 (described)"
memory_gib = 141
used_gib = 37.5
utilization_pct = 63

[[agent.models]]
name = "tiny-llama"
source = "builtin:tiny-llama"
kind = "chat"
max_num_seqs = 2
EOF
FLOTILLA_LOG=warn FLOTILLA_AUTH=none FLOTILLA_DATA_DIR="$WORK/data" \
    "$FLOTILLA_BIN" up --listen 127.0.0.1:0 --config "$WORK/flotilla.toml" \
    --cache-dir "$WORK/models" >"$WORK/up.out" 2>"$WORK/up.err" &
PIDS+=("$!")
URL=$(wait_listening "flotilla up" "$!" "$WORK/up.out" 120)
echo "browser-test: flotilla up at $URL, mock cloud at $MOCK_URL"

# Traffic: waves of 8 concurrent requests; two local slots and one queue place, so some
# run locally and the rest spill to the cloud (queue_depth_exceeded).
body='{"model":"tiny-llama","messages":[{"role":"user","content":"Hello dashboard"}],"max_tokens":16}'
# A wave, a pause past the dashboard's 10 s sampling, two more: the charts get several points.
for wave in 1 2 3; do
    [[ $wave == 2 ]] && sleep 11
    CURLS=()
    for i in $(seq 8); do
        curl -sS -o "$WORK/r$wave-$i.json" -w '%{http_code}\n' -H 'content-type: application/json' \
            -d "$body" "$URL/v1/chat/completions" >>"$WORK/codes" &
        CURLS+=("$!")
    done
    for c in "${CURLS[@]}"; do wait "$c" || true; done
done
ok=$(grep -c '^200$' "$WORK/codes" || true)
[[ "$ok" == 24 ]] || die "expected 24 answers with 200, got $ok ($(sort "$WORK/codes" | uniq -c | tr '\n' ' '))"
metrics=$(curl -sS "$URL/metrics")
grep -q '^flotilla_scheduler_overflow_total{model="tiny-llama",reason="queue_depth_exceeded"}' <<<"$metrics" \
    || die "no request spilled; the dashboard would have no spillover to draw"
grep -q '^flotilla_scheduler_requests_total{model="tiny-llama",target="local:local/tiny-llama",status="ok"' <<<"$metrics" \
    || die "no request ran locally"
# The ledger writes rows every 200 ms: the latest decisions and the savings read it.
sleep 1

chrome() {
    timeout 120 "$CHROME" --headless=new --no-sandbox --disable-gpu --disable-dev-shm-usage \
        --no-first-run --no-default-browser-check --user-data-dir="$WORK/chrome" \
        --virtual-time-budget=6000 --window-size=1400,2200 "$@" 2>>"$WORK/chrome.err"
}
chrome --dump-dom "$URL/dashboard" >"$OUT/dashboard.html" \
    || die "chromium could not load the dashboard ($(tail -n 5 "$WORK/chrome.err"))"
chrome --screenshot="$OUT/dashboard.png" "$URL/dashboard" >/dev/null \
    || die "chromium could not take the screenshot"
[[ -s "$OUT/dashboard.png" ]] || die "the screenshot is empty"

# DOM assertions on what the page drew.
python3 - "$OUT/dashboard.html" <<'PY' || die "the dashboard did not draw what it should (DOM in $OUT/dashboard.html)"
import re, sys
from html.parser import HTMLParser

class Dom(HTMLParser):
    def __init__(self):
        super().__init__()
        self.els = []
        self.text = []
    def handle_starttag(self, tag, attrs):
        self.els.append((tag, dict(attrs)))
    def handle_data(self, data):
        self.text.append(data)

dom = Dom()
dom.feed(open(sys.argv[1], encoding="utf-8").read())
text = " ".join(dom.text)
fails = []
def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        fails.append(what)

body = [a for t, a in dom.els if t == "body"][0]
check(int(body.get("data-refreshes", "0")) >= 1, "the page refreshed from the API at least once")
charts = {a.get("data-chart"): a for t, a in dom.els if t == "svg" and a.get("data-chart")}
req = charts.get("requests", {})
check(int(req.get("data-points", "0")) >= 4, f"requests chart has data points ({req.get('data-points')})")
series = {a.get("data-series") for t, a in dom.els if t in ("polyline", "circle") and a.get("data-series")}
check("local:local/tiny-llama" in series and "cloud:mockcloud" in series, f"requests chart draws both targets {sorted(series)}")
spill = charts.get("spill", {})
check(int(spill.get("data-points", "0")) >= 2 and "queue_depth_exceeded" in series, "spillover chart draws queue_depth_exceeded")
gpu = charts.get("gpu", {})
check(int(gpu.get("data-points", "0")) >= 2, f"GPU chart has data points ({gpu.get('data-points')})")
check("NVIDIA H200 (described)" in text and "37.5 / 141.0 GiB" in text, "the GPU card names the GPU and its memory")
targets = [a.get("data-target") for t, a in dom.els if t == "tr" and a.get("data-target")]
check({"local:local/tiny-llama", "cloud:mockcloud"} <= set(targets), f"targets table rows {targets}")
health = {a.get("data-health"): a.get("data-breaker") for t, a in dom.els if t == "tr" and a.get("data-health")}
check(health.get("local:local/tiny-llama") == "closed" and any(k.startswith("cloud:mockcloud/") for k in health), f"targets-now table with breakers {health}")
decisions = [a.get("data-decision") for t, a in dom.els if t == "tr" and "data-decision" in a]
check(len(decisions) >= 5 and all(decisions), f"latest decisions table with reasons ({len(decisions)} rows)")
check(re.search(r"\$\d", text) is not None and "cloud-only baseline" in text, "savings against the baseline shown")
check(re.search(r"over the window: .*queue_depth_exceeded \d+", text) is not None, "cloud traffic by reason over the window shown")
sys.exit(1 if fails else 0)
PY
echo "browser-test: ok; screenshot $OUT/dashboard.png, DOM $OUT/dashboard.html"
