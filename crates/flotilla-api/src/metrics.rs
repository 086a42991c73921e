//! Metric names, a lock-free histogram and a Prometheus text-format writer.
//!
//! GPU series keep NVIDIA dcgm-exporter's names, units and labels so existing Grafana
//! dashboards read an agent unchanged; our own series carry the `flotilla_` prefix.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

// dcgm-exporter's GPU series (its default counter set), with its units.
/// GPU utilisation, %.
pub const DCGM_GPU_UTIL: &str = "DCGM_FI_DEV_GPU_UTIL";
/// Memory (copy engine) utilisation, %.
pub const DCGM_MEM_COPY_UTIL: &str = "DCGM_FI_DEV_MEM_COPY_UTIL";
/// Frame buffer used, MiB.
pub const DCGM_FB_USED: &str = "DCGM_FI_DEV_FB_USED";
/// Frame buffer free, MiB.
pub const DCGM_FB_FREE: &str = "DCGM_FI_DEV_FB_FREE";
/// GPU temperature, °C.
pub const DCGM_GPU_TEMP: &str = "DCGM_FI_DEV_GPU_TEMP";
/// Power draw, W.
pub const DCGM_POWER_USAGE: &str = "DCGM_FI_DEV_POWER_USAGE";
/// Power management limit, W.
pub const DCGM_POWER_LIMIT: &str = "DCGM_FI_DEV_POWER_MGMT_LIMIT";
/// SM clock, MHz.
pub const DCGM_SM_CLOCK: &str = "DCGM_FI_DEV_SM_CLOCK";
/// Memory clock, MHz.
pub const DCGM_MEM_CLOCK: &str = "DCGM_FI_DEV_MEM_CLOCK";

// The host, for CPU-only agents (and beside GPUs).
pub const HOST_CPU_UTIL: &str = "flotilla_host_cpu_utilization_ratio";
pub const HOST_MEMORY_TOTAL: &str = "flotilla_host_memory_total_bytes";
pub const HOST_MEMORY_AVAILABLE: &str = "flotilla_host_memory_available_bytes";

// Engine series per served model (label `model_name`), after vLLM's.
pub const REQUESTS_RUNNING: &str = "flotilla_num_requests_running";
pub const REQUESTS_WAITING: &str = "flotilla_num_requests_waiting";
pub const MAX_NUM_SEQS: &str = "flotilla_max_num_seqs";
pub const KV_CACHE_USAGE: &str = "flotilla_kv_cache_usage_perc";
pub const KV_BLOCKS_TOTAL: &str = "flotilla_kv_cache_blocks";
pub const PROMPT_TOKENS: &str = "flotilla_prompt_tokens_total";
pub const PREFIX_CACHE_HITS: &str = "flotilla_prefix_cache_hit_tokens_total";
pub const GENERATION_TOKENS: &str = "flotilla_generation_tokens_total";
pub const PREEMPTIONS: &str = "flotilla_num_preemptions_total";
pub const TTFT: &str = "flotilla_time_to_first_token_seconds";
pub const TPOT: &str = "flotilla_time_per_output_token_seconds";
pub const AGENT_DRAINING: &str = "flotilla_agent_draining";

// Scheduler series.
pub const SCHED_PREDICTED_TTFT: &str = "flotilla_scheduler_predicted_ttft_seconds";
pub const SCHED_TTFT: &str = "flotilla_scheduler_ttft_seconds";
pub const SCHED_TTFT_ERROR: &str = "flotilla_scheduler_ttft_prediction_error_seconds";
pub const SCHED_DECISIONS: &str = "flotilla_scheduler_routing_decisions_total";
pub const SCHED_ATTEMPTS: &str = "flotilla_scheduler_attempts_total";
pub const SCHED_PROBES: &str = "flotilla_scheduler_probes_total";
pub const SCHED_QUEUE_DEPTH: &str = "flotilla_scheduler_queue_depth";
pub const SCHED_BREAKER_STATE: &str = "flotilla_scheduler_breaker_state";
pub const SCHED_TARGET_EWMA_TTFT: &str = "flotilla_scheduler_target_ttft_ewma_seconds";
pub const SCHED_LEDGER_ROWS: &str = "flotilla_scheduler_ledger_rows_total";
pub const SCHED_KEY_STORE_READS: &str = "flotilla_scheduler_key_store_reads_total";
pub const SHARED_STATE_UP: &str = "flotilla_shared_state_up";
pub const SHARED_STATE_ERRORS: &str = "flotilla_shared_state_errors_total";
// Per request, once it ends (the figures its ledger row holds).
pub const SCHED_REQUESTS: &str = "flotilla_scheduler_requests_total";
pub const SCHED_REFUSED: &str = "flotilla_scheduler_refused_total";
pub const SCHED_TARGET_TTFT: &str = "flotilla_scheduler_target_ttft_seconds";
pub const SCHED_TARGET_LATENCY: &str = "flotilla_scheduler_request_duration_seconds";
pub const SCHED_TARGET_COST: &str = "flotilla_scheduler_cost_usd_total";
pub const SCHED_TARGET_TOKENS: &str = "flotilla_scheduler_tokens_total";
pub const SCHED_OVERFLOW: &str = "flotilla_scheduler_overflow_total";
pub const SCHED_FAILOVERS: &str = "flotilla_scheduler_failovers_total";
pub const SCHED_QUEUE_WAIT: &str = "flotilla_scheduler_queue_wait_seconds";

