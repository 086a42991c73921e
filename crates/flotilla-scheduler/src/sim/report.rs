//! What one policy achieved on a trace, and the markdown table `flotilla simulate` prints.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

/// Figures for one policy over a whole trace.
///
/// Cost = local + cloud, in two accountings side by side. Marginal (`cost_usd`): local is
/// each agent's busy time (at least one sequence running) x its GPUs x its GPU-hour price;
/// idle GPU time is not charged, so a policy that sends work away from the fleet saves it.
/// Owned (`owned_cost_usd`): local is every GPU of every agent over the whole window
/// (`window_s`: the trace's start to its last arrival or answer), idle and down time
/// included, as owned GPUs cost the same busy or idle; every policy pays it, `cloud-only`
/// too. Cloud, in both: prompt and completion tokens of the calls that succeeded, at the
/// target's prices (failed and rate-limited calls are not billed).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicyReport {
    pub policy: &'static str,
    pub requests: u64,
    pub completed: u64,
    /// Requests that no target served (refused, or every attempt failed).
    pub failed: u64,
    /// Requests whose deadlines were met (TTFT within `ttft_ms`, finish within
    /// `deadline_ms`), plus completed requests without deadlines.
    pub sla_met: u64,
    /// `sla_met / requests`.
    pub sla_attainment: f64,
    /// Over completed requests, from arrival (queue wait and failed attempts included).
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    /// The same over completed interactive requests only (batch work may wait by design).
    pub interactive_ttft_p99_ms: f64,
    /// Completed requests served by a cloud target.
    pub cloud_served: u64,
    /// `cloud_served / completed`.
    pub spillover: f64,
    /// Queued requests that left the local queue for the cloud (`spill_after` elapsed).
    pub spilled_from_queue: u64,
    /// `flotilla`: queued requests that decided again because no agent was left to serve.
    pub reconsidered: u64,
    /// Cloud calls that failed, 5xx or timeout (including those another target then
    /// served).
    pub cloud_errors: u64,
    /// Cloud calls answered 429.
    pub rate_limited: u64,
    /// Attempts on agents that broke as the agent went, or were refused while it was gone.
    pub agent_failures: u64,
    /// Local attempts that found their prompt's prefix cached, and the prefill tokens that
    /// saved.
    pub prefix_hits: u64,
    pub prefix_tokens_saved: u64,
    /// GPU-seconds with at least one sequence running.
    pub gpu_busy_s: f64,
    /// GPU-seconds owned: every agent's GPUs over `window_s`.
    pub gpu_owned_s: f64,
    /// Seconds from the trace's start to its last arrival or answer.
    pub window_s: f64,
    /// Marginal accounting: busy GPU time.
    pub local_cost_usd: f64,
    pub cloud_cost_usd: f64,
    /// Marginal accounting: `local_cost_usd + cloud_cost_usd`.
    pub cost_usd: f64,
    /// Owned accounting: every GPU over the whole window.
    pub owned_local_cost_usd: f64,
    /// Owned accounting: `owned_local_cost_usd + cloud_cost_usd`.
    pub owned_cost_usd: f64,
    /// From the first arrival to the last answer, in seconds.
    pub makespan_s: f64,
    /// Requests each target served (`local:<agent>`, `cloud:<provider>`) and what its
    /// answers cost in cloud tokens.
    pub by_target: BTreeMap<String, TargetTally>,
    /// `flotilla` only: how many decisions had each reason code, plus `refused` for
    /// requests `decide` returned an error for.
    pub decisions: BTreeMap<&'static str, u64>,
}

/// What one target served.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TargetTally {
    pub served: u64,
    /// Interactive requests among them.
    pub interactive: u64,
    /// Cloud token cost (0 for agents).
    pub cloud_usd: f64,
}

/// Nearest-rank percentile of sorted values (0 when empty).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One row per policy; cost under both accountings.
pub fn markdown_table(rows: &[PolicyReport]) -> String {
    let mut s = String::new();
    s.push_str(
        "| policy | requests | failed | SLA met | TTFT p50 ms | TTFT p99 ms | spillover | failed attempts (5xx / 429 / agent) | marginal cost USD (local + cloud) | owned cost USD (local + cloud) |\n",
    );
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.1}% | {:.0} | {:.0} | {:.1}% | {} / {} / {} | {:.2} ({:.2} + {:.2}) | {:.2} ({:.2} + {:.2}) |",
            r.policy,
            r.requests,
            r.failed,
            r.sla_attainment * 100.0,
            r.ttft_p50_ms,
            r.ttft_p99_ms,
            r.spillover * 100.0,
            r.cloud_errors,
            r.rate_limited,
            r.agent_failures,
            r.cost_usd,
            r.local_cost_usd,
            r.cloud_cost_usd,
            r.owned_cost_usd,
            r.owned_local_cost_usd,
            r.cloud_cost_usd,
        );
    }
    s
}

/// One line per policy other than `of`: its cost over theirs under each accounting
/// ("flotilla / cloud-only: marginal 0.42x, owned 0.61x").
pub fn cost_ratios(rows: &[PolicyReport], of: &str) -> String {
    let mut s = String::new();
    let Some(me) = rows.iter().find(|r| r.policy == of) else {
        return s;
    };
    let x = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    for r in rows.iter().filter(|r| r.policy != of) {
        let _ = writeln!(
            s,
            "{of} / {}: marginal {:.2}x, owned {:.2}x",
            r.policy,
            x(me.cost_usd, r.cost_usd),
            x(me.owned_cost_usd, r.owned_cost_usd),
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank() {
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&xs, 50.0), 50.0);
        assert_eq!(percentile(&xs, 99.0), 99.0);
        assert_eq!(percentile(&xs[..1], 99.0), 1.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }
}
