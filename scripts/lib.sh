# Shared by the scripts that start servers; source it after defining `die MESSAGE`.

# wait_listening NAME PID OUT [SECONDS]: waits until server NAME (process PID) prints its
# `listening on URL` line into OUT, then prints the URL. Dies if the process exits first
# (quoting the end of its stderr, OUT with .err for .out) or after SECONDS (default 10).
wait_listening() {
    local name=$1 pid=$2 out=$3 secs=${4:-10}
    local i
    for ((i = 0; i < secs * 10; i++)); do
        if grep -q '^listening on ' "$out"; then
            sed -n 's/^listening on //p' "$out" | head -n 1
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            die "$name exited before listening: $(tail -n 5 "${out%.out}.err" 2>/dev/null)"
        fi
        sleep 0.1
    done
    die "$name did not print 'listening on' within $secs s"
}
