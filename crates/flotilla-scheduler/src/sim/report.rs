//! What one policy achieved on a trace, and the markdown table `flotilla simulate` prints.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

/// Figures for one policy over a whole trace.
///
/// Cost = local + cloud. Local: each agent's busy time (at least one sequence running)
/// x its GPUs x `gpu_hour_usd`; idle GPU time is not charged, so a policy that sends work
/// away from the fleet saves it. Cloud: prompt and completion tokens of the calls that
/// succeeded, at the target's prices (failed calls are not billed).
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
    /// Cloud calls that failed (including those another target then served).
    pub cloud_errors: u64,
    pub gpu_busy_s: f64,
    pub local_cost_usd: f64,
    pub cloud_cost_usd: f64,
    pub cost_usd: f64,
    /// From the first arrival to the last answer, in seconds.
    pub makespan_s: f64,
    /// `flotilla` only: how many decisions had each reason code, plus `refused` for
    /// requests `decide` returned an error for.
    pub decisions: BTreeMap<&'static str, u64>,
}

/// Nearest-rank percentile of sorted values (0 when empty).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One row per policy.
pub fn markdown_table(rows: &[PolicyReport]) -> String {
    let mut s = String::new();
    s.push_str(
        "| policy | requests | failed | SLA met | TTFT p50 ms | TTFT p99 ms | spillover | cloud errors | cost USD (local + cloud) |\n",
    );
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.1}% | {:.0} | {:.0} | {:.1}% | {} | {:.2} ({:.2} + {:.2}) |",
            r.policy,
            r.requests,
            r.failed,
            r.sla_attainment * 100.0,
            r.ttft_p50_ms,
            r.ttft_p99_ms,
            r.spillover * 100.0,
            r.cloud_errors,
            r.cost_usd,
            r.local_cost_usd,
            r.cloud_cost_usd,
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