/// TTFT buckets, seconds (vLLM's, which dashboards already plot).
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
];
/// Time-per-output-token buckets, seconds (vLLM's).
pub const TPOT_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];

/// A Prometheus histogram updated without locks: one counter per bucket, the sum as f64
/// bits. Observations from many threads may interleave; each lands exactly once.
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative), plus the +Inf overflow at the end.
    counts: Vec<AtomicU64>,
    sum_bits: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_bits: AtomicU64::new(0f64.to_bits()),
        }
    }

    pub fn observe(&self, value: f64) {
        if !value.is_finite() {
            return;
        }
        let i = self.bounds.partition_point(|&b| b < value);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let mut cur = self.sum_bits.load(Ordering::Relaxed);
        loop {
            let next = (f64::from_bits(cur) + value).to_bits();
            match self.sum_bits.compare_exchange_weak(
                cur,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(actual) => cur = actual,
            }
        }
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = Vec::with_capacity(self.counts.len());
        let mut total = 0;
        for c in &self.counts {
            total += c.load(Ordering::Relaxed);
            cumulative.push(total);
        }
        HistogramSnapshot {
            bounds: self.bounds.to_vec(),
            cumulative,
            sum: f64::from_bits(self.sum_bits.load(Ordering::Relaxed)),
        }
    }
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.snapshot().count())
            .finish()
    }
}

/// A histogram at one moment: cumulative counts per upper bound, the last one for +Inf.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HistogramSnapshot {
    pub bounds: Vec<f64>,
    pub cumulative: Vec<u64>,
    pub sum: f64,
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }
}

/// Writes the Prometheus text exposition format (version 0.0.4). Each family is announced
/// once with `# HELP` and `# TYPE`, then its samples follow.
#[derive(Default)]
pub struct TextEncoder {
    out: String,
}

/// The content type of [`TextEncoder`]'s output.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

impl TextEncoder {
    pub fn new() -> Self {
        TextEncoder::default()
    }

    /// Starts a family: `kind` is `gauge`, `counter` or `histogram`.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        write_labels(&mut self.out, labels, None);
        self.out.push(' ');
        write_value(&mut self.out, value);
        self.out.push('\n');
    }

    /// The `_bucket`, `_sum` and `_count` samples of one histogram.
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &HistogramSnapshot) {
        for (i, count) in h.cumulative.iter().enumerate() {
            let le = match h.bounds.get(i) {
                Some(b) => {
                    let mut s = String::new();
                    write_value(&mut s, *b);
                    s
                }
                None => "+Inf".to_owned(),
            };
            let _ = write!(self.out, "{name}_bucket");
            write_labels(&mut self.out, labels, Some(&le));
            let _ = writeln!(self.out, " {count}");
        }
        self.sample(&format!("{name}_sum"), labels, h.sum);
        self.sample(&format!("{name}_count"), labels, h.count() as f64);
    }

    pub fn finish(self) -> String {
        self.out
    }
}

