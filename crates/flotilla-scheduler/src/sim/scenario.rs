//! The fleet that goes with a generated trace (`flotilla simulate --generate T.jsonl
//! --generate-config C.toml`): agents of two speeds with prefix caches, one of them lost for
//! a while, a cheap cloud target with spiky latency that has an outage (errors), and a
//! dearer steady one that rate-limits (429) during the bursts. Event times are fractions of
//! the trace's span, placed against [`super::trace`]'s bursts (25-33% and 65-72%).
//! Prices and speeds are illustrative, not quotes from any provider.

use super::trace::GenerateOptions;

/// The config as TOML, with a comment on each value. It parses with
/// [`super::SimConfig::parse`] (a unit test checks it).
pub fn scenario_config(o: &GenerateOptions) -> String {
    let at = |u: f64| (u * o.duration_s).round();
    let model = o.model.replace(['"', '\\'], "_");
    format!(
        r#"# Simulated fleet for a trace from `flotilla simulate --generate` (seed {seed}, {span} s):
# agents of two speeds, one of them lost and back; a cheap cloud with spiky latency that
# has an outage; a dearer steady cloud that rate-limits during the bursts.
# Prices and speeds are illustrative, not quotes from any provider.

model = "{model}"
gpu_hour_usd = 2.20               # an owned H100-class GPU, amortised, busy or idle
gpu_marginal_usd_per_hour = 0.25  # power for a busy GPU: the policy's price of local work
max_queue_depth = 16
strategy = "cost"
seed = {seed}                     # cloud TTFT and failure draws

[policy]
age_boost_ms = 30000
sla_attainment = 0.99

[health]
window_ms = 30000
min_requests = 5
error_rate = 0.5
open_for_ms = 10000
default_retry_after_ms = 1000

[gateway]
max_attempts = 3
retry_backoff_ms = 25
retry_budget_ms = 30000
max_queue_wait_ms = 600000
node_ttl_ms = 3500                # heartbeat 1 s, 3 missed, half a beat

# The fast agent: one H100-class GPU, 32 sequences at once. Lost from {down} s to {up} s
# (preempted, rebooted): what runs there breaks, and it comes back empty and cold.
[[agents]]
name = "gpu-fast"
gpus = 1
slots = 32
prefill_tokens_per_s = 10000
decode_tokens_per_s = 110         # one sequence alone
batch_slowdown = 0.5              # each sequence half as fast with all 32 slots busy
context_length = 8192
prefix_cache_tokens = 200000
outages = [{{ start_s = {down}, end_s = {up} }}]

# Two slower agents on older cards at about half the price.
[[agents]]
name = "gpu-slow-a"
gpus = 1
gpu_hour_usd = 1.10
slots = 8
prefill_tokens_per_s = 4000
decode_tokens_per_s = 60
batch_slowdown = 0.3
context_length = 8192
prefix_cache_tokens = 60000

[[agents]]
name = "gpu-slow-b"
gpus = 1
gpu_hour_usd = 1.10
slots = 8
prefill_tokens_per_s = 4000
decode_tokens_per_s = 60
batch_slowdown = 0.3
context_length = 8192
prefix_cache_tokens = 60000

# Cheap and spiky: a long TTFT tail, and an outage ({fail_from}-{fail_to} s, 80% of calls fail)
# across the second burst.
[[cloud]]
provider = "budget"
model = "{model}-budget"
ttft_p50_ms = 450
ttft_p99_ms = 2500
tokens_per_s = 70
input_usd_per_mtok = 0.90
output_usd_per_mtok = 2.70
context_length = 131072
failures = [{{ start_s = {fail_from}, end_s = {fail_to}, error_rate = 0.8 }}]

# Dearer and steady, but it rate-limits during the first burst ({rl1_from}-{rl1_to} s,
# Retry-After 5 s) and once more later ({rl2_from}-{rl2_to} s, no Retry-After header).
[[cloud]]
provider = "premium"
model = "{model}-premium"
ttft_p50_ms = 250
ttft_p99_ms = 900
tokens_per_s = 140
input_usd_per_mtok = 2.50
output_usd_per_mtok = 10.00
context_length = 131072
rate_limits = [
  {{ start_s = {rl1_from}, end_s = {rl1_to}, retry_after_ms = 5000 }},
  {{ start_s = {rl2_from}, end_s = {rl2_to} }},
]
"#,
        seed = o.seed,
        span = o.duration_s,
        down = at(0.45),
        up = at(0.55),
        fail_from = at(0.63),
        fail_to = at(0.73),
        rl1_from = at(0.26),
        rl1_to = at(0.31),
        rl2_from = at(0.84),
        rl2_to = at(0.86),
    )
}
