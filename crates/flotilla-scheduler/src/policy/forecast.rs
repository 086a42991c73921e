//! The local queue seen by one request: how many go first, how fast the agents drain it
//! (slots over the measured mean latency, Little's law), and the TTFT that follows.

use std::time::{Duration, Instant};

use super::sla::{Tail, duration_s};
use super::{LocalCandidate, PolicySettings};
use crate::Priority;
use crate::queue::Waiting;
use crate::queue::ahead_of;

/// The local queue seen by one request: how many go first and how fast it drains.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocalForecast {
    pub free_slots: u64,
    /// Batch slots across the agents that may take the request.
    pub slots: u64,
    /// Requests in the queue that would be served before this one.
    pub ahead: u64,
    /// Requests that must finish before this one starts (0 = starts now).
    pub position: u64,
    /// Requests finished per second across all agents.
    pub drain_per_s: f64,
    pub wait: Duration,
    /// Mean predicted TTFT: the wait plus the agents' measured TTFT.
    pub ttft: Duration,
    /// The agents' own TTFT distribution (the wait comes on top).
    pub tail: Tail,
    /// Generated tokens/s for one sequence.
    pub tokens_per_s: f64,
    /// Whether the latency figures are measured (false = priors).
    pub measured: bool,
}

impl LocalForecast {
    /// TTFT not exceeded with probability `p`: the wait plus the agents' TTFT quantile.
    pub fn ttft_quantile(&self, p: f64) -> Duration {
        self.wait.saturating_add(self.tail.quantile(p))
    }

    /// Probability that the first token comes within `budget`.
    pub fn prob_within(&self, budget: Duration) -> f64 {
        match budget.checked_sub(self.wait) {
            Some(left) => self.tail.prob_within(left),
            None => 0.0,
        }
    }

    /// Share of the local capacity taken when this request arrives (running and queued
    /// ahead of it over the slots): below 1 a slot is free for it.
    pub fn occupancy(&self) -> f64 {
        let used = self.slots.saturating_sub(self.free_slots) as f64;
        (used + self.ahead as f64) / self.slots.max(1) as f64
    }
}

fn mean(xs: impl Iterator<Item = f64>) -> Option<f64> {
    let (n, sum) = xs.fold((0u32, 0.0), |(n, s), x| (n + 1, s + x));
    (n > 0).then(|| sum / n as f64)
}

/// Predicts the local wait and TTFT for a request of `priority` arriving now.
pub fn forecast_local(
    locals: &[&LocalCandidate],
    waiting: &[Waiting],
    priority: Priority,
    s: &PolicySettings,
    now: Instant,
) -> LocalForecast {
    let free_slots = locals.iter().fold(0u64, |a, c| a.saturating_add(c.free()));
    let slots = locals
        .iter()
        .fold(0u64, |a, c| a.saturating_add(c.max_running))
        .max(1);
    let ahead = ahead_of(waiting, priority, now, s.age_boost);
    let position = if ahead < free_slots {
        0
    } else {
        ahead - free_slots + 1
    };
    let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
    let latency = mean(locals.iter().filter_map(|c| secs(c.health.latency)));
    let ttft = mean(locals.iter().filter_map(|c| secs(c.health.ttft)));
    let ttft_dev = mean(locals.iter().filter_map(|c| secs(c.health.ttft_dev)));
    let tps = mean(locals.iter().filter_map(|c| c.health.tokens_per_s));
    let measured = latency.is_some();
    let latency = latency.unwrap_or(s.prior_latency.as_secs_f64()).max(1e-3);
    let drain_per_s = slots as f64 / latency;
    let wait = duration_s(position as f64 / drain_per_s);
    let ttft = duration_s(ttft.unwrap_or(s.prior_ttft.as_secs_f64()));
    let tail = Tail::fit(ttft, ttft_dev.map(duration_s));
    LocalForecast {
        free_slots,
        slots,
        ahead,
        position,
        drain_per_s,
        wait,
        ttft: wait.saturating_add(ttft),
        tail,
        tokens_per_s: tps.unwrap_or(s.prior_tokens_per_s).max(1e-3),
        measured,
    }
}