fn write_labels(out: &mut String, labels: &[(&str, &str)], le: Option<&str>) {
    if labels.is_empty() && le.is_none() {
        return;
    }
    out.push('{');
    let mut first = true;
    for (k, v) in labels.iter().copied().chain(le.map(|v| ("le", v))) {
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str(k);
        out.push_str("=\"");
        for c in v.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out.push('}');
}

fn write_value(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else {
        let _ = write!(out, "{v}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every series name the shipped Grafana dashboard queries is one we export (a renamed
    /// metric would leave its panel empty without anyone noticing).
    #[test]
    fn the_grafana_dashboard_reads_only_series_we_export() {
        let exported = [
            DCGM_GPU_UTIL,
            DCGM_MEM_COPY_UTIL,
            DCGM_FB_USED,
            DCGM_FB_FREE,
            DCGM_GPU_TEMP,
            DCGM_POWER_USAGE,
            DCGM_POWER_LIMIT,
            DCGM_SM_CLOCK,
            DCGM_MEM_CLOCK,
            HOST_CPU_UTIL,
            HOST_MEMORY_TOTAL,
            HOST_MEMORY_AVAILABLE,
            REQUESTS_RUNNING,
            REQUESTS_WAITING,
            MAX_NUM_SEQS,
            KV_CACHE_USAGE,
            KV_BLOCKS_TOTAL,
            PROMPT_TOKENS,
            PREFIX_CACHE_HITS,
            GENERATION_TOKENS,
            PREEMPTIONS,
            TTFT,
            TPOT,
            AGENT_DRAINING,
            SCHED_PREDICTED_TTFT,
            SCHED_TTFT,
            SCHED_TTFT_ERROR,
            SCHED_DECISIONS,
            SCHED_ATTEMPTS,
            SCHED_PROBES,
            SCHED_QUEUE_DEPTH,
            SCHED_BREAKER_STATE,
            SCHED_TARGET_EWMA_TTFT,
            SCHED_LEDGER_ROWS,
            SHARED_STATE_UP,
            SHARED_STATE_ERRORS,
            SCHED_REQUESTS,
            SCHED_REFUSED,
            SCHED_TARGET_TTFT,
            SCHED_TARGET_LATENCY,
            SCHED_TARGET_COST,
            SCHED_TARGET_TOKENS,
            SCHED_OVERFLOW,
            SCHED_FAILOVERS,
            SCHED_QUEUE_WAIT,
        ];
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/grafana/flotilla-fleet.json"
        );
        let text = std::fs::read_to_string(path).expect("deploy/grafana/flotilla-fleet.json");
        let dash: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        let mut exprs = Vec::new();
        for panel in dash["panels"].as_array().expect("panels") {
            for t in panel["targets"].as_array().into_iter().flatten() {
                exprs.push(t["expr"].as_str().expect("expr").to_owned());
            }
        }
        assert!(exprs.len() >= 20, "{} queries", exprs.len());
        let mut seen = 0;
        for expr in &exprs {
            let mut rest = expr.as_str();
            while let Some(i) = rest
                .find("flotilla_")
                .into_iter()
                .chain(rest.find("DCGM_"))
                .min()
            {
                let tail = &rest[i..];
                let end = tail
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(tail.len());
                let name = &tail[..end];
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .filter(|b| exported.contains(b))
                    .unwrap_or(name);
                assert!(
                    exported.contains(&base),
                    "`{name}` in `{expr}` is not exported"
                );
                seen += 1;
                rest = &tail[end..];
            }
        }
        assert!(seen >= exprs.len(), "every query reads a series");
    }

    #[test]
    fn histogram_counts_each_observation_once() {
        let h = Histogram::new(&[0.1, 1.0]);
        for v in [0.05, 0.1, 0.5, 3.0, f64::NAN] {
            h.observe(v);
        }
        let s = h.snapshot();
        // `le` is inclusive: 0.1 lands in the first bucket.
        assert_eq!(s.cumulative, vec![2, 3, 4]);
        assert_eq!(s.count(), 4);
        assert!((s.sum - 3.65).abs() < 1e-12);
    }

    #[test]
    fn text_format_escapes_labels_and_writes_buckets() {
        let h = Histogram::new(&[0.5]);
        h.observe(0.25);
        let mut e = TextEncoder::new();
        e.family("x", "gauge", "a \"quoted\" help");
        e.sample("x", &[("name", "a\"b\\c\nd")], 1.5);
        e.family("h", "histogram", "h");
        e.histogram("h", &[("m", "t")], &h.snapshot());
        let text = e.finish();
        assert!(text.contains("x{name=\"a\\\"b\\\\c\\nd\"} 1.5\n"), "{text}");
        assert!(text.contains("h_bucket{m=\"t\",le=\"0.5\"} 1\n"), "{text}");
        assert!(text.contains("h_bucket{m=\"t\",le=\"+Inf\"} 1\n"), "{text}");
        assert!(text.contains("h_count{m=\"t\"} 1\n"), "{text}");
    }
}
